"""benchmarks/gpu_check.sh (the prepared GPU check) and benchmarks/gpu_wheelhouse.sh (its wheelhouse).

The fast test checks that both scripts parse and that the check's --help answers; the slow one runs
the whole check at its CPU sizes (``--cpu``: every step, a few minutes on 2 cores) and reads its table.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

CHECK = REPO / "benchmarks" / "gpu_check.sh"
WHEELHOUSE = REPO / "benchmarks" / "gpu_wheelhouse.sh"
STEPS = ["table1_cifar", "table1_digits", "sweep_digits", "deit_layers", "throughput_b16", "throughput_b32"]


def parse_table(stdout: str) -> dict[str, dict[str, str]]:
    """The rows of the check's results table, by step name, each as {column: value}."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["step"] and "RUNNING" in line)
    header = lines[start].split()
    rows = {}
    for line in lines[start + 1:]:
        if not line.strip() or line.startswith("gpu_check:"):
            break
        values = line.split()
        assert len(values) == len(header), f"a table row with {len(values)} columns, not {len(header)}: {line!r}"
        rows[values[0]] = dict(zip(header, values))
    return rows


def test_scripts_parse_and_check_help() -> None:
    for script in (CHECK, WHEELHOUSE):
        assert script.is_file(), f"{script.name} is missing"
        parsed = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert parsed.returncode == 0, f"{script.name} is not valid bash: {parsed.stderr}"
    helped = subprocess.run(["bash", str(CHECK), "--help"], capture_output=True, text=True, timeout=30)
    assert helped.returncode == 0, helped.stderr
    assert "Usage: bash benchmarks/gpu_check.sh" in helped.stdout
    assert "--cpu" in helped.stdout and "--wheelhouse" in helped.stdout
    wrong = subprocess.run(["bash", str(CHECK), "--no-such-flag"], capture_output=True, text=True, timeout=30)
    assert wrong.returncode != 0 and "unknown argument '--no-such-flag'" in wrong.stderr


def test_parse_table() -> None:
    out = ("gpu_check: results (cpu mode)\n"
           "step  status seconds images/s FINISHED RUNNING gpu_mem_peak\n"
           "a     ok     1.0     2.0      4        0       -\n"
           "gpu_check: OK\n")
    assert parse_table(out) == {"a": {"step": "a", "status": "ok", "seconds": "1.0", "images/s": "2.0",
                                      "FINISHED": "4", "RUNNING": "0", "gpu_mem_peak": "-"}}


@pytest.mark.slow
def test_gpu_check_cpu_end_to_end() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(CHECK), "--cpu"], cwd=REPO, capture_output=True, text=True,
                          timeout=1500, env=env)
    assert done.returncode == 0, f"gpu_check.sh --cpu exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    rows = parse_table(done.stdout)
    assert list(rows) == STEPS
    for name, row in rows.items():
        assert row["status"] == "ok", row
        assert row["RUNNING"] == "0", f"step {name} left runs RUNNING: {row}"
        assert row["gpu_mem_peak"] == "-", row
    for name in STEPS[:4]:
        assert int(rows[name]["FINISHED"]) >= 1 and rows[name]["images/s"] != "-", rows[name]
    assert int(rows["sweep_digits"]["FINISHED"]) >= 4 * 3  # 4 parents, each with transfer and scratch
    assert "gpu_check: OK (cpu mode" in done.stdout

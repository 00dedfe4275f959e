"""The paper's sweeps on this tree against an earlier commit, whole processes timed alternately in one run.

For each preset (default: ``fig2`` and ``kou2023``) the sweep ``python -m ptlab -m experiment=<preset>`` runs with
MLflow into a new SQLite store, once in a copy of ``--base`` (``git archive``) and once in this tree, alternating for
``--rounds`` rounds (the order swapped every round); prints every timing with the load average and the CPU seconds
of the sweep's processes (user + system, its workers included: what a loaded machine distorts least), the medians,
the median of the per-round ratios (base / this tree: above 1 is faster here) and checks that both trees tracked the
same number of FINISHED parent runs. Everything it writes goes to a temporary folder.

``python benchmarks/bench_versus.py --base <commit> [--presets fig2,kou2023] [--rounds 2]``
"""

from __future__ import annotations

import argparse
import os
import resource
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def load() -> str:
    return "load " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def extract(commit: str, into: Path) -> Path:
    """The tree of ``commit`` as files under ``into``."""
    into.mkdir(parents=True)
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def finished_parents(store: Path) -> int:
    with sqlite3.connect(store) as db:
        return db.execute(
            "select count(*) from runs r join tags t on t.run_uuid = r.run_uuid "
            "where t.key = 'ptlab.stage' and t.value in ('pipeline', 'grid') "
            "and r.status = 'FINISHED'"
        ).fetchone()[0]


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's ended children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def sweep(tree: Path, preset: str, work: Path) -> tuple[float, int, float]:
    """Seconds of one sweep of ``preset`` with ``tree``'s ptlab, in the fresh folder ``work``; FINISHED parents; CPU
    seconds of the sweep's processes."""
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(tree), "HYDRA_FULL_ERROR": "0"}
    start, cpu = time.perf_counter(), children_cpu()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ptlab",
            "-m",
            f"experiment={preset}",
            f"logger.tracking_uri=sqlite:///{work / 'mlflow.db'}",
            f"cache.dir={work / 'cache'}",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    seconds, cpu = time.perf_counter() - start, children_cpu() - cpu
    if done.returncode:
        raise SystemExit(f"{tree}: experiment={preset} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, finished_parents(work / "mlflow.db"), cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the earlier commit to compare with")
    parser.add_argument("--presets", default="fig2,kou2023")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = extract(args.base, Path(tmp) / "base")
        trees = {"base": base, "here": REPO}
        for preset in args.presets.split(","):
            times: dict[str, list[float]] = {"base": [], "here": []}
            cpus: dict[str, list[float]] = {"base": [], "here": []}
            for k in range(args.rounds):
                order = ("base", "here") if k % 2 == 0 else ("here", "base")
                runs = {}
                for name in order:
                    seconds, parents, cpu = sweep(trees[name], preset, Path(tmp) / f"{preset}-{name}-{k}")
                    times[name].append(seconds)
                    cpus[name].append(cpu)
                    runs[name] = parents
                    print(
                        f"{preset} round {k + 1} {name:4s}: {seconds:7.1f} s, {cpu:7.1f} CPU s, {parents} FINISHED parents   "
                        f"({load()})",
                        flush=True,
                    )
                if runs["base"] != runs["here"]:
                    raise SystemExit(f"{preset}: the trees tracked {runs['base']} and {runs['here']} FINISHED parents")
            ratios = [b / h for b, h in zip(times["base"], times["here"])]
            print(
                f"{preset}: median base {statistics.median(times['base']):.1f} s, here "
                f"{statistics.median(times['here']):.1f} s; base / here = {statistics.median(ratios):.2f} "
                f"(rounds: {', '.join(f'{r:.2f}' for r in ratios)}); CPU s: median base {statistics.median(cpus['base']):.1f}, "
                f"here {statistics.median(cpus['here']):.1f}"
            )


if __name__ == "__main__":
    main()

"""benchmarks/gpu_check.sh (the prepared GPU check) and benchmarks/gpu_wheelhouse.sh (its wheelhouse).

The fast tests check that both scripts parse and that the check's --help answers, that ptlab's own requirements
take the GPU image's torch (and the rest of what the image list versions), and that the wheelhouse's resolution check
names what neither the wheelhouse nor the image holds; the slow ones run the whole check at its CPU sizes (``--cpu``:
every step, a few minutes on 2 cores) and build the wheelhouse for the image from the package registry.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from tests.conftest import REPO

CHECK = REPO / "benchmarks" / "gpu_check.sh"
WHEELHOUSE = REPO / "benchmarks" / "gpu_wheelhouse.sh"
STEPS = [
    "table1_cifar",
    "table1_digits",
    "sweep_digits",
    "deit_layers",
    "gram_sweep",
    "gram_cuda_tests",
    "throughput_b16",
    "throughput_b32",
]


def parse_table(stdout: str) -> dict[str, dict[str, str]]:
    """The rows of the check's results table, by step name, each as {column: value}."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["step"] and "RUNNING" in line)
    header = lines[start].split()
    rows = {}
    for line in lines[start + 1 :]:
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
    out = (
        "gpu_check: results (cpu mode)\n"
        "step  status seconds images/s FINISHED RUNNING gpu_mem_peak\n"
        "a     ok     1.0     2.0      4        0       -\n"
        "gpu_check: OK\n"
    )
    assert parse_table(out) == {
        "a": {
            "step": "a",
            "status": "ok",
            "seconds": "1.0",
            "images/s": "2.0",
            "FINISHED": "4",
            "RUNNING": "0",
            "gpu_mem_peak": "-",
        }
    }


@pytest.mark.slow
def test_gpu_check_cpu_end_to_end() -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(CHECK), "--cpu"], cwd=REPO, capture_output=True, text=True, timeout=1500, env=env)
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
    assert int(rows["gram_sweep"]["FINISHED"]) >= 4 * 4  # 4 parents, each with upstream, transfer and scratch
    assert "gpu_check: OK (cpu mode" in done.stdout


def wheelhouse_tools():
    spec = importlib.util.spec_from_file_location("gpu_wheelhouse_tools", REPO / "benchmarks" / "gpu_wheelhouse_tools.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


IMAGE = REPO / "benchmarks" / "gpu_image_packages.txt"


def test_ptlab_requirements_take_the_images_torch() -> None:
    """Every requirement of ptlab on a distribution the image list versions (torch 2.11, torchvision, Lightning,
    torchmetrics, numpy) accepts the image's version: installing ptlab there never pulls another torch. The image
    holds what the issue lists as already there."""
    tools = wheelhouse_tools()
    have = tools.image(IMAGE)
    assert have["torch"] == "2.11.0" and have["python"] == "3.12.3"
    for name in (
        "pandas",
        "pyarrow",
        "scipy",
        "numpy",
        "scikit-learn",
        "matplotlib",
        "pytorch-lightning",
        "timm",
        "torchmetrics",
        "torchvision",
    ):
        assert name in have, name
    for name in ("hydra-core", "omegaconf", "antlr4-python3-runtime", "mlflow", "mlflow-skinny", "submitit"):
        assert name not in have, name
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    checked = 0
    for line in dependencies:
        req = Requirement(line)
        version = have.get(tools.norm(req.name))
        if version is not None:
            assert req.specifier.contains(version), f"{line} refuses the GPU image's {req.name} {version}"
            checked += 1
    assert checked >= 4


def fake_wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    """A wheel holding only its METADATA."""
    metadata = "".join(
        [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n", *(f"Requires-Dist: {r}\n" for r in requires)]
    )
    with zipfile.ZipFile(folder / f"{name}-{version}-py3-none-any.whl", "w") as wheel:
        wheel.writestr(f"{name}-{version}.dist-info/METADATA", metadata)


def test_wheelhouse_resolution_check_names_what_is_missing(tmp_path: Path) -> None:
    """The check reads every wheel's requirements with markers for the target (Python 3.12 on Linux): met by a wheel
    or the image (at its listed version) passes; a missing distribution, a version the image does not have and a
    wheel version out of range are each named."""
    tools = wheelhouse_tools()
    image = tmp_path / "image.txt"
    image.write_text("# the image\ntorch==2.11.0\npandas\n")
    fake_wheel(tmp_path, "ptlab", "0.1.0", ["torch>=2.2", "mlflow<3.18,>=3.17", "tomli; python_version < '3.11'"])
    fake_wheel(tmp_path, "mlflow", "3.17.2", ["pandas<3", "sqlalchemy>=2", "pywin32; sys_platform == 'win32'"])
    fake_wheel(tmp_path, "sqlalchemy", "2.1.9", [])
    assert tools.problems(tmp_path, image, "3.12") == ([], 4, 3, ["pandas<3"])
    image.write_text("torch==2.1.0\n")
    (tmp_path / "sqlalchemy-2.1.9-py3-none-any.whl").unlink()
    fake_wheel(tmp_path, "sqlalchemy", "1.4.0", [])
    found, _, _, _ = tools.problems(tmp_path, image, "3.12")
    assert found == [
        "mlflow needs pandas<3: neither in the wheelhouse nor in the image",
        "mlflow needs sqlalchemy>=2, the wheelhouse has 1.4.0",
        "ptlab needs torch>=2.2, the image has 2.1.0",
    ]


@pytest.mark.slow
def test_wheelhouse_for_the_gpu_image(tmp_path: Path) -> None:
    """The wheelhouse for the GPU image (from the package registry): ptlab, hydra, omegaconf, antlr4 built from its
    sdist, mlflow, the launchers and submitit, no torch, the resolution check passed, at most 60 MiB."""
    env = {**os.environ, "VENV": str(Path(sys.executable).parent.parent)}
    done = subprocess.run(["bash", str(WHEELHOUSE), str(tmp_path / "wh")], capture_output=True, text=True, timeout=1200, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    names = {p.name.split("-")[0].lower() for p in (tmp_path / "wh").glob("*.whl")}
    assert {
        "ptlab",
        "hydra_core",
        "omegaconf",
        "antlr4_python3_runtime",
        "mlflow",
        "mlflow_skinny",
        "mlflow_tracing",
        "hydra_joblib_launcher",
        "hydra_submitit_launcher",
        "submitit",
    } <= names
    assert not names & {"torch", "torchvision", "numpy", "pandas", "pyarrow", "scipy", "scikit_learn", "matplotlib"}
    assert "gpu_wheelhouse: resolves:" in done.stdout
    total = sum(p.stat().st_size for p in (tmp_path / "wh").glob("*.whl"))
    assert total <= 60 * 2**20, total

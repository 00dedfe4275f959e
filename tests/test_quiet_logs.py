"""Logs off a terminal: a line every few seconds instead of a bar per step, the result table once, no
``v_num``, and a first line (stage totals) before torch loads."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from ptlab.progress import stage_totals
from tests.conftest import REPO, SMALL

IMAGE_TINY = [
    "task=digits",
    "noise=pixels",
    "task.n2=8",
    "task.k=2",
    "task.n1_ratio=2",
    "task.n_test=10",
    "train.upstream_epochs=1",
    "train.downstream_epochs=2",
    "train.batch_size=8",
    "train.eval_every_epochs=1",
    "model.width=0.125",
]


def run_to_file(args: list[str], tmp_path: Path) -> tuple[str, float]:
    """``python -m ptlab <args> > log 2>&1`` in ``tmp_path``: the log and the seconds to its first line."""
    log_path = tmp_path / "run.log"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    with log_path.open("w") as log:
        started = time.perf_counter()
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ptlab",
                f"cache.dir={tmp_path / 'cache'}",
                f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
                *args,
            ],
            cwd=tmp_path,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        first = None
        while process.poll() is None:
            if first is None and log_path.stat().st_size:
                first = time.perf_counter() - started
            time.sleep(0.05)
    text = log_path.read_text()
    assert process.returncode == 0, text[-3000:]
    return text, first if first is not None else time.perf_counter() - started


def test_a_lightning_run_off_a_terminal_logs_lines_not_bars(tmp_path: Path):
    args = ["engine=lightning", *SMALL, "train.upstream_steps=400", "train.downstream_steps=200"]
    text, first = run_to_file(args, tmp_path)
    lines = text.splitlines()
    assert "\r" not in text and "it/s" not in text and "v_num" not in text and "Epoch 0" not in text
    assert len(text.encode()) < 20_000 and len(lines) < 40, text
    assert (
        "starting seed=0 task=synthetic engine=lightning: upstream 400 GD steps, transfer 200 GD steps, "
        "scratch 200 GD steps" in lines[0]
    )
    assert first < 30  # the first line comes before torch and Lightning load (about a second when idle)
    for stage, total in (("upstream", 400), ("transfer", 200), ("scratch", 200)):
        assert any(line.endswith(f"{stage}: GD step 0/{total}, 0.0 s") for line in lines)
    assert text.count("transfer - scratch test accuracy") == 1
    assert sum(line.startswith("scratch ") for line in lines) == 1


def test_an_image_run_off_a_terminal_logs_epochs_without_validation_bars_or_v_num(tmp_path: Path):
    text, _ = run_to_file([*IMAGE_TINY, "train.progress_bar=true"], tmp_path)
    lines = text.splitlines()
    assert "\r" not in text and "v_num" not in text and "Validation" not in text and "it/s" not in text
    assert "starting seed=0 task=digits engine=lightning: upstream 1 epochs, transfer 2 epochs, scratch 2 epochs" in lines[0]
    assert any(line.endswith("transfer: epoch 1/2, 0.0 s") for line in lines)
    assert text.count("transfer - scratch test accuracy") == 1


def test_stage_totals_name_each_stage_and_its_length():
    synthetic = {"task": {"name": "synthetic"}, "train": {"upstream_steps": 800, "downstream_steps": 400}}
    assert stage_totals(synthetic) == "upstream 800 GD steps, transfer 400 GD steps, scratch 400 GD steps"
    images = {"task": {"name": "cifar10"}, "train": {"upstream_epochs": 0, "downstream_epochs": 30}}
    assert stage_totals(images) == "upstream as built, transfer 30 epochs, scratch 30 epochs"

"""Parallel joblib sweeps through the real CLI: one upstream training per sweep, resume after a kill.

Each sweep starts three Python processes (launcher and two loky workers), so these tests take minutes
on 2 cores and are marked slow (``-m slow``). The same cache and resume logic runs in-process in
test_scaling_cache.py and test_scaling_resume.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO, SMALL, run_cli
from tests.scaling_helpers import MARKER_ENV

ALPHAS = "transfer.alpha=0.25,0.5,0.75,1.0"


def sweep(tmp_path: Path, *extra: str):
    return run_cli(["-m", "hydra/launcher=ptlab_joblib", "hydra.launcher.n_jobs=2", *SMALL, ALPHAS, *extra], cwd=tmp_path)


def runs_by_stage(tmp_path: Path) -> dict[str, list]:
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("default").experiment_id
    found: dict[str, list] = {}
    for run in client.search_runs([experiment]):
        found.setdefault(run.data.tags["ptlab.stage"], []).append(run)
    return found


def finished(runs: list) -> set[str]:
    return {r.info.run_id for r in runs if r.info.status == "FINISHED"}


@pytest.mark.slow
def test_sweep_trains_upstream_once_and_rerun_trains_nothing(tmp_path: Path) -> None:
    first = sweep(tmp_path)
    assert first.returncode == 0, first.stderr[-3000:]
    stages = runs_by_stage(tmp_path)
    assert len(stages["upstream"]) == 1 and len(finished(stages["pipeline"])) == len(stages["pipeline"]) == 4
    assert sorted(r.data.tags["ptlab.cache"] for r in stages["pipeline"]) == ["hit", "hit", "hit", "miss"]
    assert {r.data.params["transfer.alpha"] for r in stages["pipeline"]} == {"0.25", "0.5", "0.75", "1.0"}
    assert len(list((tmp_path / ".ptlab_cache").glob("*.ptc"))) == 1

    again = sweep(tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("ptlab: skipped") == 4
    after = runs_by_stage(tmp_path)
    assert {stage: len(r) for stage, r in after.items()} == {stage: len(r) for stage, r in stages.items()}


@pytest.mark.slow
def test_sweep_killed_midway_reruns_only_the_missing_cells(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "fault"
    marker.write_text("sigterm")
    monkeypatch.setenv(MARKER_ENV, str(marker))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    faulty = ["engine=lightning", "trainer._target_=tests.scaling_helpers.FaultTrainer"]

    killed = sweep(tmp_path, *faulty)
    assert killed.returncode != 0 and not marker.exists()
    stages = runs_by_stage(tmp_path)
    done_before = finished(stages["pipeline"])
    statuses = [r.info.status for r in stages["pipeline"]]
    assert "KILLED" in statuses and len(done_before) < 4
    (victim,) = [r for r in stages["pipeline"] if r.info.status == "KILLED"]
    assert victim.data.tags["ptlab.error"] == "Terminated: signal SIGTERM"

    resumed = sweep(tmp_path, *faulty)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert resumed.stdout.count("ptlab: skipped") == len(done_before)
    after = runs_by_stage(tmp_path)
    done_after = finished(after["pipeline"])
    assert done_before < done_after and len(done_after) == 4
    assert len(after["pipeline"]) == len(stages["pipeline"]) + 4 - len(done_before)
    assert len(after["upstream"]) == 1  # stored before the kill, reused by every later cell
    hashes = [r.data.tags["ptlab.config_hash"] for r in after["pipeline"] if r.info.run_id in done_after]
    assert len(set(hashes)) == 4


def processes_in(folder: Path) -> list[int]:
    """Live processes whose working directory is ``folder`` (a sweep's parent and its workers)."""
    import os

    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if os.readlink(entry / "cwd") == str(folder):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "group", "code", "moment"),
    [
        ("SIGTERM", False, 143, "transfer"),
        ("SIGINT", True, 130, "transfer"),
        ("SIGTERM", True, 143, "transfer"),
        ("SIGINT", False, 130, "upstream"),
        ("SIGTERM", True, 143, "upstream"),
    ],
)
def test_a_stopped_joblib_sweep_leaves_nothing_running(tmp_path: Path, signum: str, group: bool, code: int, moment: str) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        sys.executable,
        "-m",
        "ptlab",
        "-m",
        "hydra/launcher=ptlab_joblib",
        "hydra.launcher.n_jobs=2",
        "engine=lightning",
        ALPHAS,
        "task.d=300",
        "train.upstream_steps=3000",
        "train.downstream_steps=3000",
        f"logger.tracking_uri={uri}",
        "cache.dir=cache",
    ]
    sweep_process = subprocess.Popen(
        args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    client = MlflowClient(uri)
    deadline = time.time() + 300
    while time.time() < deadline:  # until a stage of the moment's kind is training
        time.sleep(0.5)
        if (tmp_path / "mlflow.db").exists() and client.get_experiment_by_name("default") is not None:
            experiment = client.get_experiment_by_name("default").experiment_id
            if client.search_runs([experiment], f"tags.`ptlab.stage` = '{moment}'"):
                break
    if group:
        os.killpg(sweep_process.pid, getattr(signal, signum))
    else:
        sweep_process.send_signal(getattr(signal, signum))
    _, stderr = sweep_process.communicate(timeout=120)
    assert sweep_process.returncode == code, stderr[-3000:]
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr[-3000:]  # workers and trackers quiet
    time.sleep(1)
    assert processes_in(tmp_path) == []
    runs = client.search_runs([experiment])
    assert sum(r.info.status == "RUNNING" for r in runs) == 0
    done = {
        r.data.tags["ptlab.config_hash"] for r in runs if r.data.tags["ptlab.stage"] == "pipeline" and r.info.status == "FINISHED"
    }
    rerun = run_cli(args[3:], cwd=tmp_path)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert rerun.stdout.count("ptlab: skipped") == len(done)
    parents = client.search_runs([experiment], "tags.`ptlab.stage` = 'pipeline' and attributes.status = 'FINISHED'")
    assert len({r.data.tags["ptlab.config_hash"] for r in parents}) == 4 and len(parents) == 4

"""Signals to a batched gram sweep with worker processes: SIGTERM and SIGINT end it within 30 s with 143 / 130,
nothing left RUNNING, no worker alive, no traceback; SIGKILL of the parent takes its workers with it; a sweep that
ends normally prints no traceback either."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

SWEEP = [
    "-m",
    "engine=gram",
    "hydra/launcher=ptlab_gram",
    "hydra/sweeper=ptlab_batched",
    "hydra.launcher.workers=2",
    "hydra.launcher.max_cells=2",
    "task.d=300",
    "task.n1=200",
    "task.n2=40",
    "task.n_test=200",
    "train.upstream_steps=3000",
    "train.downstream_steps=1500",
    "model.width=40",
    "seed=range(0,12)",
]
"""Twelve one-cell chunks of several seconds each on two workers: a sweep that is still training when signalled."""


def start(tmp_path: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ptlab",
            *SWEEP,
            f"logger.tracking_uri=sqlite:///{tmp_path}/m.db",
            f"hydra.sweep.dir={tmp_path}/sweep",
            *extra,
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return any(_pgid(pid) == pgid for pid in _pids())


def gone(pgid: int, timeout: float) -> bool:
    """Whether every process of the group has ended within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.2)
    return not group_alive(pgid)


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def _pgid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(stat[2]) if stat[0] != "Z" else None


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def wait_for_workers(process: subprocess.Popen, timeout: float = 120) -> None:
    """Until the sweep's two workers exist (training has started)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        members = [pid for pid in _pids() if _pgid(pid) == process.pid and pid != process.pid]
        if len(members) >= 2:
            time.sleep(2)
            return
        assert process.poll() is None, process.communicate()
        time.sleep(0.5)
    raise AssertionError("the sweep's workers never started")


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_ends_the_sweep_cleanly(tmp_path: Path, signum: int, code: int) -> None:
    process = start(tmp_path)
    wait_for_workers(process)
    os.kill(process.pid, signum)
    sent = time.monotonic()
    out, err = process.communicate(timeout=60)
    assert time.monotonic() - sent < 30
    assert process.returncode == code, err[-2000:]
    assert "Traceback" not in err and "Traceback" not in out
    assert gone(process.pid, 10)
    client = MlflowClient(f"sqlite:///{tmp_path}/m.db")
    found = client.get_experiment_by_name("default")
    running = client.search_runs([found.experiment_id], "attributes.status = 'RUNNING'") if found else []
    assert not running
    answers = client.search_runs([found.experiment_id], "tags.`ptlab.stage` = 'sweep'") if found else []
    assert answers and all(run.info.status == "KILLED" for run in answers)  # the sweep's answer says it was stopped


def test_sigkill_of_the_parent_takes_its_workers(tmp_path: Path) -> None:
    process = start(tmp_path)
    wait_for_workers(process)
    os.kill(process.pid, signal.SIGKILL)
    process.communicate(timeout=30)
    assert gone(process.pid, 10)


def test_a_sweep_that_ends_normally_prints_no_traceback(tmp_path: Path) -> None:
    process = start(tmp_path, "train.upstream_steps=50", "train.downstream_steps=20", "seed=0,1,2,3")
    out, err = process.communicate(timeout=300)
    assert process.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "Terminated" not in err
    assert "4 cells finished, 0 skipped (already finished), 0 failed" in out


def test_sigkill_of_a_joblib_sweep_takes_its_workers(tmp_path: Path) -> None:
    """The joblib launcher's loky workers bind to the sweep's parent (``ptlab.processes.bind_sweep_worker``): a
    SIGKILL of the parent leaves no worker, no resource tracker and no new semaphore in /dev/shm."""
    shm = set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ptlab",
            "-m",
            "hydra/launcher=ptlab_joblib",
            "hydra.launcher.n_jobs=2",
            "engine=lightning",
            "task.d=200",
            "task.n1=100",
            "task.n2=20",
            "train.upstream_steps=3000",
            "train.downstream_steps=1000",
            "model.width=8",
            "seed=0,1,2,3",
            f"logger.tracking_uri=sqlite:///{tmp_path}/m.db",
            f"hydra.sweep.dir={tmp_path}/sweep",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 180
    while len([pid for pid in _pids() if _pgid(pid) == process.pid and b"popen_loky_posix" in _cmdline(pid)]) < 2:
        assert time.monotonic() < deadline and process.poll() is None, "the loky workers never started"
        time.sleep(0.5)
    time.sleep(10)  # the workers are inside their pipelines
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    assert gone(process.pid, 20)
    if shm:
        assert not {name for name in set(os.listdir("/dev/shm")) - shm if name.startswith(("sem.", "loky"))}

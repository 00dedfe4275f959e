"""Heartbeats of runs on shared stores, and the watcher that ends runs whose heartbeat stopped."""

from __future__ import annotations

import multiprocessing
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from mlflow.tracking import MlflowClient

from ptlab.tracking import heartbeat
from ptlab.tracking.heartbeat import HEARTBEAT_TAG, beat, beat_time, beats_on, start_beating, stop_beating, stopped
from ptlab.tracking.stale import ERROR_TAG, PROCESS_TAG, STOPPED, main, stopped_runs

ELSEWHERE = "another-host:4242:99:boot:4026531836"
"""A ``ptlab.process`` tag of a process on another host: this host cannot look it up."""


def fake_run(run_id: str, process: str | None, beat_value: str | None) -> SimpleNamespace:
    tags = {k: v for k, v in ((PROCESS_TAG, process), (HEARTBEAT_TAG, beat_value)) if v is not None}
    return SimpleNamespace(info=SimpleNamespace(run_id=run_id), data=SimpleNamespace(tags=tags))


def test_a_beat_is_stopped_after_four_missed_intervals() -> None:
    """``time:interval``; stopped once older than 4 intervals (here 120 s); anything else is no beat at all."""
    assert beat(30, now=1000) == "1000.0:30" and beat_time("1000.0:30") == (1000.0, 30.0)
    assert not stopped("1000.0:30", now=1119.9) and stopped("1000.0:30", now=1120.1)
    assert [beat_time(v) for v in ("", "1000", "a:b", "1000:0", "1:2:3")] == [None] * 5
    assert not stopped("garbage", now=1e12)
    assert beats_on("http://host:5000") and beats_on("postgresql://u@h/db") and not beats_on("sqlite:////x/mlflow.db")


def test_a_process_is_judged_by_the_newest_beat_of_any_of_its_runs() -> None:
    """Process A beat 10 s ago on one run (its other run's tag is old): alive. Process B's newest beat is 200 s old
    (interval 30): both its runs, the one without a tag included, are stopped. A run without a process tag is judged
    by its own beat; one with no beat is never judged. ``since`` (the watcher reached the store only then) restarts
    the count."""
    now = 10_000.0
    runs = [
        fake_run("a1", "A", beat(30, now - 500)),
        fake_run("a2", "A", beat(30, now - 10)),
        fake_run("b1", "B", beat(30, now - 200)),
        fake_run("b2", "B", None),
        fake_run("c", None, beat(30, now - 121)),
        fake_run("d", None, None),
    ]
    assert [run.info.run_id for run in stopped_runs(runs, now)] == ["b1", "b2", "c"]
    assert [run.info.run_id for run in stopped_runs(runs, now, since=now - 119)] == []
    assert [run.info.run_id for run in stopped_runs(runs, now, since=now - 121)] == ["b1", "b2", "c"]


def beats_of(client: MlflowClient, run_id: str) -> str:
    return client.get_run(run_id).data.tags[HEARTBEAT_TAG]


def test_the_thread_renews_the_first_open_run_of_a_store_and_stops_with_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every 0.2 s the beat of the first open run moves on; once it ended, the next open run gets the beats; with
    none open, no tag changes."""
    monkeypatch.setenv("PTLAB_HEARTBEAT_S", "0.2")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("beats")
    first, second = (client.create_run(experiment, tags={HEARTBEAT_TAG: beat(0.2)}).info.run_id for _ in range(2))
    created = beats_of(client, second)
    started = time.time()
    start_beating(uri, first)
    start_beating(uri, second)
    try:
        time.sleep(1.0)
        renewed = beat_time(beats_of(client, first))
        assert renewed is not None and renewed[0] > started and renewed[1] == 0.2
        assert beats_of(client, second) == created  # one run a store speaks for the process
        stop_beating(first)
        time.sleep(1.0)
        assert beat_time(beats_of(client, second))[0] > started
        stop_beating(second)
        time.sleep(0.3)
        last = (beats_of(client, first), beats_of(client, second))
        time.sleep(0.6)
        assert (beats_of(client, first), beats_of(client, second)) == last
    finally:
        stop_beating(first)
        stop_beating(second)


def _child_runs(queue: multiprocessing.Queue) -> None:
    queue.put(sum(len(runs) for runs in heartbeat._Beating.runs.values()))


def test_a_forked_child_does_not_speak_for_its_parents_runs(tmp_path: Path) -> None:
    start_beating(f"sqlite:///{tmp_path / 'x.db'}", "parent-run")
    try:
        queue = multiprocessing.get_context("fork").Queue()
        child = multiprocessing.get_context("fork").Process(target=_child_runs, args=(queue,))
        child.start()
        assert queue.get(timeout=30) == 0
        child.join(timeout=30)
    finally:
        stop_beating("parent-run")


def test_stale_ends_runs_whose_heartbeat_stopped_on_another_host(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Runs of a process on another host (the process tag cannot be looked up here): a beat 5 minutes old (interval
    30 s) is FAILED with ``ptlab.error=heartbeat stopped``, a beat of 10 s ago stays RUNNING, and so does a run with
    no beat (an older ptlab)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("other-host")
    old, fresh, none = (
        client.create_run(experiment, tags={PROCESS_TAG: f"{ELSEWHERE[:-1]}{i}", **tag}).info.run_id
        for i, tag in enumerate(({HEARTBEAT_TAG: beat(30, time.time() - 300)}, {HEARTBEAT_TAG: beat(30)}, {}))
    )
    assert main(["--tracking-uri", uri]) == 0
    assert "marked 0 vanished run(s) and 1 run(s) whose heartbeat stopped FAILED" in capsys.readouterr().out
    statuses = {run_id: client.get_run(run_id) for run_id in (old, fresh, none)}
    assert [statuses[r].info.status for r in (old, fresh, none)] == ["FAILED", "RUNNING", "RUNNING"]
    assert statuses[old].data.tags[ERROR_TAG] == STOPPED


def start_watcher(tracking_uri: str, every: float) -> subprocess.Popen:
    """``python -m ptlab.tracking.stale --watch`` on ``tracking_uri``, its output captured."""
    command = [sys.executable, "-m", "ptlab.tracking.stale", "--tracking-uri", tracking_uri, "--watch", str(every)]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_the_watcher_ends_a_run_once_its_beats_stop_and_exits_on_sigterm(tmp_path: Path) -> None:
    """``--watch 0.2``: a run of another host beating every 0.2 s that stops beating is FAILED within about 4 beats
    (0.8 s) plus a pass; the watcher prints one line for it and exits 0 on SIGTERM."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run_id = client.create_run(client.create_experiment("w"), tags={PROCESS_TAG: ELSEWHERE, HEARTBEAT_TAG: beat(0.2)})
    run_id = run_id.info.run_id
    watcher = start_watcher(uri, 0.2)
    try:
        for _ in range(8):  # beating: left alone
            client.set_tag(run_id, HEARTBEAT_TAG, beat(0.2))
            time.sleep(0.2)
        assert client.get_run(run_id).info.status == "RUNNING"
        stopped_at = time.monotonic()
        while client.get_run(run_id).info.status == "RUNNING" and time.monotonic() - stopped_at < 20:
            time.sleep(0.05)
        took = time.monotonic() - stopped_at
        assert client.get_run(run_id).info.status == "FAILED" and 0.6 < took < 10, took
    finally:
        watcher.send_signal(signal.SIGTERM)
        out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0 and err == "", err[-2000:]
    assert out.strip().splitlines() == [f"ptlab: marked 0 vanished run(s) and 1 run(s) whose heartbeat stopped FAILED in {uri}"]


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_watch_refuses_an_interval_that_is_not_a_positive_number(capsys: pytest.CaptureFixture, value: str) -> None:
    assert main(["--tracking-uri", "sqlite:///x.db", "--watch", value]) == 2
    err = capsys.readouterr().err
    assert err == f"ptlab: --watch={float(value):g} is not allowed: must be > 0 (seconds), or 0 for one pass\n"


@pytest.mark.parametrize(
    ("name", "value", "allowed"),
    [
        ("PTLAB_HEARTBEAT_S", "abc", "> 0"),
        ("PTLAB_HEARTBEAT_S", "0", "> 0"),
        ("PTLAB_HEARTBEAT_S", "inf", "> 0"),
        ("PTLAB_CLOSE_RETRY_S", "-1", ">= 0"),
        ("PTLAB_CLOSE_RETRY_S", "nan", ">= 0"),
    ],
)
def test_the_preflight_refuses_tracking_seconds_out_of_range(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, value: str, allowed: str
) -> None:
    """One line naming the variable, before anything is written; the names are the ones tracking reads."""
    from ptlab.cli import preflight
    from ptlab.store_checks import TRACKING_SECONDS_ENV
    from ptlab.tracking.faults import CLOSE_RETRY_ENV

    assert set(TRACKING_SECONDS_ENV) == {CLOSE_RETRY_ENV, heartbeat.HEARTBEAT_ENV}
    monkeypatch.setenv(name, value)
    line = preflight([f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"hydra.run.dir={tmp_path / 'out'}"])
    assert line == f"{name}={value!r} (environment) is not allowed: must be a number of seconds {allowed}"
    assert sorted(p.name for p in tmp_path.iterdir()) == []
    monkeypatch.setenv(name, "7.5")
    assert preflight([f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}", f"hydra.run.dir={tmp_path / 'out'}"]) is None

"""A config that a live process runs on a shared store is not run a second time, whatever the cache folder."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ptlab.errors import ConfigError
from ptlab.pipeline.resume import live_runs, wait_for_live_runs
from ptlab.tracking.base import CONFIG_HASH_TAG, STAGE_TAG
from ptlab.tracking.heartbeat import HEARTBEAT_TAG, beat
from ptlab.tracking.stale import PROCESS_TAG, process_tag

ELSEWHERE = "another-host:4242:99:boot:4026531836"
BEAT_S = 0.2


def store(tmp_path: Path) -> tuple[str, MlflowClient, str]:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    return uri, client, client.create_experiment("shared")


def pipeline_run(client: MlflowClient, experiment: str, digest: str = "h", process: str = ELSEWHERE, **tags: str) -> str:
    base = {STAGE_TAG: "pipeline", CONFIG_HASH_TAG: digest, PROCESS_TAG: process, HEARTBEAT_TAG: beat(BEAT_S)}
    return client.create_run(experiment, tags={**base, **tags}).info.run_id


def keep_beating(client: MlflowClient, run_id: str, seconds: float, then_finish: bool) -> threading.Thread:
    def beating() -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            client.set_tag(run_id, HEARTBEAT_TAG, beat(BEAT_S))
            time.sleep(BEAT_S / 2)
        if then_finish:
            client.set_terminated(run_id, "FINISHED")

    thread = threading.Thread(target=beating, daemon=True)
    thread.start()
    return thread


def test_only_a_beating_run_of_another_process_with_this_config_counts(tmp_path: Path) -> None:
    """Another config, a child stage, this process's own run, and a run of a process whose beat stopped are not waited
    for."""
    _, client, experiment = store(tmp_path)
    live = pipeline_run(client, experiment)
    pipeline_run(client, experiment, digest="other")
    pipeline_run(client, experiment, **{STAGE_TAG: "upstream"})
    pipeline_run(client, experiment, process=process_tag())
    pipeline_run(client, experiment, process="gone-host:7:1:boot:1", **{HEARTBEAT_TAG: beat(BEAT_S, time.time() - 60)})
    assert [run.info.run_id for run in live_runs(client, experiment, "h", time.time())] == [live]


@pytest.mark.parametrize("then_finish", [True, False])
def test_a_second_process_waits_until_the_first_finishes_or_stops_beating(tmp_path: Path, then_finish: bool) -> None:
    """The live run beats for 1 s, then FINISHES (the wait ends at once) or its process dies silently (the wait ends
    4 beats = 0.8 s after its last beat)."""
    uri, client, experiment = store(tmp_path)
    run_id = pipeline_run(client, experiment)
    started = time.monotonic()
    thread = keep_beating(client, run_id, 1.0, then_finish)
    wait_for_live_runs(uri, "shared", "h", timeout=30, poll=0.05)
    waited = time.monotonic() - started
    thread.join()
    assert (0.9 < waited < 3) if then_finish else (1.6 < waited < 5), waited


def test_a_run_that_stays_live_longer_than_the_timeout_is_one_line(tmp_path: Path) -> None:
    uri, client, experiment = store(tmp_path)
    run_id = pipeline_run(client, experiment)
    thread = keep_beating(client, run_id, 1.5, then_finish=True)
    with pytest.raises(ConfigError, match=rf"^cache.lock_timeout=0.5: run {run_id} of another process has run this config"):
        wait_for_live_runs(uri, "shared", "h", timeout=0.5, poll=0.05)
    thread.join()
    wait_for_live_runs(uri, "missing experiment", "h", timeout=0.1)  # nothing to wait for

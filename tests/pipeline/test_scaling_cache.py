"""Upstream cache, determinism and fault handling, run in-process on tiny synthetic configs."""

from __future__ import annotations

import multiprocessing
import sqlite3
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from ptlab.pipeline import run_pipeline
from ptlab.pipeline.cache import (
    CacheEntry,
    CorruptEntry,
    UpstreamCache,
    decode_entry,
    encode_entry,
    spec_key,
    synthetic_upstream_spec,
)
from ptlab.pipeline.resume import config_hash
from ptlab.spec import parse
from ptlab.tracking.faults import is_locked_error, prepare_sqlite_store, with_retries
from tests.scaling_helpers import MARKER_ENV, race_for_entry

FAULTY = "trainer._target_=tests.scaling_helpers.FaultTrainer"
LIGHTNING = "engine=lightning"


def runs(tracking_uri: str, stage: str) -> list:
    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.`ptlab.stage` = '{stage}'")


def stage_numbers(summary: dict) -> dict:
    return {stage: {k: v for k, v in summary[stage].items() if k != "plan"} for stage in ("upstream", "transfer", "scratch")}


def test_entry_roundtrip_and_corruption_detected() -> None:
    entry = CacheEntry({"weight": torch.randn(2, 3, 5)}, {"final": {"test_acc": 0.75}}, {"run_id": "abc"})
    blob = encode_entry(entry, {"stage": "x"})
    back = decode_entry(blob)
    assert torch.equal(back.state_dict["weight"], entry.state_dict["weight"])
    assert back.result == {"final": {"test_acc": 0.75}} and back.source == {"run_id": "abc"}
    flipped = bytearray(blob)
    flipped[-10] ^= 0xFF
    with pytest.raises(CorruptEntry, match="checksum"):
        decode_entry(bytes(flipped))
    with pytest.raises(CorruptEntry, match="truncated"):
        decode_entry(blob[:-100])
    with pytest.raises(CorruptEntry, match="header"):
        decode_entry(b"garbage")


def test_upstream_key_ignores_downstream_settings(make_cfg, tmp_path: Path) -> None:
    base = parse(make_cfg(f"cache.dir={tmp_path}"))
    key = spec_key(synthetic_upstream_spec(base, "gram"))
    for override in ("transfer.alpha=0.25", "noise.sigma_p2=3.0", "task.n2=15", "trainer.devices=[0]"):
        assert spec_key(synthetic_upstream_spec(parse(make_cfg(override)), "gram")) == key, override
    for override in (
        "noise.sigma_p1=3.0",
        "task.n1=41",
        "seed=1",
        "train.upstream_steps=61",
        "train.dtype=float64",
        "model.width=9",
    ):
        assert spec_key(synthetic_upstream_spec(parse(make_cfg(override)), "gram")) != key, override
    assert config_hash(parse(make_cfg("trainer.devices=[1]"))) == config_hash(base)
    assert config_hash(parse(make_cfg("logger.experiment_name=other", "cache.enabled=false"))) == config_hash(base)
    assert config_hash(parse(make_cfg("transfer.alpha=0.25"))) != config_hash(base)


def test_hit_miss_off_give_identical_summaries_and_truncated_entry_is_retrained(
    make_cfg, tracking_uri: str, tmp_path: Path
) -> None:
    cache = f"cache.dir={tmp_path / 'cache'}"
    miss = run_pipeline(make_cfg(cache), tmp_path / "a")
    hit = run_pipeline(make_cfg(cache, "transfer.alpha=0.25"), tmp_path / "b")
    hit_same = run_pipeline(make_cfg(cache), tmp_path / "c")
    off = run_pipeline(make_cfg(cache, "cache.enabled=false"), tmp_path / "d")
    assert stage_numbers(miss) == stage_numbers(hit_same) == stage_numbers(off)
    assert hit["upstream"] == miss["upstream"] and hit["transfer"] != miss["transfer"]

    upstream = runs(tracking_uri, "upstream")
    assert len(upstream) == 2  # the miss and the cache-off run
    pipelines = {r.info.run_id: r.data.tags for r in runs(tracking_uri, "pipeline")}
    assert [pipelines[s["mlflow"]["parent_run_id"]]["ptlab.cache"] for s in (miss, hit, hit_same, off)] == [
        "miss",
        "hit",
        "hit",
        "off",
    ]
    trained_by = pipelines[hit["mlflow"]["parent_run_id"]]["ptlab.cache.upstream_run_id"]
    assert trained_by == next(r.info.run_id for r in upstream if r.data.tags.get("ptlab.cache") == "miss")

    (entry,) = (tmp_path / "cache").glob("*.ptc")
    entry.write_bytes(entry.read_bytes()[: entry.stat().st_size // 2])
    again = run_pipeline(make_cfg(cache), tmp_path / "e")
    assert pipelines.get(again["mlflow"]["parent_run_id"]) is None
    tags = MlflowClient(tracking_uri).get_run(again["mlflow"]["parent_run_id"]).data.tags
    assert tags["ptlab.cache"] == "miss" and len(runs(tracking_uri, "upstream")) == 3
    assert stage_numbers(again) == stage_numbers(miss)
    decode_entry(entry.read_bytes())  # rewritten whole


def test_two_processes_racing_for_one_entry_train_it_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    counter = tmp_path / "count.txt"
    workers = [
        ctx.Process(target=race_for_entry, args=(str(tmp_path / "cache"), str(counter), barrier, results)) for _ in range(2)
    ]
    for worker in workers:
        worker.start()
    outcomes = [results.get(timeout=120) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    assert counter.read_text().splitlines() == ["trained"]
    assert sorted(hit for hit, _ in outcomes) == [False, True]
    assert outcomes[0][1] == outcomes[1][1] == [[0.0, 1.0, 2.0], [3.0, 4.0, 5.0]]
    assert UpstreamCache(tmp_path / "cache").load(spec_key({"stage": "race"})) is not None


@pytest.mark.parametrize(
    ("action", "status", "error"),
    [
        ("raise", "FAILED", "RuntimeError: injected fault"),
        ("sigterm", "KILLED", "Terminated: signal SIGTERM"),
    ],
)
def test_fault_marks_runs_and_stores_nothing_half_done(
    make_cfg, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, action: str, status: str, error: str
) -> None:
    marker = tmp_path / "fault"
    marker.write_text(action)
    monkeypatch.setenv(MARKER_ENV, str(marker))
    cfg = make_cfg(f"cache.dir={tmp_path / 'cache'}", FAULTY, LIGHTNING)
    with pytest.raises(RuntimeError if action == "raise" else KeyboardInterrupt):
        run_pipeline(cfg, tmp_path / "out")
    (parent,) = runs(tracking_uri, "pipeline")
    assert parent.info.status == status and parent.data.tags["ptlab.error"] == error
    assert {
        r.data.tags["ptlab.stage"]: r.info.status for r in runs(tracking_uri, "upstream") + runs(tracking_uri, "transfer")
    } == {"upstream": "FINISHED", "transfer": status}
    assert len(list((tmp_path / "cache").glob("*.ptc"))) == 1  # the upstream finished before the fault
    assert not (tmp_path / "out" / "summary.json").exists()


def test_sqlite_store_is_prepared_in_wal_mode_and_locked_calls_are_retried(tracking_uri: str) -> None:
    assert prepare_sqlite_store(tracking_uri) == "wal"
    assert prepare_sqlite_store(tracking_uri) == "wal"
    assert MlflowClient(tracking_uri).search_experiments()  # tables exist (the Default experiment)
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise sqlite3.OperationalError("database is locked")
        return "ok"

    assert with_retries(flaky, base_delay=0.001)() == "ok" and len(calls) == 3
    assert not is_locked_error(ValueError("database is locked"))

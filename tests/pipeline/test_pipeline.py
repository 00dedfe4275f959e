"""The synthetic pipeline end to end: summary.json, pairing, determinism, and the MLflow layout."""

import json

import pytest
import torch
from mlflow.tracking import MlflowClient

from ptlab.engines.gram import GramEngine
from ptlab.modules.full_batch_gd import FullBatchGD
from ptlab.pipeline import run_pipeline
from ptlab.pipeline.synthetic import build_model
from ptlab.spec import parse


def strip_run_ids(summary):
    return {k: v for k, v in summary.items() if k != "mlflow"}


def test_summary_json_has_every_stage_and_the_mlflow_ids(make_cfg, tmp_path):
    summary = run_pipeline(make_cfg(), tmp_path / "out")
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    for stage in ("upstream", "transfer", "scratch"):
        assert set(written[stage]) >= {"train_acc", "test_acc"}
        assert 0.0 <= written[stage]["test_acc"] <= 1.0
    assert set(written["mlflow"]) == {"tracking_uri", "experiment_id", "parent_run_id"}
    plan = written["transfer"]["plan"]
    assert [row["copied"] for row in plan] == [4, 4]  # round(0.5 * 8) per output


def test_same_seed_gives_identical_summaries_and_another_seed_differs(make_cfg, tmp_path):
    first = run_pipeline(make_cfg("seed=3"), tmp_path / "a")
    second = run_pipeline(make_cfg("seed=3"), tmp_path / "b")
    other = run_pipeline(make_cfg("seed=4"), tmp_path / "c")
    assert strip_run_ids(first) == strip_run_ids(second)
    assert first["mlflow"]["parent_run_id"] != second["mlflow"]["parent_run_id"]
    assert strip_run_ids(first) != strip_run_ids(other)


def test_transfer_and_scratch_start_from_the_same_fresh_filters(make_cfg):
    cfg = parse(make_cfg("seed=5"))
    a, b = build_model(cfg, "downstream"), build_model(cfg, "downstream")
    up = build_model(cfg, "upstream")
    assert torch.equal(a.weight, b.weight)
    assert not torch.equal(a.weight, up.weight)


def test_mlflow_holds_one_parent_with_three_children(make_cfg, tmp_path, tracking_uri):
    summary = run_pipeline(make_cfg("logger.experiment_name=layout"), tmp_path)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("layout")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and parents[0].info.run_id == summary["mlflow"]["parent_run_id"]
    assert sorted(r.data.tags["ptlab.stage"] for r in children) == ["scratch", "transfer", "upstream"]
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in runs)
    cell = parents[0].info.run_name
    assert cell.endswith("seed=0") and "tracking_uri" not in cell and "experiment_name" not in cell
    assert sorted(r.info.run_name for r in children) == [f"{s} | {cell}" for s in ("scratch", "transfer", "upstream")]
    assert {r.data.tags["ptlab.cell"] for r in runs} == {cell}
    assert "transfer - scratch test accuracy" in parents[0].data.tags["mlflow.note.content"]
    view = json.loads(client.get_experiment(experiment.experiment_id).tags["mlflow.sharedViewState.ptlab"])
    assert view["selectedColumns"][:3] == ["metrics.`transfer_test_acc`", "metrics.`scratch_test_acc`", "metrics.`transfer_gain`"]
    assert {"transfer_test_acc", "scratch_test_acc", "transfer_gain"} <= set(parents[0].data.metrics)
    shown = {c.removeprefix("metrics.`").rstrip("`") for c in view["selectedColumns"] if c.startswith("metrics.")}
    assert shown <= set(parents[0].data.metrics)  # every metric column of the view is one a pipeline logs
    assert not any(
        k.startswith(("train.batch_size", "train.momentum", "train.optimizer", "train.upstream_epochs"))
        for k in parents[0].data.params
    )
    parent = parents[0]
    assert parent.data.params["task.d"] == "200" and parent.data.params["transfer.alpha"] == "0.5"
    assert parent.data.params["train.upstream_steps"] == "60"
    assert parent.data.metrics["transfer_test_acc"] == pytest.approx(summary["transfer"]["test_acc"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "summary.json"} <= artifacts
    transfer_run = next(r for r in children if r.data.tags["ptlab.stage"] == "transfer")
    assert "transfer_plan.json" in {a.path for a in client.list_artifacts(transfer_run.info.run_id)}
    history = client.get_metric_history(transfer_run.info.run_id, "loss/train")
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == list(range(31))
    assert transfer_run.data.metrics["summary/test_acc"] == pytest.approx(summary["transfer"]["test_acc"])


def test_transfer_none_trains_only_scratch(make_cfg, tmp_path, tracking_uri):
    summary = run_pipeline(make_cfg("transfer=none", "logger.experiment_name=scratch_only"), tmp_path)
    assert summary["upstream"] is None and summary["transfer"] is None
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("scratch_only").experiment_id])
    assert sorted(r.data.tags["ptlab.stage"] for r in runs if "mlflow.parentRunId" in r.data.tags) == ["scratch"]


def test_a_failure_after_start_marks_runs_failed_never_running(make_cfg, tmp_path, tracking_uri, monkeypatch):
    real_train = GramEngine.train_stage

    def failing_train(self, stage):
        if stage.name == "transfer":
            raise RuntimeError("boom in transfer")
        return real_train(self, stage)

    monkeypatch.setattr(GramEngine, "train_stage", failing_train)
    with pytest.raises(RuntimeError, match="boom"):
        run_pipeline(make_cfg("logger.experiment_name=fails"), tmp_path)
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("fails").experiment_id])
    statuses = {r.data.tags["ptlab.stage"] if "mlflow.parentRunId" in r.data.tags else "parent": r.info.status for r in runs}
    assert statuses == {"parent": "FAILED", "upstream": "FINISHED", "transfer": "FAILED"}
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    assert parent.data.tags["ptlab.error"] == "RuntimeError: boom in transfer"


def test_a_failure_inside_lightning_fit_marks_the_child_failed(make_cfg, tmp_path, tracking_uri, monkeypatch):
    def broken_step(self, batch, batch_idx):
        raise ValueError("nan loss")

    monkeypatch.setattr(FullBatchGD, "training_step", broken_step)
    with pytest.raises(ValueError, match="nan loss"):
        run_pipeline(make_cfg("engine=lightning", "logger.experiment_name=fit_fails"), tmp_path)
    client = MlflowClient(tracking_uri)
    runs = client.search_runs([client.get_experiment_by_name("fit_fails").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FAILED"}

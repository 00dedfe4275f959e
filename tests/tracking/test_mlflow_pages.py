"""MLflow pages that read in the right order: curve groups first, provenance on the parent, a description that
leads with the gain and the prediction, run names that say which model is which, rounded finals, an ML experiment."""

from __future__ import annotations

import subprocess

import pytest
from mlflow.tracking import MlflowClient

from ptlab.pipeline import run_pipeline
from ptlab.pipeline.record import cell_name, description, exact, prediction_line
from ptlab.tracking.base import metric_name
from ptlab.tracking.mlflow import EXPERIMENT_KIND_TAG, ML_EXPERIMENT, result_view_url
from tests.conftest import REPO


@pytest.mark.parametrize(
    "key,name",
    [
        ("train/loss", "loss/train"),
        ("test/loss", "loss/test"),
        ("train/acc", "acc/train"),
        ("test/acc", "acc/test"),
        ("decomp/noise_max", "signal_noise/noise_max"),
        ("final/test_acc", "summary/test_acc"),
        ("lr-SGD", "optimizer/lr-SGD"),
        ("transfer_gain", "transfer_gain"),
        ("theory/gamma", "theory/gamma"),
    ],
)
def test_metric_names_group_train_and_test_under_one_prefix(key, name):
    assert metric_name(key) == name


def test_a_pipelines_pages_in_mlflow(make_cfg, tmp_path, tracking_uri):
    summary = run_pipeline(make_cfg("logger.experiment_name=pages"), tmp_path)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("pages")
    assert experiment.tags[EXPERIMENT_KIND_TAG] == ML_EXPERIMENT
    runs = {r.data.tags["ptlab.stage"]: r for r in client.search_runs([experiment.experiment_id])}
    child = runs["transfer"]
    # MLflow's run page draws one section per name prefix, in name order: the curves first.
    sections = sorted({key.split("/", 1)[0] for key in child.data.metrics})
    assert sections == ["acc", "loss", "signal_noise", "summary"]
    assert {"acc/train", "acc/test", "loss/train"} <= set(child.data.metrics)
    steps = [m.step for m in client.get_metric_history(child.info.run_id, "acc/test")]
    assert steps == sorted(steps) and len(steps) > 2
    parent = runs["pipeline"]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    for run in runs.values():
        assert run.data.tags["mlflow.source.git.commit"] == commit
        assert run.data.tags["mlflow.user"] and run.data.tags["mlflow.source.name"]
    note = parent.data.tags["mlflow.note.content"]
    gain = 100 * (summary["transfer"]["test_acc"] - summary["scratch"]["test_acc"])
    first, second, third = (line.rstrip() for line in note.splitlines()[:3])  # markdown breaks: two trailing spaces
    assert first.startswith(f"**transfer - scratch: {gain:+.1f} points**")
    assert second == (
        f"**theory: {summary['theory']['predicted']}** (d / D* = "
        f"{summary['theory']['d_over_threshold']:.3g}, Gamma = {summary['theory']['gamma']:.3g})"
    )
    p = summary["prediction"]  # the phase model's line follows, with its confidence band's held-out agreement
    band = f"; held-out cells this confident agreed {100 * p['held_out_agreement_at_confidence']:.0f}%"
    assert third == f"**phase model: {p['outcome']} (confidence {p['confidence']:.2f}{band})**"
    assert "transfer - scratch test accuracy" in note  # the stage table follows
    assert len([key for key in parent.data.tags if key.startswith("ptlab.")]) <= 8  # was 20 with a tag per choice
    assert {"engine=gram", "task=synthetic", "model=toy_cnn"} <= set(parent.data.tags["ptlab.choices"].split())
    assert all(len(repr(value)) <= 10 for key, value in parent.data.metrics.items() if key.startswith("theory/"))


def test_description_without_theory_leads_with_the_gain():
    summary = {"transfer": {"train_acc": 1.0, "test_acc": 41 / 45}, "scratch": {"train_acc": 1.0, "test_acc": 0.8}}
    assert description(summary).splitlines()[0] == "**transfer - scratch: +11.1 points** (test accuracy 91.1% vs 80.0%)"


def test_the_prediction_line_without_a_recorded_band():
    prediction = {"outcome": "transfer_helps", "confidence": 0.8349, "held_out_agreement_at_confidence": None}
    assert prediction_line(prediction) == "phase model: transfer_helps (confidence 0.83)"
    prediction["held_out_agreement_at_confidence"] = 0.931
    assert (
        prediction_line(prediction) == "phase model: transfer_helps (confidence 0.83; held-out cells this confident agreed 93%)"
    )


def test_finals_are_rounded_for_display():
    assert exact(41 / 45) == 0.911111 and exact(0.5) == 0.5 and exact(2651.4285714285716) == 2651.43
    assert exact(0.9089999794960022) == 0.909  # a float32 accuracy: the decimal it stands for


def test_run_names_say_which_model_is_upstream_and_which_downstream():
    overrides = [
        "model=timm",
        "upstream_model=timm",
        "upstream_model.name=resnet34d",
        "model.name=resnet18d",
        "transfer.alpha=0.5",
    ]
    assert cell_name(overrides, 0) == "upstream=resnet34d downstream=resnet18d alpha=0.5 seed=0"
    assert (
        cell_name(["upstream_model=resnet34_small", "model.width=0.5"], 1)
        == "upstream=resnet34_small downstream.width=0.5 seed=1"
    )
    assert cell_name(["task.u_norm=0.0", "model.width=8"], 2) == "u_norm=0.0 width=8 seed=2"  # one model config


def test_the_printed_link_opens_the_model_training_pages():
    assert result_view_url("7") == (
        "http://127.0.0.1:5000/#/experiments/7/runs?viewStateShareKey=ptlab&workflowType=machine_learning"
    )

"""Signal learning / noise memorisation: hand-computed metrics, the training callback, the pipeline."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from mlflow.tracking import MlflowClient

from ptlab.data import Directions, FullBatchDataModule, make_synthetic_data
from ptlab.models import TwoLayerReLUCNN
from ptlab.modules import FullBatchGD
from ptlab.modules.callbacks import SignalNoiseDecomposition
from ptlab.modules.decomposition import METRIC_NAMES, decomposition_metrics
from ptlab.pipeline import run_pipeline


def axis_directions(d: int = 6) -> Directions:
    """u = 2 e0, v1 = 3 e1, v2 = 3 e2: projections can be read off the weight entries."""
    basis = torch.eye(d, 3)
    return Directions(u=2 * basis[:, 0], v1=3 * basis[:, 1], v2=3 * basis[:, 2], basis=basis)


def test_metrics_match_hand_computation() -> None:
    weight = torch.zeros(2, 2, 6)
    weight[0, 0] = torch.tensor([1.0, 0.0, 0.5, 2.0, 0.0, 0.0])  # j=+1, r=0
    weight[0, 1] = torch.tensor([-1.0, 1.0, 0.0, 0.0, 1.0, 0.0])  # j=+1, r=1
    weight[1, 0] = torch.tensor([-2.0, 0.0, 0.0, 0.0, 0.0, 3.0])  # j=-1, r=0
    weight[1, 1] = torch.tensor([0.5, 0.0, -1.0, 1.0, 0.0, 0.0])  # j=-1, r=1
    noise = torch.tensor(
        [
            [0.0, 0.0, 0.0, 1.0, 0.0, 0.0],  # xi_0, y=+1
            [0.0, 0.0, 0.0, 0.0, 2.0, 1.0],
        ]
    )  # xi_1, y=-1
    labels = torch.tensor([1.0, -1.0])
    metrics = decomposition_metrics(weight, axis_directions(), noise, labels)
    assert list(metrics) == list(METRIC_NAMES)
    # j <w, u> with u = 2 e0: +1*2, +1*-2, -1*-4, -1*1 -> [2, -2, 4, -1]
    assert metrics["decomp/signal_u_max"] == 4.0 and metrics["decomp/signal_u_mean"] == pytest.approx(0.75)
    # j <w, v1> with v1 = 3 e1: [0, 3, 0, 0]
    assert metrics["decomp/signal_v1_max"] == 3.0 and metrics["decomp/signal_v1_mean"] == pytest.approx(0.75)
    # j <w, v2> with v2 = 3 e2: [1.5, 0, 0, 3]
    assert metrics["decomp/signal_v2_max"] == 3.0 and metrics["decomp/signal_v2_mean"] == pytest.approx(1.125)
    # own output of xi_0 is +1: <w_{+1,r}, xi_0> = [2, 0]; of xi_1 is -1: <w_{-1,r}, xi_1> = [3, 0]
    assert metrics["decomp/noise_max"] == 3.0 and metrics["decomp/noise_mean"] == pytest.approx(1.25)
    norms = [math.sqrt(1 + 0.25 + 4), math.sqrt(3), math.sqrt(13), math.sqrt(0.25 + 1 + 1)]
    assert metrics["decomp/filter_norm_mean"] == pytest.approx(sum(norms) / 4)

    unlabelled = decomposition_metrics(weight, axis_directions(), noise)
    # every (j, r, i): xi_0 -> [2, 0, 0, 1], xi_1 -> [0, 2, 3, 0]
    assert unlabelled["decomp/noise_max"] == 3.0 and unlabelled["decomp/noise_mean"] == pytest.approx(1.0)


def test_zero_universal_signal_and_no_noise_patches() -> None:
    directions = axis_directions()
    directions = Directions(u=torch.zeros(6), v1=directions.v1, v2=directions.v2, basis=directions.basis)
    metrics = decomposition_metrics(torch.randn(2, 3, 6), directions, torch.zeros(0, 6), torch.zeros(0))
    assert metrics["decomp/signal_u_max"] == 0.0 and metrics["decomp/signal_u_mean"] == 0.0
    assert math.isnan(metrics["decomp/noise_max"]) and math.isnan(metrics["decomp/noise_mean"])


def test_callback_records_every_eval_step_and_the_final_model() -> None:
    data = make_synthetic_data(
        d=100, n1=10, n2=16, n_test=20, u_norm=1.0, v_norm=2.0, label_noise=0.0, sigma_p1=1.0, sigma_p2=1.0, seed=0
    )
    train = data.task2_train
    torch.manual_seed(0)
    model = TwoLayerReLUCNN(100, width=4, init_std=0.01)
    initial = decomposition_metrics(model.weight, data.directions, train.noise, train.y)
    module = FullBatchGD(model, lr=0.1, eval_every=5)
    trainer = pl.Trainer(
        max_steps=12,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[SignalNoiseDecomposition(data.directions, train.noise, train.y, every=5)],
    )
    trainer.fit(module, datamodule=FullBatchDataModule(train.x, train.y, 12))
    curve = module.curves["decomp/signal_v2_max"]
    assert [step for step, _ in curve] == [0, 5, 10, 12]
    assert curve[0][1] == pytest.approx(initial["decomp/signal_v2_max"])
    final = decomposition_metrics(model.weight, data.directions, train.noise, train.y)
    assert module.curves["decomp/noise_max"][-1][1] == pytest.approx(final["decomp/noise_max"])
    # GD learns the task signal and memorises noise.
    assert curve[-1][1] > curve[0][1] and final["decomp/noise_mean"] > initial["decomp/noise_mean"]
    with pytest.raises(ValueError, match="every=0"):
        SignalNoiseDecomposition(data.directions, train.noise, every=0)


def test_pipeline_logs_decomposition_theory_and_figure(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(
        "task.u_norm=2.0",
        "task.v_norm=2.0",
        "model.width=8",
        "train.upstream_steps=100",
        "transfer.alpha=0.5",
        "logger.experiment_name=decomp",
        "logger.figures=true",
    )
    summary = run_pipeline(cfg, tmp_path / "out")
    client = MlflowClient(summary["mlflow"]["tracking_uri"])
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert {"threshold_term", "gamma", "negative_transfer_ratio", "predicted"} <= set(summary["theory"])
    assert parent.data.params["theory.predicted"] == summary["theory"]["predicted"]
    # MLflow shows 6 significant digits (record.exact)
    assert parent.data.metrics["theory/threshold_term"] == pytest.approx(summary["theory"]["threshold_term"], rel=1e-5)
    assert "decomposition.png" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    no_figure = run_pipeline(make_cfg("logger.experiment_name=decomp_off"), tmp_path / "off")  # the default
    assert "decomposition.png" not in {a.path for a in client.list_artifacts(no_figure["mlflow"]["parent_run_id"])}

    children = {
        run.data.tags["ptlab.stage"]: run
        for run in client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    }
    assert set(children) == {"upstream", "transfer", "scratch"}
    history = {
        stage: {m.step: m.value for m in client.get_metric_history(run.info.run_id, "signal_noise/signal_v1_max")}
        for stage, run in children.items()
    }
    assert sorted(history["transfer"]) == list(range(0, cfg.train.downstream_steps + 1, cfg.train.eval_every))
    # What transfer carries: at step 0 the copied filters already hold the upstream's v1 learning, the
    # scratch model (same fresh filters elsewhere) does not.
    assert history["transfer"][0] > 2 * history["scratch"][0]
    assert history["transfer"][0] <= history["upstream"][cfg.train.upstream_steps] + 1e-6

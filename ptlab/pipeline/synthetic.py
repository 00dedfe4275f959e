"""The synthetic pipeline: upstream on task 1 -> transfer on task 2 -> scratch on task 2 (paired)."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from ptlab.data import FullBatchDataModule, PatchData, SyntheticTransferData, make_synthetic_data
from ptlab.distributed import FinalToMainProcess, restore_final
from ptlab.modules import FullBatchGD
from ptlab.modules.decomposition import SignalNoiseDecomposition, decomposition_figure
from ptlab.pipeline.cache import cached_upstream
from ptlab.seeding import derive_seed, torch_seed
from ptlab.theory import predict_from_config
from ptlab.tracking import NullTracker, PipelineTracker
from ptlab.transfer import ParameterTransfer

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def make_data(cfg: DictConfig) -> SyntheticTransferData:
    """The seeded synthetic data of a pipeline config."""
    task, noise = cfg.task, cfg.noise
    return make_synthetic_data(
        d=task.d, n1=task.n1, n2=task.n2, n_test=task.n_test, u_norm=task.u_norm, v_norm=task.v_norm,
        label_noise=task.label_noise, sigma_p1=noise.sigma_p1, sigma_p2=noise.sigma_p2,
        seed=derive_seed(cfg.seed, "data"), dtype=DTYPES[cfg.train.dtype])


def build_model(model_cfg: DictConfig, cfg: DictConfig, stream: str) -> nn.Module:
    """Instantiate a synthetic model with its init drawn from the ``stream`` sub-seed of ``cfg.seed``.

    Transfer and scratch both use the ``downstream`` stream, so their fresh filters are identical.
    """
    with torch_seed(derive_seed(cfg.seed, stream)):
        model = instantiate(model_cfg, input_dim=cfg.task.d)
    return model.to(DTYPES[cfg.train.dtype])


def fit_stage(cfg: DictConfig, tracker: PipelineTracker | NullTracker, stage: str, model: nn.Module,
              train: PatchData, test: PatchData, steps: int, callbacks: list[pl.Callback] | None = None,
              ) -> FullBatchGD:
    """Train ``model`` by full-batch GD for ``steps`` steps as the stage ``stage`` (its own child run)."""
    module = FullBatchGD(model, lr=cfg.train.lr, eval_sets={"test": (test.x, test.y)},
                         eval_every=cfg.train.eval_every)
    logger = tracker.child_logger(stage)
    extra = {"precision": "64-true"} if cfg.train.dtype == "float64" else {}
    trainer: pl.Trainer = instantiate(cfg.trainer, max_steps=steps, max_epochs=1, limit_val_batches=0,
                                      logger=logger if logger is not None else False,
                                      callbacks=[*(callbacks or []), FinalToMainProcess()],
                                      use_distributed_sampler=False, **extra)
    trainer.fit(module, datamodule=FullBatchDataModule(train.x, train.y, steps))
    restore_final(trainer, module)
    return module


def stage_result(module: FullBatchGD) -> dict[str, Any]:
    """The final numbers of a trained stage, as written to summary.json."""
    final = module.final
    return {"train_acc": final["train_acc"], "test_acc": final["test_acc"], "train_loss": final["train_loss"]}


def log_theory(cfg: DictConfig, tracker: PipelineTracker | NullTracker) -> dict[str, Any]:
    """The theory's prediction for ``cfg`` (ptlab.theory), logged on the parent run: categorical
    fields as ``theory.<name>`` params, numbers as ``theory/<name>`` metrics."""
    prediction = predict_from_config(cfg)
    tracker.log_params({f"theory.{k}": v for k, v in prediction.labels().items()})
    tracker.log_metrics({f"theory/{k}": v for k, v in prediction.metrics().items()})
    return prediction.as_dict()


def decomposition_callback(cfg: DictConfig, data: SyntheticTransferData, train: PatchData,
                           ) -> SignalNoiseDecomposition:
    """Records signal learning and noise memorisation on ``train``'s noise patches every eval step."""
    return SignalNoiseDecomposition(data.directions, train.noise, train.y, every=cfg.train.eval_every)


def log_decomposition_figure(tracker: PipelineTracker | NullTracker, fitted: dict[str, FullBatchGD],
                             title: str) -> None:
    """Draw every stage's decomposition curves and log the PNG as ``decomposition.png`` on the parent run."""
    if isinstance(tracker, NullTracker):
        return
    figure = decomposition_figure({stage: module.curves for stage, module in fitted.items()}, title)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "decomposition.png"
        figure.savefig(path, dpi=110)
        tracker.log_artifact(path)


def run_synthetic(cfg: DictConfig, tracker: PipelineTracker | NullTracker) -> dict[str, Any]:
    """Algorithms 1 and 2 on one seed; returns the per-stage results."""
    if cfg.engine == "gram":
        from ptlab.engines.gram import run_gram  # the engine builds on this module's data and models

        return run_gram(cfg, tracker)
    data = make_data(cfg)
    results: dict[str, Any] = {"upstream": None, "transfer": None}
    stages: dict[str, FullBatchGD] = {}
    if cfg.transfer.kind != "none":
        upstream = build_model(cfg.upstream_model, cfg, "upstream")
        fitted = cached_upstream(cfg, tracker, upstream, lambda: fit_stage(
            cfg, tracker, "upstream", upstream, data.task1_train, data.task1_test, cfg.train.upstream_steps,
            [decomposition_callback(cfg, data, data.task1_train)]))
        stages["upstream"] = fitted
        results["upstream"] = stage_result(fitted)

        transfer = ParameterTransfer(upstream, alpha=cfg.transfer.alpha, selection=cfg.transfer.selection,
                                     seed=derive_seed(cfg.seed, "selection"))
        fitted = fit_stage(cfg, tracker, "transfer", build_model(cfg.model, cfg, "downstream"),
                           data.task2_train, data.task2_test, cfg.train.downstream_steps,
                           [transfer, decomposition_callback(cfg, data, data.task2_train)])
        stages["transfer"] = fitted
        plan = [row.as_dict() for row in transfer.plan]
        results["transfer"] = {**stage_result(fitted), "plan": plan}
        tracker.log_dict(plan, "transfer_plan.json", stage="transfer")

    fitted = fit_stage(cfg, tracker, "scratch", build_model(cfg.model, cfg, "downstream"),
                       data.task2_train, data.task2_test, cfg.train.downstream_steps,
                       [decomposition_callback(cfg, data, data.task2_train)])
    stages["scratch"] = fitted
    results["scratch"] = stage_result(fitted)
    log_decomposition_figure(tracker, stages, f"seed {cfg.seed}: d={cfg.task.d}, N1={cfg.task.n1}, "
                             f"N2={cfg.task.n2}, ||u||={cfg.task.u_norm}, sigma_p1={cfg.noise.sigma_p1}")
    return results

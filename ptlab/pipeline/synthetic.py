"""The synthetic pipeline: upstream on task 1 -> transfer on task 2 -> scratch on task 2 (paired)."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn

from ptlab.data import FullBatchDataModule, PatchData, SyntheticTransferData, make_synthetic_data
from ptlab.modules import FullBatchGD
from ptlab.seeding import derive_seed, torch_seed
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
                                      callbacks=callbacks or [], **extra)
    trainer.fit(module, datamodule=FullBatchDataModule(train.x, train.y, steps))
    return module


def stage_result(module: FullBatchGD) -> dict[str, Any]:
    """The final numbers of a trained stage, as written to summary.json."""
    final = module.final
    return {"train_acc": final["train_acc"], "test_acc": final["test_acc"], "train_loss": final["train_loss"]}


def run_synthetic(cfg: DictConfig, tracker: PipelineTracker | NullTracker) -> dict[str, Any]:
    """Algorithms 1 and 2 on one seed; returns the per-stage results."""
    data = make_data(cfg)
    results: dict[str, Any] = {"upstream": None, "transfer": None}
    if cfg.transfer.kind != "none":
        upstream = build_model(cfg.upstream_model, cfg, "upstream")
        fitted = fit_stage(cfg, tracker, "upstream", upstream, data.task1_train, data.task1_test,
                           cfg.train.upstream_steps)
        results["upstream"] = stage_result(fitted)

        transfer = ParameterTransfer(upstream, alpha=cfg.transfer.alpha, selection=cfg.transfer.selection,
                                     seed=derive_seed(cfg.seed, "selection"))
        fitted = fit_stage(cfg, tracker, "transfer", build_model(cfg.model, cfg, "downstream"),
                           data.task2_train, data.task2_test, cfg.train.downstream_steps, [transfer])
        plan = [row.as_dict() for row in transfer.plan]
        results["transfer"] = {**stage_result(fitted), "plan": plan}
        tracker.log_dict(plan, "transfer_plan.json", stage="transfer")

    fitted = fit_stage(cfg, tracker, "scratch", build_model(cfg.model, cfg, "downstream"),
                       data.task2_train, data.task2_test, cfg.train.downstream_steps)
    results["scratch"] = stage_result(fitted)
    return results

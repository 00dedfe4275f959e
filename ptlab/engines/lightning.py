"""The Lightning engine: a stage is one ``pl.Trainer.fit`` of ``FullBatchGD`` (the reference engine).

The trainer comes from the ``trainer`` config group (CPU, GPU, DDP); the transfer stage inherits its
filters through the ``ParameterTransfer`` callback when the fit starts, and the signal/noise
decomposition is recorded by the ``SignalNoiseDecomposition`` callback.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from hydra.utils import instantiate

from ptlab.engines.base import PipelineJob, PipelineResult, Stage, StageResult, diverged, run_recipe
from ptlab.errors import DivergenceError


def quiet_lightning() -> None:
    """Keep Lightning's per-fit banners (GPU available, tips, max_steps reached) off the console; call it
    after Lightning is imported (its import resets its loggers' levels)."""
    for name in ("pytorch_lightning", "lightning_fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(log_every_n_steps|does not have many workers|LeafSpec).*")


class LightningEngine:
    """``Engine`` that fits ``FullBatchGD`` with a ``pl.Trainer`` built from ``trainer`` (a config with
    ``_target_``, instantiated per stage with the stage's step budget)."""

    def __init__(self, name: str = "lightning", trainer: Mapping[str, Any] | None = None, progress_bar: bool = False) -> None:
        """Lightning (and torchmetrics, matplotlib) are imported here, when the engine is built before
        any run is open: a Ctrl-C during that long import must not land half-way into a tracked stage."""
        import pytorch_lightning  # noqa: F401

        from ptlab.modules import callbacks, full_batch_gd  # noqa: F401

        self.name = name
        self.progress_bar = progress_bar
        self.trainer = (
            trainer if trainer is not None else {"_target_": "pytorch_lightning.Trainer", "accelerator": "cpu", "devices": 1}
        )

    def run(self, jobs: Sequence[PipelineJob], **options: Any) -> Iterator[list[tuple[int, PipelineResult]]]:
        """Each job by its task's recipe, one after the other (every Lightning pipeline has a recipe: the synthetic
        stages are fits of ``FullBatchGD``, the image stages the image recipe's own fits)."""
        for index, job in enumerate(jobs):
            yield [(index, run_recipe(self, job))]

    def train_stage(self, stage: Stage) -> StageResult:
        from ptlab.data.full_batch import FullBatchDataModule
        from ptlab.modules.callbacks import FinalToMainProcess, SignalNoiseDecomposition, StepProgressBar, restore_final
        from ptlab.modules.full_batch_gd import FullBatchGD
        from ptlab.transfer.callback import ParameterTransfer

        quiet_lightning()
        module = FullBatchGD(
            stage.model,
            lr=stage.lr,
            eval_sets={"test": (stage.test.x, stage.test.y)},
            eval_every=stage.eval_every,
            regularizer=stage.regularizer if stage.transfer is not None else None,
        )
        callbacks: list[Any] = []
        transfer = ParameterTransfer(stage.transfer) if stage.transfer is not None else None
        if transfer is not None:
            callbacks.append(transfer)
        callbacks += [
            SignalNoiseDecomposition(stage.directions, stage.train.noise, stage.train.y, every=stage.eval_every),
            FinalToMainProcess(),
        ]
        if self.progress_bar:
            callbacks.append(StepProgressBar(stage.name))
        extra = {"precision": "64-true"} if stage.dtype == "float64" else {}
        trainer = instantiate(
            self.trainer,
            max_steps=stage.steps,
            max_epochs=1,
            limit_val_batches=0,
            logger=False,
            callbacks=callbacks,
            use_distributed_sampler=False,
            enable_checkpointing=False,
            enable_progress_bar=self.progress_bar,
            **extra,
        )
        try:
            trainer.fit(module, datamodule=FullBatchDataModule(stage.train.x, stage.train.y, stage.steps))
        except DivergenceError as err:
            raise diverged(stage.name, err.step, err.loss, stage.lr) from None
        restore_final(trainer, module)
        return StageResult(
            stage.name,
            stage.model,
            dict(module.final),
            dict(module.curves),
            transfer.plan if transfer is not None else None,
            stage.steps,
        )

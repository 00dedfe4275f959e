"""Lightning callbacks: the decomposition recorder, the spawn-safe final numbers, a progress bar per stage."""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import TQDMProgressBar
from pytorch_lightning.callbacks.progress.tqdm_progress import Tqdm
from torch import Tensor

from ptlab.data.synthetic import Directions
from ptlab.modules.decomposition import decomposition_metrics

FINAL_PREFIX = "ptlab_final/"
log = logging.getLogger("ptlab")


class SignalNoiseDecomposition(pl.Callback):
    """Records ``decomposition_metrics`` of ``pl_module.model.weight`` every ``every`` steps.

    Points go into ``pl_module.curves`` (``FullBatchGD``'s in-memory curves, which it sends to its
    logger at train end) at step t = the model after t updates, including the final model.
    """

    def __init__(self, directions: Directions, noise: Tensor, labels: Tensor | None = None, every: int = 10) -> None:
        super().__init__()
        if every <= 0:
            raise ValueError(f"every={every} is not allowed: must be > 0")
        self.directions, self.noise, self.labels, self.every = directions, noise, labels, every

    def _record(self, pl_module: pl.LightningModule, step: int) -> None:
        metrics = decomposition_metrics(pl_module.model.weight, self.directions, self.noise, self.labels)
        for key, value in metrics.items():
            pl_module.curves.setdefault(key, []).append((step, value))

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if batch_idx % self.every == 0:
            self._record(pl_module, batch_idx)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._record(pl_module, trainer.global_step)


class FinalToMainProcess(pl.Callback):
    """Puts ``pl_module.final`` into ``trainer.callback_metrics``, which spawn strategies send back to the
    main process; ``restore_final`` reads it there. A no-op cost for single-process fits."""

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        final = getattr(pl_module, "final", None) or {}
        trainer.callback_metrics.update({FINAL_PREFIX + k: torch.tensor(float(v)) for k, v in final.items()})


def restore_final(trainer: pl.Trainer, module: pl.LightningModule) -> None:
    """Fill an empty ``module.final`` (the main process of a spawn fit) from ``trainer.callback_metrics``."""
    if getattr(module, "final", None):
        return
    module.final = {k[len(FINAL_PREFIX) :]: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(FINAL_PREFIX)}


class StageProgressBar(TQDMProgressBar):
    """Lightning's progress bar labelled with the pipeline stage and the epoch total:
    ``transfer: epoch 2/30`` instead of three identical ``Epoch 1`` bars, without Lightning's ``v_num``.

    Off a terminal (stdout a file or a pipe) no bar is drawn: a log line says where training is when it
    starts and then at most every ``every_s`` seconds (``transfer: epoch 2/30, 12.3 s``), so a log file
    holds a few lines per stage instead of a bar redrawn at every step (3,240 redraws, 266 KB, for a
    10 s run before)."""

    unit = "it"

    def __init__(self, stage: str, every_s: float = 10.0, lines: bool | None = None) -> None:
        """``lines``: log lines instead of a bar (default: when stdout is not a terminal)."""
        super().__init__()
        self.stage, self.every_s = stage, every_s
        self.lines = not sys.stdout.isatty() if lines is None else lines
        self._started = self._last = 0.0

    def description(self, trainer: pl.Trainer) -> str:
        return f"{self.stage}: epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"

    def position(self, trainer: pl.Trainer) -> str:
        """Where training is, for a log line."""
        return self.description(trainer)

    def get_metrics(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        return metrics

    def _bar(self, make: Any) -> Tqdm:
        return Tqdm(disable=True) if self.lines else make()

    def init_sanity_tqdm(self) -> Tqdm:
        return self._bar(super().init_sanity_tqdm)

    def init_train_tqdm(self) -> Tqdm:
        return self._bar(super().init_train_tqdm)

    def init_validation_tqdm(self) -> Tqdm:
        return self._bar(super().init_validation_tqdm)

    def init_test_tqdm(self) -> Tqdm:
        return self._bar(super().init_test_tqdm)

    def init_predict_tqdm(self) -> Tqdm:
        return self._bar(super().init_predict_tqdm)

    def _log_line(self, trainer: pl.Trainer, force: bool = False) -> None:
        now = time.monotonic()
        if self.lines and trainer.is_global_zero and (force or now - self._last >= self.every_s):
            self._last = now
            log.info("%s, %.1f s", self.position(trainer), now - self._started)

    def on_train_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_start(trainer, *args)
        self._started = time.monotonic()
        self._last = -float("inf")

    def on_train_epoch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_epoch_start(trainer, *args)
        self.train_progress_bar.set_description(self.description(trainer))
        self.train_progress_bar.unit = self.unit
        self._log_line(trainer)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        super().on_train_batch_end(trainer, *args)
        self._log_line(trainer)


class StepProgressBar(StageProgressBar):
    """The bar of a full-batch GD stage (one epoch of ``max_steps`` batches): ``upstream: GD step 120/800``."""

    unit = "step"

    def description(self, trainer: pl.Trainer) -> str:
        return f"{self.stage}: GD step"

    def position(self, trainer: pl.Trainer) -> str:
        return f"{self.stage}: GD step {trainer.global_step}/{trainer.max_steps}"

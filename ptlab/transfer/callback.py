"""``ParameterTransfer``: the Lightning callback that runs Algorithm 1's initialisation step."""

from __future__ import annotations

import pytorch_lightning as pl

from ptlab.transfer.adapters import PlanRow
from ptlab.transfer.apply import Transfer


class ParameterTransfer(pl.Callback):
    """Before the downstream fit starts, overwrite part of ``pl_module.model`` with the upstream model.

    The rest of the downstream model keeps its fresh init. ``transfer`` says what is inherited (the same
    object the gram engine applies directly); the plan (which layer and units went where) is kept in
    ``self.plan`` for logging. A module with a fine-tuning regulariser (``wants_inherited``) gets the inherited
    units through its ``inherit`` (also on resume: the values come from the upstream model, not the checkpoint).
    """

    def __init__(self, transfer: Transfer) -> None:
        super().__init__()
        self.transfer = transfer
        self.plan: list[PlanRow] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = pl_module.model
        if trainer.ckpt_path:  # resumed: the checkpoint holds the transferred, partly trained weights
            self.plan = self.transfer.plan(target)
        else:
            self.plan = self.transfer.apply(target)
        if getattr(pl_module, "wants_inherited", False):
            units = self.transfer.inherited(target, self.plan)
            pl_module.inherit(units.masks, units.values)

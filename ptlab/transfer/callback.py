"""``ParameterTransfer``: the Lightning callback that runs Algorithm 1's initialisation step."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
from torch import nn

from ptlab.transfer.adapters import PlanRow, TransferAdapter
from ptlab.transfer.apply import Transfer
from ptlab.transfer.selection import SelectionInputs


class ParameterTransfer(pl.Callback):
    """Before the downstream fit starts, overwrite part of ``pl_module.model`` with the upstream model.

    The rest of the downstream model keeps its fresh init. The plan (which layer and units went where)
    is kept in ``self.plan`` for logging. ``transfer`` (a ``Transfer``) may be given instead of its fields.
    """

    def __init__(self, source: nn.Module | None = None, alpha: float = 0.5, selection: Any = "random", seed: int = 0,
                 adapter: TransferAdapter | None = None, transfer: Transfer | None = None,
                 inputs: SelectionInputs | None = None, **adapter_options: Any) -> None:
        super().__init__()
        if transfer is None:
            if source is None:
                raise ValueError("ParameterTransfer needs a source model or a Transfer")
            transfer = Transfer(source, alpha, selection, seed, adapter, dict(adapter_options), inputs)
        self.transfer = transfer
        self.plan: list[PlanRow] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = pl_module.model
        if trainer.ckpt_path:  # resumed: the checkpoint holds the transferred, partly trained weights
            self.plan = self.transfer.plan(target)
            return
        self.plan = self.transfer.apply(target)

"""``ParameterTransfer``: the Lightning callback that runs Algorithm 1's initialisation step."""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
from torch import nn

from ptlab.transfer.adapters import PlanRow, TransferAdapter, find_adapter
from ptlab.transfer.selection import get_selector


def transfer_parameters(source: nn.Module, target: nn.Module, alpha: float, selection: str = "random",
                        generator: torch.Generator | None = None, adapter: TransferAdapter | None = None,
                        ) -> list[PlanRow]:
    """Copy an ``alpha``-fraction of ``source``'s units into ``target`` in place; return the plan."""
    adapter = adapter or find_adapter(source, target)()
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    plan = adapter.plan(source, target, alpha, get_selector(selection), gen)
    adapter.apply(source, target, plan)
    return plan


class ParameterTransfer(pl.Callback):
    """Before the downstream fit starts, overwrite part of ``pl_module.model`` with the upstream model.

    The rest of the downstream model keeps its fresh init. The plan (which layer and units went where)
    is kept in ``self.plan`` for logging.
    """

    def __init__(self, source: nn.Module, alpha: float, selection: str = "random", seed: int = 0,
                 adapter: TransferAdapter | None = None, **adapter_options: Any) -> None:
        super().__init__()
        self.source, self.alpha, self.selection, self.seed = source, alpha, selection, seed
        self.adapter, self.adapter_options = adapter, adapter_options
        self.plan: list[PlanRow] = []

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        target = pl_module.model
        adapter = self.adapter or find_adapter(self.source, target)(**self.adapter_options)
        if trainer.ckpt_path:  # resumed: the checkpoint holds the transferred, partly trained weights
            self.plan = adapter.plan(self.source, target, self.alpha, get_selector(self.selection),
                                     torch.Generator().manual_seed(self.seed))
            return
        self.plan = transfer_parameters(self.source, target, self.alpha, self.selection,
                                        torch.Generator().manual_seed(self.seed), adapter)

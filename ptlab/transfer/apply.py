"""Algorithm 1's initialisation step without Lightning: plan and copy an alpha-fraction of a model.

``Transfer`` is what an engine receives for a transfer stage: the Lightning engine runs it from the
``ParameterTransfer`` callback when the fit starts, the gram engine runs it on the fresh model before
it reads the model's weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ptlab.transfer.adapters import PlanRow, TransferAdapter, find_adapter
from ptlab.transfer.controls import apply_control
from ptlab.transfer.inherited import InheritedUnits, inherited_units
from ptlab.transfer.selection import SelectionInputs, build_strategy


def transfer_parameters(
    source: nn.Module,
    target: nn.Module,
    alpha: float,
    selection: Any = "random",
    generator: torch.Generator | None = None,
    adapter: TransferAdapter | None = None,
    inputs: SelectionInputs | None = None,
) -> list[PlanRow]:
    """Copy an ``alpha``-fraction of ``source``'s units into ``target`` in place; return the plan.
    ``selection``: a ``transfer.selection`` value or a strategy; ``inputs``: the data it may read."""
    adapter = adapter or find_adapter(source, target)()
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    plan = adapter.plan(source, target, alpha, build_strategy(selection).bind(source, inputs), gen)
    adapter.apply(source, target, plan)
    return plan


@dataclass
class Transfer:
    """What a transfer stage inherits: ``alpha`` of ``source`` chosen by ``selection`` (a
    ``transfer.selection`` value) under ``seed``, from ``inputs`` (task-2 batches for data-driven
    strategies), then changed by ``control``; ``options`` go to the family's adapter (e.g. the ViT block switches)."""

    source: nn.Module
    alpha: float
    selection: Any = "random"
    seed: int = 0
    adapter: TransferAdapter | None = None
    options: dict[str, Any] = field(default_factory=dict)
    inputs: SelectionInputs | None = None
    control: str = "none"
    """``transfer.control`` (``ptlab.transfer.controls``), applied to the inherited units after the copy, its draws
    from the streams of ``control_seed``."""
    control_seed: int = 0

    def _adapter(self, target: nn.Module) -> TransferAdapter:
        return self.adapter or find_adapter(self.source, target)(**self.options)

    def plan(self, target: nn.Module) -> list[PlanRow]:
        """The plan for ``target`` without copying anything (same generator as ``apply``)."""
        return self._adapter(target).plan(
            self.source,
            target,
            self.alpha,
            build_strategy(self.selection).bind(self.source, self.inputs),
            torch.Generator().manual_seed(self.seed),
        )

    def apply(self, target: nn.Module) -> list[PlanRow]:
        """Copy the planned units into ``target`` in place, then apply the control to them; return the plan."""
        adapter = self._adapter(target)
        plan = transfer_parameters(
            self.source, target, self.alpha, self.selection, torch.Generator().manual_seed(self.seed), adapter, self.inputs
        )
        self._control(adapter, target, plan)
        return plan

    def _control(self, adapter: TransferAdapter, target: nn.Module, plan: list[PlanRow]) -> None:
        if self.control != "none":
            apply_control(self.control, adapter.units(target, plan), self.control_seed)

    def inherited(self, target: nn.Module, plan: list[PlanRow]) -> InheritedUnits:
        """Which entries of ``target`` ``plan`` copies and the values the transfer gave them, the control's included
        (``ptlab.transfer.inherited``)."""
        adapter = self._adapter(target)
        return inherited_units(adapter, self.source, target, plan, control=lambda model: self._control(adapter, model, plan))

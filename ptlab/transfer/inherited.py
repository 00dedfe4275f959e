"""Which entries of a transfer model were inherited, read from the transfer plan by the adapter's own ``apply``.

The adapter that copied the units applies the same plan once more to copies: from an upstream model of ones into a
downstream model of zeros (the copied entries become 1: the masks), and from the real upstream model (the copied
entries take their inherited values). So "inherited" means exactly what the transfer copied (a filter with its
bias and per-channel norm entries, only the selected input channels under element selection; a ViT's inherited
blocks, and the embeddings its switches name), without a second reading of the plan.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ptlab.transfer.adapters import PlanRow, TransferAdapter


@dataclass
class InheritedUnits:
    """Per parameter name: the boolean mask of the entries the transfer copied, and their inherited values (entries
    outside the mask are the target's own). Parameters without an inherited entry are absent."""

    masks: dict[str, Tensor] = field(default_factory=dict)
    values: dict[str, Tensor] = field(default_factory=dict)

    def row_mask(self, name: str, rows: int) -> Tensor:
        """Which of the ``rows`` rows of parameter ``name`` (e.g. the 2m filters of the two-layer CNN's (2, m, d)
        weight) hold an inherited entry."""
        mask = self.masks.get(name)
        if mask is None:
            return torch.zeros(rows, dtype=torch.bool)
        return mask.reshape(rows, -1).any(dim=-1).cpu()


@torch.no_grad()
def inherited_units(
    adapter: TransferAdapter,
    source: nn.Module,
    target: nn.Module,
    plan: list[PlanRow],
    control: Callable[[nn.Module], None] | None = None,
) -> InheritedUnits:
    """The masks and inherited values of ``target``'s parameters under ``plan`` (``target`` is not changed); with
    ``control`` (``transfer.control``), the values it gives the copied units, which are what training starts from."""
    ones, zeros, copied = copy.deepcopy(source), copy.deepcopy(target), copy.deepcopy(target)
    for tensor in ones.parameters():
        tensor.fill_(1)
    for tensor in zeros.parameters():
        tensor.zero_()
    adapter.apply(ones, zeros, plan)
    adapter.apply(source, copied, plan)
    if control is not None:
        control(copied)
    units = InheritedUnits()
    for (name, marked), (_, value) in zip(zeros.named_parameters(), copied.named_parameters(), strict=True):
        mask = marked != 0
        if bool(mask.any()):
            units.masks[name], units.values[name] = mask, value.detach().clone()
    return units

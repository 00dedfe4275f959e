"""Which filters (or blocks) of a layer are inherited: pluggable selection strategies.

``SELECTIONS`` is the one list of strategy names (the config schema reads ``transfer.selection``'s
allowed values from it). The module imports torch only inside the strategies, so the CLI can check a
config without loading torch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from ptlab.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import Tensor

Selector = Callable[["Tensor", int, "torch.Generator"], "Tensor"]
"""``select(source_units, k, generator)`` -> sorted indices of ``k`` units along dim 0."""

SELECTIONS: Registry[Selector] = Registry("transfer.selection")


def count_for(alpha: float, total: int) -> int:
    """``round(alpha * total)`` with halves rounded up (alpha=0.5 of 5 filters copies 3)."""
    return min(total, int(math.floor(alpha * total + 0.5)))


@SELECTIONS.register("random")
def select_random(units: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``k`` units uniformly at random without replacement (seeded by ``generator``)."""
    import torch

    return torch.randperm(units.shape[0], generator=generator)[:k].sort().values


@SELECTIONS.register("first")
def select_first(units: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """The first ``k`` units."""
    import torch

    return torch.arange(k)


@SELECTIONS.register("largest_norm")
def select_largest_norm(units: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """The ``k`` units whose upstream weights have the largest L2 norm (the most trained ones)."""
    norms = units.detach().reshape(units.shape[0], -1).norm(dim=1).cpu()
    return norms.topk(k).indices.sort().values


def get_selector(name: str) -> Selector:
    """The selection strategy called ``name`` (``UnknownName``, a ``ValueError``, listing the names)."""
    return SELECTIONS.get(name)

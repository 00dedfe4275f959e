"""Which filters (or blocks) of a layer are inherited: pluggable selection strategies."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

Selector = Callable[[Tensor, int, torch.Generator], Tensor]
"""``select(source_units, k, generator)`` -> sorted indices of ``k`` units along dim 0."""


def count_for(alpha: float, total: int) -> int:
    """``round(alpha * total)`` with halves rounded up (alpha=0.5 of 5 filters copies 3)."""
    return min(total, int(math.floor(alpha * total + 0.5)))


def select_random(units: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """``k`` units uniformly at random without replacement (seeded by ``generator``)."""
    return torch.randperm(units.shape[0], generator=generator)[:k].sort().values


def select_first(units: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """The first ``k`` units."""
    return torch.arange(k)


def select_largest_norm(units: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """The ``k`` units whose upstream weights have the largest L2 norm (the most trained ones)."""
    norms = units.detach().reshape(units.shape[0], -1).norm(dim=1).cpu()
    return norms.topk(k).indices.sort().values


SELECTORS: dict[str, Selector] = {
    "random": select_random,
    "first": select_first,
    "largest_norm": select_largest_norm,
}


def get_selector(name: str) -> Selector:
    """The selection strategy called ``name``."""
    if name not in SELECTORS:
        raise ValueError(f"transfer.selection={name!r} is unknown: choose one of {', '.join(SELECTORS)}")
    return SELECTORS[name]

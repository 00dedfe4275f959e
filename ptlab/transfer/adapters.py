"""Per-model-family transfer rules: what "an alpha-fraction of the upstream model" means for a family.

An adapter plans the transfer (which target unit gets which source unit) and applies the plan in
place. ``ParameterTransfer`` picks the first adapter of ``ADAPTERS`` that ``matches`` the model pair;
a new family plugs in with ``ADAPTERS.add(name, "module:Class")`` (or ``ADAPTERS.register(name)``).
Families whose libraries are heavy (torchvision, timm) are registered as references, so they are
imported only when a pair of an earlier family does not match.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from ptlab.models.two_layer_cnn import TwoLayerReLUCNN
from ptlab.registry import Registry
from ptlab.transfer.controls import UnitBlock
from ptlab.transfer.selection import Selector, choose, count_for


@dataclass
class PlanRow:
    """One layer's transfer: ``copied`` of ``total`` units of ``source`` go to ``target``; ``strategy``
    chose them, with ``scores`` (one per chosen unit, empty for unscored strategies).

    ``indices`` are the target positions; ``source_indices`` the source units copied there, in order
    (empty: the same as ``indices``). When the input widths differ (element selection, CNN filters),
    only input channels ``source_input_indices`` of each copied filter go to ``input_indices``;
    ``None``: every input weight.
    """

    target: str
    source: str
    copied: int
    total: int
    indices: list[int] = field(default_factory=list)
    source_indices: list[int] = field(default_factory=list)
    input_indices: list[int] | None = None
    source_input_indices: list[int] | None = None
    strategy: str = ""
    scores: list[float] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The row as plain data; the element-selection fields only where they say more than ``indices``."""
        row = asdict(self)
        if row["source_indices"] in ([], row["indices"]):
            del row["source_indices"]
        for key in ("input_indices", "source_input_indices"):
            if row[key] is None:
                del row[key]
        return row


class TransferAdapter(ABC):
    """Plans and applies a transfer between two models of one family."""

    @classmethod
    @abstractmethod
    def matches(cls, source: nn.Module, target: nn.Module) -> bool:
        """Whether this adapter handles the (source, target) pair."""

    @abstractmethod
    def plan(
        self, source: nn.Module, target: nn.Module, alpha: float, select: Selector, generator: torch.Generator
    ) -> list[PlanRow]:
        """Which units go where; raises ``ValueError`` with one line when nothing can match."""

    @abstractmethod
    def apply(self, source: nn.Module, target: nn.Module, plan: list[PlanRow]) -> None:
        """Copy the planned units from ``source`` into ``target`` in place."""

    def units(self, target: nn.Module, plan: list[PlanRow]) -> list[UnitBlock]:
        """The inherited units of ``target`` under ``plan``, for a ``transfer.control`` (``ptlab.transfer.controls``);
        ``ValueError`` for a family whose transfer has no filters."""
        raise ValueError(f"transfer.control is not defined for {type(self).__name__}: must be none")


class TwoLayerCNNFilters(TransferAdapter):
    """The paper's rule: ``round(alpha * m)`` filters per output j, copied to the same positions (with their
    biases when both models have one)."""

    OUTPUTS = ("+1", "-1")

    @classmethod
    def matches(cls, source: nn.Module, target: nn.Module) -> bool:
        return isinstance(source, TwoLayerReLUCNN) and isinstance(target, TwoLayerReLUCNN)

    def plan(
        self, source: nn.Module, target: nn.Module, alpha: float, select: Selector, generator: torch.Generator
    ) -> list[PlanRow]:
        if source.weight.shape != target.weight.shape:
            raise ValueError(
                f"filter transfer needs equal weight shapes (2, m, d): upstream {tuple(source.weight.shape)} "
                f"vs downstream {tuple(target.weight.shape)}"
            )
        rows = []
        for j, label in enumerate(self.OUTPUTS):
            total = target.weight.shape[1]
            k = count_for(alpha, total)
            layer = f"weight[{label}]"
            choice = choose(select, source.weight[j], k, generator, layer)
            rows.append(PlanRow(layer, layer, k, total, choice.indices, strategy=choice.strategy, scores=choice.scores))
        return rows

    @torch.no_grad()
    def apply(self, source: nn.Module, target: nn.Module, plan: list[PlanRow]) -> None:
        for j, row in enumerate(plan):
            if row.indices:
                idx = torch.tensor(row.indices, device=target.weight.device)
                target.weight[j, idx] = source.weight[j, idx.to(source.weight.device)].to(target.weight)
                if source.bias is not None and target.bias is not None:
                    target.bias[j, idx] = source.bias[j, idx.to(source.bias.device)].to(target.bias)

    def units(self, target: nn.Module, plan: list[PlanRow]) -> list[UnitBlock]:
        """Filter ``w_{j,r}`` (d entries) of each copied position, per output j (the bias stays as copied)."""
        return [UnitBlock(row.target, target.weight.data[j], row.indices) for j, row in enumerate(plan)]


ADAPTERS: Registry[type[TransferAdapter]] = Registry("transfer adapter")
ADAPTERS.add("two_layer_cnn", TwoLayerCNNFilters)
ADAPTERS.add("cnn", "ptlab.transfer.conv:CNNFilterTransfer")
ADAPTERS.add("vit", "ptlab.transfer.vit:ViTLayerTransfer")


def find_adapter(source: nn.Module, target: nn.Module) -> type[TransferAdapter]:
    """The first adapter of ``ADAPTERS`` for a model pair, or ``ValueError`` naming the pair."""
    for _, adapter in ADAPTERS.items():
        if adapter.matches(source, target):
            return adapter
    raise ValueError(
        f"no transfer rule for upstream {type(source).__name__} -> downstream "
        f"{type(target).__name__}; known families: {', '.join(ADAPTERS.names())}"
    )

"""Fine-tuning regularisers on the inherited units of a transfer model (the ``regularizer`` group, docs/design.md
section 8).

An *inherited unit* is what the transfer copied from the upstream model: a filter (a row of a conv weight with its
per-channel parameters), or a ViT block's parameters. ``InheritedUnits`` holds, per parameter, the mask of inherited
entries and their inherited values (``ptlab.transfer.inherited`` derives both from the transfer plan); ``FineTuning``
binds a ``Regularizer`` to a model and its inherited units and acts on the optimisation:

- ``l2sp``: ``lam * ||w - w_inherited||^2`` over the inherited entries plus ``decay * ||w||^2`` over every other
  entry of the model, added to the loss (``penalty``);
- ``freeze`` and ``lr_scale``: a multiplier ``m`` on the inherited entries' step (0 for the first ``k`` steps or
  epochs, then 1; or ``scale`` throughout). Every optimizer ptlab uses (SGD with momentum and weight decay, Adam,
  AdamW) takes a step linear in ``lr`` from a state that does not depend on ``lr``, so ``w_old + m * (w_new - w_old)``
  is the step at learning rate ``m * lr`` exactly; ``m = 0`` keeps the old entries bit for bit and holds their
  optimizer state (momentum, Adam's moments) at zero, so an unfrozen SGD unit starts like a fresh parameter.

The scratch model never gets a ``FineTuning``: it is the baseline.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

REGULARIZERS = ("none", "l2sp", "freeze", "lr_scale")
"""The ``regularizer`` group's options (``ptlab.config.REGULARIZERS`` repeats them without importing torch)."""
KEYS = {"none": (), "l2sp": ("lam", "decay"), "freeze": ("k",), "lr_scale": ("scale",)}
"""The keys each option reads."""


@dataclass(frozen=True)
class Regularizer:
    """A ``regularizer`` config as numbers (``decay=None``: the same coefficient as ``lam``)."""

    name: str = "none"
    lam: float = 0.0
    decay: float | None = None
    k: int = 0
    scale: float = 1.0

    def __post_init__(self) -> None:
        if self.name not in REGULARIZERS:
            raise ValueError(f"regularizer={self.name!r} is unknown: choose one of {', '.join(REGULARIZERS)}")

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | Any | None) -> Regularizer:
        """The ``regularizer`` group: a mapping or a parsed schema (absent: ``none``; absent keys: their defaults)."""
        if node is None:
            return cls()
        get = node.get if isinstance(node, Mapping) else lambda key, default=None: getattr(node, key, default)
        decay = get("decay")
        return cls(
            str(get("name", "none")),
            float(get("lam", 0.0)),
            None if decay is None else float(decay),
            int(get("k", 0)),
            float(get("scale", 1.0)),
        )

    @property
    def active(self) -> bool:
        """Whether it changes the transfer stage's training at all."""
        return not (
            self.name == "none"
            or (self.name == "lr_scale" and self.scale == 1.0)
            or (self.name == "freeze" and self.k == 0)
            or (self.name == "l2sp" and self.lam == 0.0 and self.decay_coefficient == 0.0)
        )

    @property
    def decay_coefficient(self) -> float:
        """The coefficient of ``||w||^2`` on the units that were not inherited (``l2sp`` only)."""
        if self.name != "l2sp":
            return 0.0
        return self.lam if self.decay is None else self.decay

    @property
    def anchor_coefficient(self) -> float:
        """The coefficient of ``||w - w_inherited||^2`` on the inherited units (``l2sp`` only)."""
        return self.lam if self.name == "l2sp" else 0.0

    def multiplier(self, t: int) -> float:
        """The inherited units' step multiplier at step (or epoch) ``t``, counted from 0."""
        if self.name == "freeze":
            return 0.0 if t < self.k else 1.0
        if self.name == "lr_scale":
            return self.scale
        return 1.0

    def as_dict(self) -> dict[str, Any]:
        """The name and the keys it reads (``decay`` resolved), for ``summary.json``."""
        values = {"lam": self.lam, "decay": self.decay_coefficient, "k": self.k, "scale": self.scale}
        return {"name": self.name, **{key: values[key] for key in KEYS[self.name]}}


class FineTuning:
    """A ``Regularizer`` bound to ``model``'s parameters and their inherited units: per parameter name, the mask of
    inherited entries and their inherited values (``ptlab.transfer.inherited.InheritedUnits``; parameters without
    an inherited entry are absent)."""

    def __init__(
        self, regularizer: Regularizer, model: nn.Module, masks: Mapping[str, Tensor], values: Mapping[str, Tensor]
    ) -> None:
        self.regularizer = regularizer
        self.parameters: list[tuple[Tensor, Tensor | None, Tensor | None]] = []
        for name, parameter in model.named_parameters():
            mask = masks.get(name)
            if mask is not None:
                mask = mask.to(parameter.device)
            value = values.get(name)
            self.parameters.append((parameter, mask, None if value is None else value.to(parameter)))

    def penalty(self) -> Tensor | None:
        """The ``l2sp`` term of the loss (``None`` for the other regularisers)."""
        lam, decay = self.regularizer.anchor_coefficient, self.regularizer.decay_coefficient
        if self.regularizer.name != "l2sp" or (lam == 0.0 and decay == 0.0):
            return None
        total = None
        for parameter, mask, value in self.parameters:
            if mask is None:
                term = decay * parameter.square().sum()
            else:
                mask, value = mask.to(parameter.device), value.to(parameter.device)
                term = lam * ((parameter - value).square() * mask).sum() + decay * (parameter.square() * ~mask).sum()
            total = term if total is None else total + term
        return total

    def before_step(self, t: int) -> tuple[float, list[Tensor]] | None:
        """The inherited entries' multiplier at step (or epoch) ``t`` and the parameters' values before the step,
        when the step must be changed (``None`` otherwise)."""
        m = self.regularizer.multiplier(t)
        if m == 1.0:
            return None
        return m, [parameter.detach().clone() for parameter, mask, _ in self.parameters if mask is not None]

    @torch.no_grad()
    def after_step(self, saved: tuple[float, list[Tensor]] | None, optimizer: Any = None) -> None:
        """Scale the step of the inherited entries by the multiplier ``before_step`` saw (0: restore them exactly
        and zero their entries of the optimizer's state)."""
        if saved is None:
            return
        m, before = saved
        masked = [(parameter, mask) for parameter, mask, _ in self.parameters if mask is not None]
        for (parameter, mask), old in zip(masked, before):
            mask = mask.to(parameter.device)
            if m == 0.0:
                parameter.copy_(torch.where(mask, old, parameter))
                inner = getattr(optimizer, "optimizer", optimizer)  # Lightning's wrapper or the torch optimizer
                state = getattr(inner, "state", {}).get(parameter, {}) if inner is not None else {}
                for tensor in state.values():
                    if isinstance(tensor, Tensor) and tensor.shape == parameter.shape:
                        tensor.masked_fill_(mask, 0)
            else:
                parameter.copy_(torch.where(mask, old + m * (parameter - old), parameter))


class FineTunedModule:
    """A LightningModule mixin (listed before ``pl.LightningModule``): the transfer stage's ``regularizer`` on the
    units ``inherit`` names (``ParameterTransfer`` hands them over when ``wants_inherited``); l2sp's penalty is the
    module's to add to its loss (``fine_tuning.penalty()``), freeze and lr_scale act around every optimizer step,
    counted in ``fine_tuning_clock()`` units (GD steps or epochs)."""

    model: nn.Module

    def init_fine_tuning(self, regularizer: Regularizer | None) -> None:
        """Set the regulariser (``None``: none); call in ``__init__``."""
        self.regularizer = regularizer if regularizer is not None else Regularizer()
        self.fine_tuning: FineTuning | None = None

    @property
    def wants_inherited(self) -> bool:
        """Whether ``ParameterTransfer`` should hand over the inherited units (a regulariser is set)."""
        return self.regularizer.active

    def inherit(self, masks: dict[str, Tensor], values: dict[str, Tensor]) -> None:
        """Bind the regulariser to the units the transfer copied."""
        self.fine_tuning = FineTuning(self.regularizer, self.model, masks, values)

    def fine_tuning_clock(self) -> int:
        """What freeze's ``k`` counts, now."""
        raise NotImplementedError

    def optimizer_step(self, epoch: int, batch_idx: int, optimizer: Any, optimizer_closure: Any = None) -> None:
        saved = self.fine_tuning.before_step(self.fine_tuning_clock()) if self.fine_tuning is not None else None
        super().optimizer_step(epoch, batch_idx, optimizer, optimizer_closure)  # type: ignore[misc]
        if self.fine_tuning is not None:
            self.fine_tuning.after_step(saved, optimizer)

"""The interface every training engine implements: train one stage of a synthetic pipeline.

The pipeline (``ptlab.pipeline.synthetic``) builds a ``Stage`` (the model to train, its data, its
budget, what it inherits) and calls ``engine.train_stage(stage)``; it gets back a ``StageResult``
(the trained model, its final numbers and curves, the transfer plan) and tracks it. Engines never
import the pipeline or the tracking code. ``conf/engine/<name>.yaml`` picks the engine by
``_target_``: ``ptlab.engines.lightning.LightningEngine`` (the reference) or
``ptlab.engines.gram.GramEngine`` (the exact Gram-matrix engine, docs/design.md section 3).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

if TYPE_CHECKING:
    from torch import nn

    from ptlab.data.synthetic import Directions, PatchData
    from ptlab.modules.regularizers import Regularizer
    from ptlab.transfer.adapters import PlanRow
    from ptlab.transfer.apply import Transfer

STAGES = ("upstream", "transfer", "scratch")
"""The stages of a pipeline, in the order they run."""


@dataclass
class Stage:
    """One full-batch GD training of the two-layer CNN.

    ``model`` is trained in place. ``transfer`` (the transfer stage) is applied to ``model`` before the
    first step. ``directions`` and ``task`` (1 or 2) say which signal the data carry; the engines
    record the signal/noise decomposition of the filters against them every ``eval_every`` steps.
    ``regularizer`` (the transfer stage's, ``ptlab.modules.regularizers``) acts on the units ``transfer`` copies.
    """

    name: str
    model: nn.Module
    train: PatchData
    test: PatchData
    steps: int
    lr: float
    eval_every: int
    directions: Directions
    task: int
    transfer: Transfer | None = None
    dtype: str = "float32"
    regularizer: Regularizer | None = None


@dataclass
class StageResult:
    """A trained stage: ``final`` (train_loss, train_acc, test_acc), ``curves`` (name -> [(step, value)]),
    the transfer ``plan`` (transfer stage), and where it came from (``cached``: read from the upstream
    cache, not trained now)."""

    name: str
    model: nn.Module | None
    final: dict[str, float]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    plan: list[PlanRow] | None = None
    steps: int = 0
    cached: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The stage's entry of ``summary.json``."""
        out: dict[str, Any] = {key: self.final[key] for key in ("train_acc", "test_acc", "train_loss") if key in self.final}
        out.update({k: v for k, v in self.final.items() if k not in out})
        out.update(self.extra)
        if self.plan is not None:
            out["plan"] = [row.as_dict() for row in self.plan]
        return out


@runtime_checkable
class Engine(Protocol):
    """Trains a ``Stage``; ``name`` is what the config hash and the upstream cache key record."""

    name: str

    def train_stage(self, stage: Stage) -> StageResult: ...

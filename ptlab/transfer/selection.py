"""Which filters (or blocks) of a layer are inherited: pluggable selection strategies (docs/design.md section 7).

A strategy is a ``SelectionStrategy`` subclass: ``choose(context)`` returns the ``k`` chosen unit
indices of one upstream layer and their scores. The ``SelectionContext`` holds what a strategy may
need: the layer's upstream weights (one unit per row of dim 0), its name, the BatchNorm after it, the
upstream model, and ``SelectionInputs`` (a few task-2 batches; for the synthetic model the universal
direction ``u`` or the engine's precomputed responses), with the plan's seeded generator. ``needs``
says which of these a strategy reads, so a config is checked before anything runs.

``SELECTIONS`` is the one list of strategy names (the config schema reads ``transfer.selection``'s
allowed values from it). ``transfer.selection`` is a name (the strategy with its default options) or a
node with a ``_target_`` (the ``conf/transfer/selection`` group: ``transfer/selection=taylor`` and its
options ``transfer.selection.batches=8``); a user's strategy is one subclass and one YAML file. The
module imports torch only inside the strategies, so the CLI can check a config without loading torch.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from ptlab.registry import Registry

if TYPE_CHECKING:
    import torch
    from torch import Tensor, nn

Selector = Callable[..., "Tensor"]
"""``select(source_units, k, generator, **where)`` -> sorted indices of ``k`` units along dim 0."""

NEEDS = ("norms", "weights", "bn", "batches", "oracle", "task2")
"""What a strategy may read: the units' norms, their full weights, the BatchNorm after the layer, task-2
batches through the upstream model, the synthetic universal direction (an oracle), task-2 patches of the
synthetic model."""


SCORE_DIGITS = 6
"""Significant digits of the scores a plan records (the choice itself uses the exact scores), so plans made
from the same weights by different arithmetic (the gram engine's norms from responses) record equal rows."""


def count_for(alpha: float, total: int) -> int:
    """``round(alpha * total)`` with halves rounded up (alpha=0.5 of 5 filters copies 3)."""
    return min(total, int(math.floor(alpha * total + 0.5)))


@dataclass
class SignalView:
    """The synthetic model's upstream filters seen through task 2: ``universal`` (units,) = ``<w, u>``
    (the oracle), ``patches`` (units, N, 2) = ``<w, x1_i>, <w, x2_i>`` on the task-2 training set,
    ``labels`` (N,) its observed labels (+-1)."""

    universal: Tensor | None
    patches: Tensor | None
    labels: Tensor | None


@dataclass
class SelectionInputs:
    """Data a strategy may read besides the weights: task-2 ``batches`` ``(x, y)`` for the upstream model,
    an optional ``loss(outputs, y)`` for them (default: the model family's, ``ptlab.transfer.probes``), the
    synthetic universal direction ``universal`` (the oracle), and ``signal`` views an engine computed
    itself, by layer name (the gram engine has responses, not weights)."""

    batches: Sequence[tuple[Any, Any]] = ()
    loss: Callable[[Any, Any], Any] | None = None
    universal: Any = None
    signal: Mapping[str, SignalView] = field(default_factory=dict)


@dataclass
class SelectionContext:
    """One layer's choice: ``units`` (upstream weights, unit along dim 0), how many (``k``), the seeded
    ``generator``, the layer's name in ``source`` (the upstream model), the BatchNorm after it, inputs."""

    units: Tensor
    k: int
    generator: torch.Generator
    layer: str = ""
    source: nn.Module | None = None
    bn: nn.Module | None = None
    inputs: SelectionInputs = field(default_factory=SelectionInputs)

    def signal(self) -> SignalView:
        """The synthetic responses of these units: the engine's, else computed from the weights."""
        if self.layer in self.inputs.signal:
            return self.inputs.signal[self.layer]
        from ptlab.transfer.probes import signal_view

        return SignalView(*signal_view(self))

    def gradients(self) -> list[Tensor]:
        """dL/d(units) on each task-2 batch through the upstream model (``ptlab.transfer.probes``)."""
        from ptlab.transfer.probes import unit_gradients

        return unit_gradients(self)

    def activations(self) -> Tensor:
        """Mean |activation| of each unit on the task-2 batches (``ptlab.transfer.probes``)."""
        from ptlab.transfer.probes import unit_activations

        return unit_activations(self)


@dataclass
class Choice:
    """The chosen unit ``indices`` (sorted), their ``scores`` (empty for unscored strategies), the strategy."""

    indices: list[int]
    scores: list[float]
    strategy: str


class SelectionStrategy:
    """Chooses ``k`` units of a layer. Subclasses set ``name`` and ``needs`` and override ``scores``
    (the top-``k`` scores win, ties to the lower index) or ``indices`` (unscored strategies)."""

    name: ClassVar[str] = ""
    needs: ClassVar[frozenset[str]] = frozenset()

    @property
    def label(self) -> str:
        """The name the plan records: ``name``, or the class name of a user's strategy without one."""
        return self.name or type(self).__name__

    def scores(self, context: SelectionContext) -> Tensor | None:
        """One score per unit (higher is kept), or ``None`` for a strategy that picks ``indices`` directly."""
        return None

    def indices(self, context: SelectionContext) -> Tensor:
        raise NotImplementedError(f"{self.label} defines neither scores nor indices")

    def choose(self, context: SelectionContext) -> Choice:
        """The ``k`` chosen units and their scores."""
        import torch

        if context.k <= 0:
            return Choice([], [], self.label)
        scores = self.scores(context)
        if scores is None:
            return Choice(self.indices(context).sort().values.tolist(), [], self.label)
        scores = scores.detach().double().cpu()
        order = torch.argsort(-scores, stable=True)[: context.k].sort().values
        return Choice(order.tolist(), [float(f"{s:.{SCORE_DIGITS}g}") for s in scores[order].tolist()], self.label)

    def __call__(self, units: Tensor, k: int, generator: torch.Generator, layer: str = "", bn: nn.Module | None = None) -> Tensor:
        """The chosen indices as a tensor (the ``Selector`` form an adapter may call)."""
        return self.bind()(units, k, generator, layer, bn)

    def bind(self, source: nn.Module | None = None, inputs: SelectionInputs | None = None) -> BoundSelector:
        """A selector an adapter calls per layer, with the upstream model and the inputs filled in."""
        return BoundSelector(self, source, inputs or SelectionInputs())


@dataclass
class BoundSelector:
    """A strategy with its upstream model and inputs: ``select(units, k, generator, layer=, bn=)``."""

    strategy: SelectionStrategy
    source: nn.Module | None = None
    inputs: SelectionInputs = field(default_factory=SelectionInputs)

    def choose(self, units: Tensor, k: int, generator: torch.Generator, layer: str = "", bn: nn.Module | None = None) -> Choice:
        return self.strategy.choose(SelectionContext(units, k, generator, layer, self.source, bn, self.inputs))

    def __call__(self, units: Tensor, k: int, generator: torch.Generator, layer: str = "", bn: nn.Module | None = None) -> Tensor:
        import torch

        return torch.tensor(self.choose(units, k, generator, layer, bn).indices, dtype=torch.long)


def choose(
    select: Selector, units: Tensor, k: int, generator: torch.Generator, layer: str = "", bn: nn.Module | None = None
) -> Choice:
    """``select``'s choice for one layer; a plain ``select(units, k, generator)`` function records no scores."""
    if isinstance(select, BoundSelector):
        return select.choose(units, k, generator, layer, bn)
    if isinstance(select, SelectionStrategy):
        return select.choose(SelectionContext(units, k, generator, layer, None, bn))
    indices = select(units, k, generator).tolist() if k else []
    return Choice(sorted(indices), [], getattr(select, "__name__", "custom"))


def _flat(units: Tensor) -> Tensor:
    return units.detach().reshape(units.shape[0], -1).double().cpu()


class Random(SelectionStrategy):
    """``k`` units uniformly at random without replacement (seeded by the generator)."""

    name = "random"

    def indices(self, context: SelectionContext) -> Tensor:
        import torch

        return torch.randperm(context.units.shape[0], generator=context.generator)[: context.k]


class First(SelectionStrategy):
    """The first ``k`` units."""

    name = "first"

    def indices(self, context: SelectionContext) -> Tensor:
        import torch

        return torch.arange(context.k)


class Uniform(SelectionStrategy):
    """Evenly spaced units ``floor(i * N / k)``, i = 0..k-1 (weight selection, Xu et al. 2024)."""

    name = "uniform"

    def indices(self, context: SelectionContext) -> Tensor:
        import torch

        total = context.units.shape[0]
        return torch.tensor([i * total // context.k for i in range(context.k)], dtype=torch.long)


class LargestNorm(SelectionStrategy):
    """The units whose upstream weights have the largest L2 norm (the most trained ones)."""

    name = "largest_norm"
    needs = frozenset({"norms"})

    def scores(self, context: SelectionContext) -> Tensor:
        return _flat(context.units).norm(dim=1)


class L1(SelectionStrategy):
    """The units with the largest sum of |w| (Li et al. 2017)."""

    name = "l1"
    needs = frozenset({"weights"})

    def scores(self, context: SelectionContext) -> Tensor:
        return _flat(context.units).abs().sum(dim=1)


class GeometricMedian(SelectionStrategy):
    """The units farthest from the others, by the sum of Euclidean distances to every other unit (FPGM,
    He et al. 2019, which prunes the units nearest the geometric median)."""

    name = "geometric_median"
    needs = frozenset({"weights"})

    def scores(self, context: SelectionContext) -> Tensor:
        import torch

        flat = _flat(context.units)
        return torch.cdist(flat, flat).sum(dim=1)


class BNScale(SelectionStrategy):
    """The units whose following BatchNorm has the largest |gamma| (network slimming, Liu et al. 2017)."""

    name = "bn_scale"
    needs = frozenset({"bn"})

    def scores(self, context: SelectionContext) -> Tensor:
        if context.bn is None or getattr(context.bn, "weight", None) is None:
            raise ValueError(
                f"transfer.selection=bn_scale needs a BatchNorm with a scale after the layer; "
                f"{context.layer or 'this layer'} has none"
            )
        return context.bn.weight.detach().abs()


class _BatchStrategy(SelectionStrategy):
    """A data-driven strategy: ``batches`` task-2 batches through the upstream model."""

    needs = frozenset({"batches"})

    def __init__(self, batches: int = 4) -> None:
        if batches < 1:
            raise ValueError(f"transfer.selection.batches={batches} is not allowed: must be >= 1")
        self.batches = batches


class Taylor(_BatchStrategy):
    """First-order Taylor importance (Molchanov et al. 2019): ``(sum over the unit's weights of w * dL/dw)^2``,
    averaged over the task-2 batches."""

    name = "taylor"

    def scores(self, context: SelectionContext) -> Tensor:
        import torch

        w = _flat(context.units)
        return torch.stack([(w * _flat(g)).sum(dim=1) ** 2 for g in context.gradients()]).mean(dim=0)


class Activation(_BatchStrategy):
    """The units with the largest mean |activation| on the task-2 batches."""

    name = "activation"

    def scores(self, context: SelectionContext) -> Tensor:
        return context.activations()


class Fisher(_BatchStrategy):
    """Diagonal Fisher importance: ``sum over the unit's weights of w^2 * E[g^2]``, the expectation over the
    task-2 batches' gradients."""

    name = "fisher"

    def scores(self, context: SelectionContext) -> Tensor:
        import torch

        g2 = torch.stack([_flat(g) ** 2 for g in context.gradients()]).mean(dim=0)
        return (_flat(context.units) ** 2 * g2).sum(dim=1)


class Signal(SelectionStrategy):
    """The oracle of the synthetic model: the filters with the largest |<w, u>| (the universal signal,
    read from the data's decomposition; not available to a real learner)."""

    name = "signal"
    needs = frozenset({"oracle"})

    def scores(self, context: SelectionContext) -> Tensor:
        view = context.signal()
        if view.universal is None:
            raise ValueError("transfer.selection=signal needs the synthetic model's universal direction u")
        return view.universal.abs()


class Task2Alignment(SelectionStrategy):
    """No oracle: ``|<w, s>| - noise_weight * mean_i |<w, xi_i>|`` with ``s = mean_i y_i x1_i`` (an estimate
    of ``u + v2`` from the task-2 signal patches) and ``xi_i`` the task-2 noise patches: filters aligned
    with task 2's signal and little with its noise."""

    name = "task2_alignment"
    needs = frozenset({"task2"})

    def __init__(self, noise_weight: float = 1.0) -> None:
        self.noise_weight = float(noise_weight)

    def scores(self, context: SelectionContext) -> Tensor:
        view = context.signal()
        if view.patches is None or view.labels is None:
            raise ValueError("transfer.selection=task2_alignment needs the synthetic model's task-2 patches")
        patches, labels = view.patches.double(), view.labels.double().to(view.patches.device)
        signal = (patches[..., 0] * labels).mean(dim=-1).abs()
        noise = patches[..., 1].abs().mean(dim=-1)
        return signal - self.noise_weight * noise


SELECTIONS: Registry[type[SelectionStrategy]] = Registry("transfer.selection")
for _strategy in (
    Random,
    First,
    LargestNorm,
    L1,
    BNScale,
    GeometricMedian,
    Uniform,
    Taylor,
    Activation,
    Fisher,
    Signal,
    Task2Alignment,
):
    SELECTIONS.add(_strategy.name, _strategy)


def strategy_class(spec: Any) -> type[SelectionStrategy]:
    """The class a ``transfer.selection`` value names: a registered name, or a node's ``_target_``."""
    if isinstance(spec, str):
        return SELECTIONS.get(spec)
    from hydra.utils import get_class

    return get_class(str(spec["_target_"]))


def build_strategy(spec: Any) -> SelectionStrategy:
    """The strategy of a ``transfer.selection`` value: a name (default options), a node with ``_target_``
    and options (``hydra.utils.instantiate``), or a ``spec_key`` string of either."""
    if isinstance(spec, SelectionStrategy):
        return spec
    if isinstance(spec, str) and spec.startswith("{"):
        spec = json.loads(spec)
    if isinstance(spec, str):
        return SELECTIONS.get(spec)()
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    try:
        strategy = instantiate(spec)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, ValueError):
            raise ValueError(str(cause).splitlines()[0]) from None
        raise ValueError(f"transfer.selection: {str(cause or err).splitlines()[0]}") from None
    if not isinstance(strategy, SelectionStrategy):
        raise ValueError(f"transfer.selection._target_={spec['_target_']!r} is not a SelectionStrategy subclass")
    return strategy


def spec_key(spec: Any) -> str:
    """A ``transfer.selection`` value as one hashable string: the name, or the node as sorted JSON."""
    if isinstance(spec, str):
        return spec
    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(spec, resolve=True) if isinstance(spec, DictConfig) else dict(spec)
    return json.dumps(plain, sort_keys=True)


def selection_label(spec: Any) -> str:
    """The strategy's name for tables: the registered name, or the ``_target_``'s class name."""
    if isinstance(spec, str) and not spec.startswith("{"):
        return spec
    cls = strategy_class(json.loads(spec) if isinstance(spec, str) else spec)
    return getattr(cls, "name", "") or cls.__name__

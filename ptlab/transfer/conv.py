"""Filter transfer between two CNNs of one model class, the structure read from the module graph
(docs/design.md section 4).

**Structure** (``discover``). ``torch.fx`` traces the model (convs, linears and norms as leaves) and
one pass over the graph finds, for every ``Conv2d`` and ``Linear`` (a *unit*):

- the *channel space* it writes and the one it reads. A dense unit writes a new space; a depthwise
  conv (``groups == in == out``) writes the space it reads (filter i reads channel i); an addition
  or multiplication of two tensors of equal width (a residual addition, a squeeze-excitation gate)
  makes their spaces one (union-find), so every conv that adds into a residual stream writes that
  stream's space. Other operations pass the space through. Grouped convs and channel concatenation
  are refused with one line;
- its *followers*: the per-channel tensors applied to its output before anything mixes it, i.e.
  the norm right after it (BatchNorm weight, bias, running mean and variance; LayerNorm, GroupNorm)
  and a per-channel parameter it is multiplied by (ConvNeXt's layer scale);
- its *stage*: ``level<s>`` with ``2^s`` the total stride of its output.

Units that write the model's output (the heads) are never transferred. A norm that follows a
residual addition rather than a unit (a *stream norm*: ConvNeXt's downsampling LayerNorm, a
pre-activation BatchNorm) belongs to the space it normalises.

**Matching** (``match_units``). If both models have the same units (name, kind, kernel, stride and
stage in graph order: the same architecture, widths may differ) unit i takes unit i. Otherwise (e.g.
ResNet-101 -> ResNet-34) the i-th target unit of a weight shape in a stage takes the i-th source unit
of that shape in that stage; units without a partner keep their init.

**Channels.** Per target channel space one set of ``min(round(alpha C_t), C_s)`` source channels is
chosen by the selection strategy from the first matched source unit that writes the space
(``_choose``). Equal widths: the channels go to the same positions. Different widths (element
selection, as in weight selection): they go, in order, to positions ``0..k-1``. A copied filter takes
its followers' entries at the same indices and its input weights: all of them when both input
spaces have the same width, else only the input channels selected in its input space (the rest of
the filter, like every other tensor, stays at the fresh init; a unit with no selected input copies
nothing). Between two models of one architecture, a stream norm takes its namesake's entries at its
space's indices (one plan row after the units); otherwise it keeps its init. Every unit that writes
a space uses its one index set, so a transferred channel adds up with transferred channels and reads
transferred channels below it.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ptlab.transfer.adapters import PlanRow, TransferAdapter
from ptlab.transfer.controls import UnitBlock
from ptlab.transfer.selection import Choice, Selector, choose, count_for

UNITS = (nn.Conv2d, nn.Linear)
NORMS = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)
POOLS = (nn.MaxPool2d, nn.AvgPool2d)
MIXING = {
    operator.add,
    operator.iadd,
    operator.mul,
    operator.imul,
    operator.sub,
    torch.add,
    torch.mul,
    torch.sub,
    "add",
    "add_",
    "mul",
    "mul_",
    "sub",
}
"""Elementwise operations of two tensors: equal-width operands share one channel space."""
CONCAT = {torch.cat, torch.concat, torch.stack, "cat"}


@dataclass
class ConvUnit:
    """A conv or linear layer in graph order: the spaces it reads and writes, its per-channel followers
    (state-dict keys), its stage and the first norm after it (``None`` when there is none)."""

    name: str
    stage: str
    conv: nn.Module
    bn: nn.Module | None
    in_space: int | None
    out_space: int
    depthwise: bool = False
    followers: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.conv.weight.shape)

    @property
    def out_channels(self) -> int:
        return self.conv.weight.shape[0]

    @property
    def in_channels(self) -> int:
        return self.conv.weight.shape[1]

    @property
    def kind(self) -> tuple[Any, ...]:
        conv = self.conv
        geometry = (conv.kernel_size, conv.stride) if isinstance(conv, nn.Conv2d) else ()
        return type(conv).__name__, geometry, self.depthwise, self.stage


@dataclass
class Structure:
    """What ``discover`` reads from a model: its transferable units and the width of every space."""

    units: list[ConvUnit]
    heads: list[str]
    widths: dict[int, int]
    stream_norms: dict[str, int] = field(default_factory=dict)
    """Norms applied to a space rather than to one unit's output: name -> space."""


class _Tracer(fx.Tracer):
    """fx tracing with every conv, linear and norm as one node (their subclasses too, e.g. timm's)."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, UNITS + NORMS) or super().is_leaf_module(m, module_qualified_name)


@dataclass
class _Flow:
    """What the walk knows about a node's value: its channel space, total stride, the unit whose
    output it still is, and (for parameters) the state-dict key it comes from."""

    space: int | None = None
    stride: int = 1
    unit: ConvUnit | None = None
    param: str | None = None


class _Spaces:
    """Union-find over channel spaces, each with a width."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.width: list[int] = []

    def new(self, width: int) -> int:
        self.parent.append(len(self.parent))
        self.width.append(width)
        return len(self.parent) - 1

    def find(self, space: int) -> int:
        while self.parent[space] != space:
            self.parent[space] = self.parent[self.parent[space]]
            space = self.parent[space]
        return space

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb and self.width[ra] == self.width[rb]:
            self.parent[rb] = ra


def _trace(model: nn.Module) -> fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure is one line naming the model
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"filter transfer cannot trace {type(model).__name__} with torch.fx: {first}") from None


def _per_channel_keys(module: nn.Module, prefix: str, width: int) -> list[str]:
    return [
        f"{prefix}.{key}"
        for key, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if tensor is not None and tensor.dim() >= 1 and tensor.shape[0] == width
    ]


def _width(module: nn.Module) -> int:
    """The channel count of a norm: the length of its first per-channel tensor."""
    tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
    return next((t.shape[0] for t in tensors if t is not None and t.dim() >= 1), 0)


def _stage(stride: int) -> str:
    return f"level{int(round(math.log2(stride)))}"


class _Walk:
    """One pass over the traced graph in execution order (see the module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.state = model.state_dict(keep_vars=True)
        self.spaces = _Spaces()
        self.flows: dict[fx.Node, _Flow] = {}
        self.units: list[ConvUnit] = []
        self.stream_norms: dict[str, int] = {}
        self.output: int | None = None

    def inputs(self, node: fx.Node) -> list[_Flow]:
        return [self.flows[arg] for arg in node.all_input_nodes if arg in self.flows]

    def run(self, graph: fx.Graph) -> Structure:
        for node in graph.nodes:
            self.flows[node] = self.visit(node)
        roots = {unit.name: self.spaces.find(unit.out_space) for unit in self.units}
        for unit in self.units:
            unit.out_space = roots[unit.name]
            unit.in_space = None if unit.in_space is None else self.spaces.find(unit.in_space)
        out = None if self.output is None else self.spaces.find(self.output)
        heads = [unit.name for unit in self.units if unit.out_space == out]
        widths = {self.spaces.find(s): self.spaces.width[s] for s in range(len(self.spaces.parent))}
        norms = {name: self.spaces.find(space) for name, space in self.stream_norms.items()}
        return Structure([u for u in self.units if u.name not in heads], heads, widths, norms)

    def visit(self, node: fx.Node) -> _Flow:
        if node.op == "placeholder":
            return _Flow(space=self.spaces.new(0))
        if node.op == "get_attr":
            return _Flow(param=str(node.target))
        ins = self.inputs(node)
        if node.op == "output":
            self.output = next((f.space for f in ins if f.space is not None), None)
            return _Flow()
        if node.op == "call_module":
            return self.visit_module(node, self.modules[str(node.target)], ins)
        if node.target in CONCAT and sum(f.space is not None for f in ins) > 1:
            raise ValueError(
                f"filter transfer does not support channel concatenation ({node.name} in "
                f"{type(self.model).__name__}): only residual additions join channels"
            )
        if node.target in MIXING and len(ins) > 1:
            return self.mix(ins)
        first = next((f for f in ins if f.space is not None or f.param is not None), _Flow())
        return _Flow(first.space, max((f.stride for f in ins), default=1), first.unit, first.param)

    def mix(self, ins: list[_Flow]) -> _Flow:
        spaced = [f for f in ins if f.space is not None]
        for other in spaced[1:]:
            self.spaces.union(spaced[0].space, other.space)
        params = [f.param for f in ins if f.param is not None]
        if len(spaced) == 1 and params and spaced[0].unit is not None:
            unit = spaced[0].unit
            unit.followers += [key for key in params if key in self.state and self.state[key].numel() == unit.out_channels]
            return _Flow(spaced[0].space, spaced[0].stride, unit)
        if not spaced:
            return _Flow()
        return _Flow(spaced[0].space, max(f.stride for f in spaced))

    def visit_module(self, node: fx.Node, module: nn.Module, ins: list[_Flow]) -> _Flow:
        flow = ins[0] if ins else _Flow()
        name = str(node.target)
        if isinstance(module, UNITS):
            return self.unit(name, module, flow)
        if isinstance(module, NORMS):
            if flow.unit is not None:
                if flow.unit.bn is None:
                    flow.unit.bn = module
                flow.unit.followers += _per_channel_keys(module, name, flow.unit.out_channels)
            elif flow.space is not None:
                self.stream_norms[name] = flow.space
            return flow
        stride = module.stride if isinstance(module, POOLS) else 1
        stride = stride[0] if isinstance(stride, tuple) else stride
        return _Flow(flow.space, flow.stride * int(stride), flow.unit)

    def unit(self, name: str, module: nn.Module, flow: _Flow) -> _Flow:
        stride = flow.stride * (module.stride[0] if isinstance(module, nn.Conv2d) else 1)
        in_space = flow.space
        if in_space is not None and self.spaces.width[in_space] == 0:
            self.spaces.width[in_space] = module.weight.shape[1] * getattr(module, "groups", 1)
        if in_space is not None and self.spaces.width[self.spaces.find(in_space)] != module.weight.shape[1] * getattr(
            module, "groups", 1
        ):
            in_space = None  # e.g. a linear layer over flattened spatial positions: its inputs are not channels
        groups = getattr(module, "groups", 1)
        depthwise = groups > 1 and groups == module.weight.shape[0] and module.weight.shape[1] == 1
        if groups > 1 and not depthwise:
            raise ValueError(
                f"filter transfer does not support grouped conv {name} (groups={groups}, "
                f"{module.weight.shape[1] * groups} -> {module.weight.shape[0]} channels): only dense "
                "and depthwise convs"
            )
        out_space = in_space if depthwise and in_space is not None else self.spaces.new(module.weight.shape[0])
        unit = ConvUnit(name, _stage(stride), module, None, in_space, out_space, depthwise)
        self.units.append(unit)
        return _Flow(out_space, stride, unit)


def discover(model: nn.Module) -> Structure:
    """The transferable units of ``model`` and their channel spaces (see the module docstring)."""
    return _Walk(model).run(_trace(model))


def conv_units(model: nn.Module) -> list[ConvUnit]:
    """Every transferable conv or linear layer of ``model`` in graph order (heads left out)."""
    return discover(model).units


def same_architecture(source: list[ConvUnit], target: list[ConvUnit]) -> bool:
    """Whether two unit lists have the same units in graph order (kind, kernel, stride, stage, name)."""
    return [(u.kind, u.name) for u in source] == [(u.kind, u.name) for u in target]


def match_units(source: list[ConvUnit], target: list[ConvUnit]) -> dict[str, ConvUnit]:
    """Each target unit's source partner (see the module docstring); unmatched units are absent."""
    if same_architecture(source, target):
        return {t.name: s for s, t in zip(source, target)}
    queues: dict[tuple[str, tuple[int, ...]], list[ConvUnit]] = {}
    for unit in source:
        queues.setdefault((unit.stage, unit.shape), []).append(unit)
    pairs = {}
    for unit in target:
        partners = queues.get((unit.stage, unit.shape))
        if partners:
            pairs[unit.name] = partners.pop(0)
    return pairs


def _choose(select: Selector, partner: ConvUnit, k: int, generator: torch.Generator) -> Choice:
    """The strategy's ``k`` channels of the source unit ``partner`` (it sees the unit's filters, name and
    following norm), with their scores."""
    return choose(select, partner.conv.weight, k, generator, partner.name, partner.bn)


@dataclass(frozen=True)
class _Channels:
    """One channel space's transfer: source channels, the target positions they go to, and the choice."""

    source: list[int]
    target: list[int]
    strategy: str = ""
    scores: list[float] = field(default_factory=list)


class CNNFilterTransfer(TransferAdapter):
    """Filter transfer between two CNNs of one model class, structure from the module graph (module docstring)."""

    @classmethod
    def matches(cls, source: nn.Module, target: nn.Module) -> bool:
        """Models of one class, with convs, that are not transformers (a ``patch_embed``: see the ViT rule)."""
        return (
            type(source) is type(target)
            and not hasattr(target, "patch_embed")
            and any(isinstance(m, nn.Conv2d) for m in target.modules())
        )

    def plan(
        self, source: nn.Module, target: nn.Module, alpha: float, select: Selector, generator: torch.Generator
    ) -> list[PlanRow]:
        sources, targets = discover(source), discover(target)
        pairs = match_units(sources.units, targets.units)
        channels: dict[int, _Channels] = {}
        rows = []
        for unit in targets.units:
            partner = pairs.get(unit.name)
            if partner is None:
                rows.append(PlanRow(unit.name, "", 0, unit.out_channels, []))
                continue
            if unit.out_space not in channels:
                width = targets.widths[unit.out_space]
                k = min(count_for(alpha, width), partner.out_channels)
                choice = _choose(select, partner, k, generator)
                chosen = list(choice.indices)
                packed = chosen if width == partner.out_channels else list(range(len(chosen)))
                channels[unit.out_space] = _Channels(chosen, packed, choice.strategy, list(choice.scores))
            rows.append(self._row(unit, partner, channels))
        if same_architecture(sources.units, targets.units):
            rows += [
                PlanRow(
                    name,
                    name,
                    len(channels[space].target),
                    targets.widths[space],
                    list(channels[space].target),
                    source_indices=list(channels[space].source),
                    strategy=channels[space].strategy,
                    scores=list(channels[space].scores),
                )
                for name, space in targets.stream_norms.items()
                if space in channels and channels[space].target and name in sources.stream_norms
            ]
        if not any(row.source for row in rows):
            raise ValueError(
                f"no conv of downstream {type(target).__name__} matches a conv of upstream "
                f"{type(source).__name__} (same weight shape in the same stage, or the same "
                "architecture at another width), so nothing can be copied"
            )
        return rows

    @staticmethod
    def _row(unit: ConvUnit, partner: ConvUnit, channels: dict[int, _Channels]) -> PlanRow:
        out = channels[unit.out_space]
        if max(out.source, default=-1) >= partner.out_channels:
            return PlanRow(unit.name, partner.name, 0, unit.out_channels, [])
        if unit.depthwise or unit.in_channels == partner.in_channels:
            return PlanRow(
                unit.name,
                partner.name,
                len(out.target),
                unit.out_channels,
                list(out.target),
                source_indices=list(out.source),
                strategy=out.strategy,
                scores=list(out.scores),
            )
        inputs = channels.get(unit.in_space) if unit.in_space is not None else None
        if not inputs or not inputs.target:
            return PlanRow(unit.name, partner.name, 0, unit.out_channels, [])
        return PlanRow(
            unit.name,
            partner.name,
            len(out.target),
            unit.out_channels,
            list(out.target),
            source_indices=list(out.source),
            input_indices=list(inputs.target),
            source_input_indices=list(inputs.source),
            strategy=out.strategy,
            scores=list(out.scores),
        )

    @torch.no_grad()
    def apply(self, source: nn.Module, target: nn.Module, plan: list[PlanRow]) -> None:
        sources = {unit.name: unit for unit in conv_units(source)}
        targets = {unit.name: unit for unit in conv_units(target)}
        source_state, target_state = source.state_dict(), target.state_dict()
        for row in plan:
            if not row.indices:
                continue
            if row.target not in targets:  # a stream norm: its per-channel tensors
                norm = source.get_submodule(row.source)
                norm_keys = zip(
                    _per_channel_keys(target.get_submodule(row.target), row.target, row.total),
                    _per_channel_keys(norm, row.source, _width(norm)),
                    strict=True,
                )
                for target_key, source_key in norm_keys:
                    copy_rows(source_state[source_key], target_state[target_key], row, None)
                continue
            src, dst = sources[row.source], targets[row.target]
            keys = [
                (f"{dst.name}.{key}", f"{src.name}.{key}")
                for key in ("weight", "bias")
                if getattr(dst.conv, key, None) is not None and getattr(src.conv, key, None) is not None
            ]
            if len(dst.followers) == len(src.followers):
                keys += list(zip(dst.followers, src.followers))
            for target_key, source_key in keys:
                inputs = row.input_indices if target_key == f"{dst.name}.weight" else None
                copy_rows(source_state[source_key], target_state[target_key], row, inputs)

    def units(self, target: nn.Module, plan: list[PlanRow]) -> list[UnitBlock]:
        """Each copied output channel of a conv or linear unit: its weight entries over the copied input channels
        (all of them, kernel included, unless element selection copied only some); biases, followers and stream
        norms stay as copied."""
        targets = {unit.name: unit for unit in conv_units(target)}
        return [
            UnitBlock(row.target, targets[row.target].conv.weight.data, row.indices, row.input_indices)
            for row in plan
            if row.indices and row.target in targets
        ]


def copy_rows(source: torch.Tensor, target: torch.Tensor, row: PlanRow, inputs: list[int] | None) -> None:
    """``target[row.indices] = source[row.source_indices]`` in place, restricted to the input channels
    ``inputs`` (dim 1, from ``row.source_input_indices``) when given."""
    out = torch.tensor(row.indices, device=target.device)
    src_out = torch.tensor(row.source_indices or row.indices, device=source.device)
    if inputs is None:
        target[out] = source[src_out].to(target)
        return
    into = torch.tensor(inputs, device=target.device)
    src_in = torch.tensor(row.source_input_indices, device=source.device)
    target[out[:, None], into[None, :]] = source[src_out[:, None], src_in[None, :]].to(target)

"""Filter transfer between two torchvision CNNs of one family (ResNet -> ResNet, VGG -> VGG), docs/design.md section 4.

The rule, exactly:

1. Stages. ResNet: ``stem`` (``conv1``) and ``layer1`` .. ``layer4`` (block convs and the downsample
   conv). VGG: ``block1`` .. ``block5``, the convs between consecutive max-pools of ``features``.
2. Matching. Within a stage, the i-th downstream conv of a given weight shape (out, in, kh, kw) takes
   the i-th upstream conv of that shape in the same stage (module order). A downstream conv with no
   such partner keeps its fresh init (plan row with an empty ``source`` and 0 copied). The heads
   (``fc``, ``classifier``) are never transferred: the tasks' classes differ.
3. Channels. Per (stage, output-channel count) one set of ``count_for(alpha, C)`` channel indices is
   selected by ``transfer.selection`` (``ptlab.transfer.selection``) from the first matched upstream conv
   of that group (its weights, name and BatchNorm) and used by every matched conv of that group, at the
   same positions in the downstream conv. A copied filter keeps all its input weights, so a transferred channel
   reads the channels below it at the positions where the transferred channels of that stage sit;
   within a ResNet stage the residual stream's channels (conv3/downsample, or both BasicBlock convs)
   all use one index set, so transferred channels add up with transferred channels.
4. Copied values: the filters ``weight[idx]`` (and ``bias[idx]`` when both convs have one), and of
   the BatchNorm registered right after each conv its ``weight``, ``bias``, ``running_mean`` and
   ``running_var`` at ``idx``. Everything else stays at the downstream model's fresh init.
5. A pair where no conv matches raises ``ValueError`` with one line.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torchvision.models import VGG, ResNet

from ptlab.transfer.adapters import PlanRow, TransferAdapter
from ptlab.transfer.selection import Choice, Selector, choose, count_for

FAMILIES: tuple[type[nn.Module], ...] = (ResNet, VGG)


@dataclass(frozen=True)
class ConvUnit:
    """A conv layer, its stage and the BatchNorm that follows it (``None`` when there is none)."""

    name: str
    stage: str
    conv: nn.Conv2d
    bn: nn.BatchNorm2d | None

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.conv.weight.shape)


def _stage_of(model: nn.Module, name: str, pools_before: int) -> str | None:
    if isinstance(model, ResNet):
        if name == "conv1":
            return "stem"
        top = name.split(".")[0]
        return top if top.startswith("layer") else None
    return f"block{pools_before + 1}" if name.startswith("features.") else None


def conv_units(model: nn.Module) -> list[ConvUnit]:
    """Every conv of ``model`` with a stage, in module order, paired with the BatchNorm after it."""
    modules = list(model.named_modules())
    units, pools = [], 0
    for position, (name, module) in enumerate(modules):
        if isinstance(module, nn.MaxPool2d) and name.startswith("features."):
            pools += 1
        if not isinstance(module, nn.Conv2d):
            continue
        stage = _stage_of(model, name, pools)
        if stage is None:
            continue
        following = modules[position + 1][1] if position + 1 < len(modules) else None
        bn = following if isinstance(following, nn.BatchNorm2d) and following.num_features == module.out_channels \
            else None
        units.append(ConvUnit(name, stage, module, bn))
    return units


def _family(model: nn.Module) -> type[nn.Module] | None:
    return next((family for family in FAMILIES if isinstance(model, family)), None)


class CNNFilterTransfer(TransferAdapter):
    """Same-shape convs matched per stage, an alpha-fraction of output filters copied (module docstring)."""

    @classmethod
    def matches(cls, source: nn.Module, target: nn.Module) -> bool:
        family = _family(source)
        return family is not None and isinstance(target, family)

    def plan(self, source: nn.Module, target: nn.Module, alpha: float, select: Selector,
             generator: torch.Generator) -> list[PlanRow]:
        queues: dict[tuple[str, tuple[int, ...]], list[ConvUnit]] = {}
        for unit in conv_units(source):
            queues.setdefault((unit.stage, unit.shape), []).append(unit)
        chosen: dict[tuple[str, int], Choice] = {}
        rows = []
        for unit in conv_units(target):
            total = unit.conv.out_channels
            partners = queues.get((unit.stage, unit.shape))
            if not partners:
                rows.append(PlanRow(unit.name, "", 0, total, []))
                continue
            partner = partners.pop(0)
            group = (unit.stage, total)
            if group not in chosen:
                k = count_for(alpha, total)
                chosen[group] = choose(select, partner.conv.weight, k, generator, partner.name, partner.bn)
            choice = chosen[group]
            rows.append(PlanRow(unit.name, partner.name, len(choice.indices), total, list(choice.indices),
                                strategy=choice.strategy, scores=list(choice.scores)))
        if not any(row.source for row in rows):
            raise ValueError(f"no conv of downstream {type(target).__name__} matches a conv of upstream "
                             f"{type(source).__name__} (same weight shape in the same stage), so nothing can be copied")
        return rows

    @torch.no_grad()
    def apply(self, source: nn.Module, target: nn.Module, plan: list[PlanRow]) -> None:
        sources = {unit.name: unit for unit in conv_units(source)}
        targets = {unit.name: unit for unit in conv_units(target)}
        for row in plan:
            if not row.indices:
                continue
            src, dst = sources[row.source], targets[row.target]
            pairs = [(src.conv.weight, dst.conv.weight)]
            if src.conv.bias is not None and dst.conv.bias is not None:
                pairs.append((src.conv.bias, dst.conv.bias))
            if src.bn is not None and dst.bn is not None:
                pairs += [(getattr(src.bn, key), getattr(dst.bn, key))
                          for key in ("weight", "bias", "running_mean", "running_var")]
            for from_tensor, to_tensor in pairs:
                idx = torch.tensor(row.indices, device=to_tensor.device)
                to_tensor[idx] = from_tensor[idx.to(from_tensor.device)].to(to_tensor)

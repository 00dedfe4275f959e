"""Layer transfer between timm vision transformers ("VanillaLG", docs/design.md section 4).

The downstream ViT inherits whole transformer blocks from the upstream ViT, the rest keeps its fresh
init (timm's: trunc-normal std 0.02), and the classifier head is always new. Which blocks:

- ``layers=[9, 10, 11]`` (the paper's choice for DeiT-Base): exactly these block indices; or
- ``layers=None``: ``round(alpha * depth)`` of the downstream's blocks (``count_for``), the
  ``position`` ``last``, ``first`` or ``random`` (seeded) ones.

Blocks map by index: downstream block ``i`` receives upstream block ``i``. When the two depths differ,
only indices below the smaller depth can be inherited, and ``position`` picks among those (``last``
with a 12-block upstream and a 6-block downstream, or the reverse, means blocks 3, 4, 5 when
``alpha=0.5`` of 6 blocks). Switches choose whether the patch embedding, class token (and
distillation/register tokens), position embedding and final norm are inherited too; Learngene's code
inherits all four, and so do the defaults.

The plan has one row per downstream component that holds parameters, in state-dict order
(``cls_token``, ``pos_embed``, ``patch_embed``, ``blocks.0`` ... ``blocks.{depth-1}``, ``norm``,
``head``): ``source`` is the upstream component copied into it (empty when it keeps its fresh init),
``copied``/``total`` count scalar parameters, so the rows sum to the inherited fraction of the model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from ptlab.transfer.adapters import PlanRow, TransferAdapter
from ptlab.transfer.selection import Selector, count_for

POSITIONS = ("last", "first", "random")

SWITCH_OF = {
    "patch_embed": "patch_embed",
    "norm_pre": "patch_embed",
    "cls_token": "cls_token",
    "dist_token": "cls_token",
    "reg_token": "cls_token",
    "pos_embed": "pos_embed",
    "norm": "norm",
    "fc_norm": "norm",
}
"""Which switch decides a non-block component; components not listed (the heads) are never inherited."""


def components(model: nn.Module) -> list[tuple[str, dict[str, Tensor]]]:
    """``(name, state)`` of every component of a ViT with parameters or buffers, blocks one by one,
    in state-dict order; ``state`` maps the full state-dict keys to tensors."""
    groups: dict[str, dict[str, Tensor]] = {}
    for key, tensor in model.state_dict().items():
        parts = key.split(".")
        name = ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]
        groups.setdefault(name, {})[key] = tensor
    return list(groups.items())


def block_indices(
    layers: Sequence[int] | None, position: str, alpha: float, source_depth: int, target_depth: int, generator: torch.Generator
) -> list[int]:
    """The downstream block indices that inherit the upstream block of the same index."""
    shared = min(source_depth, target_depth)
    depths = f"upstream depth {source_depth}, downstream depth {target_depth}"
    if layers is not None:
        outside = sorted({i for i in layers if not 0 <= i < shared})
        if outside:
            raise ValueError(
                f"transfer.layers={list(layers)} has blocks {outside} outside 0..{shared - 1} ({depths}; blocks map by index)"
            )
        return sorted(set(layers))
    k = count_for(alpha, target_depth)
    if k > shared:
        raise ValueError(f"transfer.alpha={alpha} asks for {k} blocks but only {shared} can map by index ({depths})")
    if position == "first":
        return list(range(k))
    if position == "last":
        return list(range(shared - k, shared))
    return torch.randperm(shared, generator=generator)[:k].sort().values.tolist()


class ViTLayerTransfer(TransferAdapter):
    """Inherit whole blocks (and by default the embeddings and final norm) of a timm ViT."""

    def __init__(
        self,
        layers: Sequence[int] | None = None,
        position: str = "last",
        patch_embed: bool = True,
        cls_token: bool = True,
        pos_embed: bool = True,
        norm: bool = True,
    ) -> None:
        if position not in POSITIONS:
            raise ValueError(f"transfer.position={position!r} is unknown: choose one of {', '.join(POSITIONS)}")
        self.layers = None if layers is None else [int(i) for i in layers]
        self.position = position
        self.switches = {"patch_embed": patch_embed, "cls_token": cls_token, "pos_embed": pos_embed, "norm": norm}

    @classmethod
    def matches(cls, source: nn.Module, target: nn.Module) -> bool:
        return isinstance(source, VisionTransformer) and isinstance(target, VisionTransformer)

    def plan(
        self, source: nn.Module, target: nn.Module, alpha: float, select: Selector, generator: torch.Generator
    ) -> list[PlanRow]:
        """``select`` (the filter selection) is unused: ``layers`` or ``position`` choose the blocks."""
        if source.embed_dim != target.embed_dim:
            raise ValueError(
                f"layer transfer needs equal embedding widths: upstream embed_dim {source.embed_dim} "
                f"vs downstream {target.embed_dim}"
            )
        chosen = set(block_indices(self.layers, self.position, alpha, len(source.blocks), len(target.blocks), generator))
        source_state = dict(components(source))
        rows = []
        for name, state in components(target):
            total = sum(t.numel() for t in state.values() if t.is_floating_point())
            inherit = (
                int(name.split(".")[1]) in chosen
                if name.startswith("blocks.")
                else self.switches.get(SWITCH_OF.get(name, ""), False)
            )
            if inherit:
                self._check_shapes(name, source_state.get(name, {}), state)
            rows.append(PlanRow(target=name, source=name if inherit else "", copied=total if inherit else 0, total=total))
        return rows

    @staticmethod
    def _check_shapes(name: str, source: dict[str, Tensor], target: dict[str, Tensor]) -> None:
        source_shapes = {k: tuple(v.shape) for k, v in source.items()}
        target_shapes = {k: tuple(v.shape) for k, v in target.items()}
        if source_shapes != target_shapes:
            switch = SWITCH_OF.get(name)
            hint = f"set transfer.{switch}=false or " if switch else ""
            raise ValueError(
                f"cannot inherit {name}: upstream shapes {source_shapes} vs downstream "
                f"{target_shapes}; {hint}use the same model.img_size/patch_size/width upstream"
            )

    @torch.no_grad()
    def apply(self, source: nn.Module, target: nn.Module, plan: list[PlanRow]) -> None:
        source_state = dict(components(source))
        inherited = {key: tensor for row in plan if row.source for key, tensor in source_state[row.source].items()}
        result = target.load_state_dict(inherited, strict=False)
        if result.unexpected_keys:
            raise ValueError(f"layer transfer produced keys the downstream model lacks: {result.unexpected_keys}")

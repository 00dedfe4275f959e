"""Controls of a transfer (``transfer.control``, docs/design.md section 7): what an inherited filter carries.

After the adapter has copied the planned units, a control replaces what each inherited *unit* holds:

- ``none``: the inherited entries as copied (Algorithm 1);
- ``norm_matched``: a random direction with the inherited unit's norm, ``||w|| g / ||g||`` with ``g`` a fresh
  standard Gaussian draw; it keeps the norm and nothing else ("is it the norm?");
- ``shuffled``: the inherited entries permuted within the unit, an independent uniform permutation per unit; it
  keeps the norm and the multiset of values, not the feature.

A *unit* is one inherited output channel's weight entries: a row ``w_{j,r}`` (d entries) of the two-layer CNN, an
output channel ``weight[o]`` of a conv (``in x kh x kw`` entries, kernel included) or a row of a linear layer. With
element selection (different input widths) only the entries the transfer wrote, ``weight[o, input_indices]``, form
the unit; the entries that kept their fresh init are left alone. Biases, the following norm's per-channel
parameters and stream norms stay as inherited: they are one number per channel, with no direction to replace.

Draws come from named seed streams (``ptlab.seeding``): per layer ``derive_seed(seed, control, layer)``, drawn
for every unit of the layer's weight (in float64) and read at the inherited positions, so a unit's draw depends
on its position, not on which other units were selected, and the gram engine can draw the same vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ptlab.seeding import generator

CONTROLS = ("none", "norm_matched", "shuffled")
"""``transfer.control`` values (``ptlab.config.CONTROLS`` repeats them for the torch-free preflight; a test checks)."""


@dataclass
class UnitBlock:
    """The inherited units of one layer: ``weight[rows]`` (restricted to ``weight[:, cols]`` when ``cols`` is set),
    ``weight`` the target's weight (or a view of it) with units along dim 0; ``name`` names the seed stream."""

    name: str
    weight: Tensor
    rows: list[int]
    cols: list[int] | None = None


def control_draw(seed: int, control: str, name: str, shape: tuple[int, ...]) -> Tensor:
    """The control's draw for every unit of a layer of ``shape`` (float64): Gaussian entries (``norm_matched``), or
    uniform keys whose per-row argsort is the permutation (``shuffled``)."""
    gen = generator(seed, control, name)
    if control == "norm_matched":
        return torch.randn(shape, generator=gen, dtype=torch.float64)
    return torch.rand(shape[0], int(torch.tensor(shape[1:]).prod()), generator=gen, dtype=torch.float64)


def _block(tensor: Tensor, rows: Tensor, cols: Tensor | None) -> Tensor:
    return tensor[rows] if cols is None else tensor[rows[:, None], cols[None, :]]


def controlled(units: Tensor, draw: Tensor, control: str) -> Tensor:
    """The control applied to ``units`` (k, n), one unit a row, given its rows ``draw`` (k, n) of ``control_draw``."""
    if control == "norm_matched":
        direction = draw / torch.linalg.vector_norm(draw, dim=1, keepdim=True)
        return direction * torch.linalg.vector_norm(units.double(), dim=1, keepdim=True)
    return torch.gather(units, 1, draw.argsort(dim=1))


@torch.no_grad()
def apply_control(control: str, units: list[UnitBlock], seed: int) -> None:
    """Replace the inherited units in place as ``control`` says (``none``: nothing)."""
    if control not in CONTROLS:
        raise ValueError(f"transfer.control={control!r} is not allowed: must be one of {', '.join(CONTROLS)}")
    if control == "none":
        return
    for unit in units:
        if not unit.rows:
            continue
        weight = unit.weight
        rows = torch.tensor(unit.rows, device=weight.device)
        cols = None if unit.cols is None else torch.tensor(unit.cols, device=weight.device)
        block = _block(weight, rows, cols)
        draw = control_draw(seed, control, unit.name, tuple(weight.shape))
        if control == "norm_matched":
            draw = _block(draw, rows.cpu(), None if cols is None else cols.cpu())
        else:  # permutation keys for the unit's own entries
            draw = draw[rows.cpu(), : block[0].numel()]
        new = controlled(block.reshape(len(rows), -1), draw.reshape(len(rows), -1).to(block.device), control)
        new = new.reshape(block.shape).to(weight)
        if cols is None:
            weight[rows] = new
        else:
            weight[rows[:, None], cols[None, :]] = new

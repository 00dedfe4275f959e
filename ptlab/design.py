"""Random designs: cells drawn at random over a box of config values, each cell with its own seeds.

A box maps config keys to ranges (``conf/design/*.yaml``)::

    task.d: {low: 500, high: 6000, scale: log, type: int}   # log-uniform, rounded to an integer
    task.u_norm: {low: 0, high: 3, p_low: 0.15}             # uniform; exactly ``low`` with probability 0.15
    model.width: 40                                         # a fixed value

``draw_design(box, seed, cells, seeds)`` draws the cells with ``numpy.random.default_rng(seed)`` (the same
seed, box and sizes give the same file) and gives cell ``i`` the run seeds ``seed_base + i * seeds ...
+ seeds - 1`` with ``seed_base = seed * SEED_STRIDE``: no two cells of one design, nor of designs with
different seeds, share a run seed, so no common random numbers tie cells together (ptlab.seeding derives
every data, init and test-set stream from the run seed). ``python -m ptlab.report design`` writes the
cells file that ``hydra.sweeper.cells`` of the ``ptlab_batched`` sweeper runs. Imports neither torch nor
MLflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

SEED_STRIDE = 1_000_000
"""Run seeds of design ``s`` lie in ``[s * SEED_STRIDE, (s + 1) * SEED_STRIDE)``."""
SCALES = ("linear", "log")
TYPES = ("float", "int")


class DesignError(ValueError):
    """A box or design that cannot be drawn; the message is one line."""


@dataclass(frozen=True)
class Range:
    """One key's range: uniform on ``[low, high]`` (log-uniform with ``scale: log``), exactly ``low`` with
    probability ``p_low``, rounded to an integer with ``type: int``, else to ``digits`` significant digits."""

    low: float
    high: float
    scale: str = "linear"
    type: str = "float"
    p_low: float = 0.0
    digits: int = 3

    def __post_init__(self) -> None:
        if self.scale not in SCALES or self.type not in TYPES:
            raise DesignError(f"scale={self.scale} type={self.type}: scale is one of {SCALES}, type one of {TYPES}")
        if not self.low <= self.high or (self.scale == "log" and self.low <= 0):
            raise DesignError(f"low={self.low} high={self.high}: need low <= high (and low > 0 with scale: log)")
        if not 0 <= self.p_low < 1:
            raise DesignError(f"p_low={self.p_low}: a probability in [0, 1)")

    def draw(self, rng: np.random.Generator) -> float | int:
        if self.p_low and rng.random() < self.p_low:
            value = self.low
        elif self.scale == "log":
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        if self.type == "int":
            return int(min(max(round(value), math.ceil(self.low)), math.floor(self.high)))
        return float(f"{value:.{self.digits}g}")


def parse_box(raw: Mapping[str, Any]) -> dict[str, Range | Any]:
    """A box from its YAML mapping: a mapping with ``low``/``high`` is a ``Range``, anything else a fixed value."""
    if not raw:
        raise DesignError("the box is empty: give at least one key with a range")
    box: dict[str, Range | Any] = {}
    for key, spec in raw.items():
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"low", "high", "scale", "type", "p_low", "digits"}
            if unknown or not {"low", "high"} <= set(spec):
                raise DesignError(f"{key}={dict(spec)}: a range has low, high and optionally scale, type, p_low, digits")
            box[key] = Range(**{k: (float(v) if k in ("low", "high", "p_low") else v) for k, v in spec.items()})
        else:
            box[key] = spec
    return box


def load_box(path: str | Path) -> dict[str, Range | Any]:
    """The box of a YAML file (its top-level ``box:`` mapping, or the whole file)."""
    raw = yaml.safe_load(Path(path).read_text())
    if not isinstance(raw, Mapping):
        raise DesignError(f"box file {path}: a YAML mapping of config keys to ranges")
    return parse_box(raw.get("box", raw))


def _text(value: Any) -> str:
    return repr(value) if isinstance(value, float) else str(value)


def draw_design(box: Mapping[str, Range | Any], seed: int, cells: int, seeds: int = 16) -> list[list[str]]:
    """``cells`` cells, each a list of Hydra overrides: the drawn values (keys in the box's order) and
    ``seed=range(a,b)``, its own ``seeds`` run seeds (module docstring)."""
    if cells < 1 or seeds < 1 or cells * seeds > SEED_STRIDE:
        raise DesignError(f"cells={cells} seeds={seeds}: both >= 1 and cells * seeds <= {SEED_STRIDE}")
    if seed < 0:
        raise DesignError(f"seed={seed}: a non-negative integer")
    rng = np.random.default_rng(seed)
    design = []
    for index in range(cells):
        overrides = [f"{key}={_text(spec.draw(rng) if isinstance(spec, Range) else spec)}" for key, spec in box.items()]
        first = seed * SEED_STRIDE + index * seeds
        design.append([*overrides, f"seed=range({first},{first + seeds})"])
    return design


def design_yaml(design: list[list[str]], box: Mapping[str, Range | Any], seed: int, seeds: int, command: str) -> str:
    """The cells file: its provenance as comments and data, then ``cells:``, one override list a cell."""
    data = {
        "command": command,
        "design_seed": seed,
        "seeds_per_cell": seeds,
        "box": {k: (vars(v) if isinstance(v, Range) else v) for k, v in box.items()},
        "cells": design,
    }
    header = (
        "# A random design (ptlab.design): each cell is a list of Hydra overrides with its own run seeds.\n"
        "# Run it: python -m ptlab -m experiment=calibration hydra.sweeper.cells=<this file>\n"
    )
    return header + yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=1000)


def read_cells(path: str | Path) -> list[list[str]]:
    """The cells of a cells file (``cells:``, a list of override lists)."""
    file = Path(path)
    if not file.is_file():
        raise DesignError(f"hydra.sweeper.cells={path}: no such file")
    raw = yaml.safe_load(file.read_text())
    cells = raw.get("cells") if isinstance(raw, Mapping) else raw
    if (
        not isinstance(cells, list)
        or not cells
        or not all(isinstance(c, list) and all(isinstance(o, str) for o in c) for c in cells)
    ):
        raise DesignError(f"hydra.sweeper.cells={path}: a YAML list (or a 'cells:' list) of override lists")
    return cells

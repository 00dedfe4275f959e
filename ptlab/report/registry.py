"""Which renderer draws which experiment: the longest registered prefix of the experiment name wins."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from pathlib import Path

import pandas as pd

Renderer = Callable[[pd.DataFrame, str, Path], list[Path]]
"""``render(runs, experiment, out_dir)`` writes figures/tables into ``out_dir`` and returns their paths."""

RENDERERS: dict[str, Renderer] = {}

RENDERER_MODULES = ["ptlab.report.generic", "ptlab.report.synthetic", "ptlab.report.images", "ptlab.report.vit"]
"""Modules that register renderers when imported; figure modules add themselves here."""


def register(prefix: str) -> Callable[[Renderer], Renderer]:
    """Decorator: ``render`` draws experiments whose name starts with ``prefix``."""
    def wrap(render: Renderer) -> Renderer:
        RENDERERS[prefix] = render
        return render
    return wrap


def renderer_for(experiment: str) -> Renderer:
    """The renderer with the longest prefix of ``experiment`` (the generic table when none matches)."""
    for module in RENDERER_MODULES:
        importlib.import_module(module)
    matches = [p for p in RENDERERS if experiment.startswith(p)]
    return RENDERERS[max(matches, key=len)] if matches else RENDERERS[""]

"""Which renderer draws which experiment: the longest registered prefix of the experiment name wins.

``RENDERERS`` holds lazy references, so a report imports only the module of the renderer it uses; a
user's renderer is one ``RENDERERS.register("prefix")`` (or ``register("prefix")``) away.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ptlab.registry import Registry

if TYPE_CHECKING:
    import pandas as pd

Renderer = Callable[["pd.DataFrame", str, Path], list[Path]]
"""``render(runs, experiment, out_dir)`` writes figures/tables into ``out_dir`` and returns their paths."""

RENDERERS: Registry[Renderer] = Registry("report renderer")
RENDERERS.add("", "ptlab.report.generic:render_generic")
RENDERERS.add("fig1", "ptlab.report.synthetic:render_fig1")
RENDERERS.add("fig2", "ptlab.report.synthetic:render_fig2")
RENDERERS.add("table1", "ptlab.report.images:render_table1")
RENDERERS.add("fig3", "ptlab.report.images:render_fig3")
RENDERERS.add("fig4", "ptlab.report.vit:render_fig4")
RENDERERS.add("selection", "ptlab.report.selection:render_selection")
RENDERERS.add("kou2023", "ptlab.report.kou2023:render_kou2023")
RENDERERS.add("study", "ptlab.report.study:render_study")


def register(prefix: str) -> Callable[[Renderer], Renderer]:
    """Decorator: ``render`` draws experiments whose name starts with ``prefix``."""
    return RENDERERS.register(prefix)


def renderer_for(experiment: str) -> Renderer:
    """The renderer with the longest prefix of ``experiment`` (the generic table when none matches)."""
    matches = [prefix for prefix in RENDERERS.names() if experiment.startswith(prefix)]
    return RENDERERS.get(max(matches, key=len))

"""The grid run's own figure: its final test accuracy over the two most-swept keys (``ptlab.pipeline.batched``).

A grid run replaces thousands of runs by one table, which the MLflow UI cannot preview; this heatmap shows what the
sweep found on the run's page. The report (``python -m ptlab.report``) draws the paper's figures with their theory.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd

FIGURE = "grid_heatmap.png"
METRICS = ("metrics.transfer_test_acc", "metrics.scratch_test_acc")
"""The accuracy drawn: the transfer stage's when the grid transfers, else scratch's."""


def heatmap_axes(table: pd.DataFrame, swept: Sequence[str]) -> tuple[str, str] | None:
    """The two swept keys with the most distinct numeric values (x first; ``seed`` is averaged, never an axis)."""
    numeric = [key for key in swept if key != "seed" and pd.to_numeric(table[f"params.{key}"], errors="coerce").notna().all()]
    ranked = sorted(numeric, key=lambda key: table[f"params.{key}"].nunique(), reverse=True)
    return (ranked[0], ranked[1]) if len(ranked) >= 2 and table[f"params.{ranked[1]}"].nunique() > 1 else None


def grid_means(table: pd.DataFrame, x: str, y: str, metric: str) -> pd.DataFrame:
    """The mean of ``metric`` per (``y``, ``x``) value pair: rows ``y``, columns ``x``, both sorted numerically."""
    frame = pd.DataFrame(
        {x: pd.to_numeric(table[f"params.{x}"]), y: pd.to_numeric(table[f"params.{y}"]), "value": pd.to_numeric(table[metric])}
    )
    return frame.pivot_table(index=y, columns=x, values="value", aggfunc="mean").sort_index().sort_index(axis=1)


def grid_heatmap(table: pd.DataFrame, swept: Sequence[str], path: Path) -> Path | None:
    """Draw the mean final test accuracy over ``heatmap_axes`` (every other key that takes several values averaged)
    to ``path``; ``None`` (nothing drawn) when fewer than two numeric keys vary."""
    swept = [key for key in swept if table[f"params.{key}"].nunique() > 1]  # not the constant overrides
    axes = heatmap_axes(table, swept)
    metric = next((m for m in METRICS if m in table), None)
    if axes is None or metric is None:
        return None
    from matplotlib.figure import Figure  # matplotlib loads only here

    x, y = axes
    grid = grid_means(table, x, y, metric)
    figure = Figure(figsize=(7, 5.2), layout="constrained")
    ax = figure.subplots()
    mesh = ax.pcolormesh(grid.columns.to_numpy(), grid.index.to_numpy(), grid.to_numpy(), shading="nearest", cmap="viridis")
    averaged = [key for key in swept if key not in axes]
    figure.colorbar(
        mesh,
        ax=ax,
        label=f"final {metric.split('.')[1].removesuffix('_test_acc')} test accuracy"
        + (f" (mean over {', '.join(averaged)})" if averaged else ""),
    )
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.set_title(f"grid of {len(table)} cells")
    figure.savefig(path, dpi=120)
    return path


__all__ = ["FIGURE", "grid_heatmap", "grid_means", "heatmap_axes"]

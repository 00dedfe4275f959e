"""The paper's synthetic figures redrawn from MLflow: Figure 1 panels and the Figure 2 phase diagram.

Figure 1 (experiments ``fig1a*``, ``fig1b*``, ``fig1c*``): downstream test accuracy with transfer and
from scratch against the swept value (mean and standard deviation over seeds), beside their gap.
Figure 2 (``fig2*``): the heatmap of transfer test accuracy over (d, ||u||) with the theory boundary
``d = C * D*(||u||)`` (Theorem 4.2), ``C`` fitted so that "accuracy >= threshold" agrees with
"d <= C D*" on as many cells as possible; the agreement fraction goes on the figure and in the table.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from ptlab.report.generic import PHASE_PREDICTED, PREDICTED, swept_params, write_table
from ptlab.report.runs import ReportError, seed_stats
from ptlab.theory import target_signal_norm, threshold_term

TRANSFER, SCRATCH, GAIN = "metrics.transfer_test_acc", "metrics.scratch_test_acc", "metrics.transfer_gain"
D_STAR = "metrics.theory/threshold_term"
THEORY_PARAMS = "params.theory."

FIG1_SWEEPS = {
    "fig1a": ("params.task.n1", "source sample size $N_1$", True),
    "fig1b": ("params.noise.sigma_p1", r"source noise level $\sigma_{p,1}$", False),
    "fig1c": ("params.task.u_norm", r"universal signal norm $\|u\|$", False),
}
"""Per Figure 1 panel: the swept param column, its axis label, and whether the axis is logarithmic."""

NEAR_OPTIMAL_ACCURACY = 0.9
"""Theorem 4.2's sub-optimal regime is test error >= 0.1, so a cell counts as near-optimal at >= 0.9."""


def _require(runs: pd.DataFrame, columns: Sequence[str], experiment: str) -> None:
    missing = [c for c in columns if c not in runs.columns]
    if missing:
        raise ReportError(
            f"experiment {experiment!r} runs lack {', '.join(missing)}: are they synthetic pipelines with transfer?"
        )


def save_figure(figure: Figure, out_dir: Path, stem: str) -> list[Path]:
    """``stem.png`` and ``stem.pdf`` of ``figure``."""
    paths = [out_dir / f"{stem}.png", out_dir / f"{stem}.pdf"]
    for path in paths:
        figure.savefig(path, dpi=150)
    return paths


def _fixed_settings(runs: pd.DataFrame, keys: Sequence[str]) -> str:
    """``d=1000, N2=20, ...`` for the params that are the same in every run."""
    names = {
        "task.d": "d",
        "task.n1": "N1",
        "task.n2": "N2",
        "task.u_norm": "||u||",
        "task.v_norm": "||v||",
        "noise.sigma_p1": "sigma_p1",
        "noise.sigma_p2": "sigma_p2",
        "transfer.alpha": "alpha",
        "model.width": "m",
    }
    parts = []
    for key in keys:
        column = f"params.{key}"
        if column in runs.columns and runs[column].nunique() == 1:
            parts.append(f"{names.get(key, key)}={runs[column].iloc[0]}")
    return ", ".join(parts)


def _mode(values: pd.Series) -> str:
    counts = values.dropna().astype(str).value_counts()
    return counts.index[0] if len(counts) else ""


def _numeric(column: pd.Series) -> pd.Series:
    try:
        return pd.to_numeric(column)
    except (TypeError, ValueError):
        return column


def other_sweeps(runs: pd.DataFrame, x: str) -> list[str]:
    """Params that vary between runs besides ``x``, the seed and the theory's derived labels (each
    combination is its own series)."""
    return [p for p in swept_params(runs) if p != x and not p.startswith(THEORY_PARAMS)]


def fig1_table(runs: pd.DataFrame, x: str) -> pd.DataFrame:
    """Seed statistics of transfer and scratch accuracy and their gap per value of ``x`` (and of any
    other swept param), with the theory's threshold term and most common predicted outcome, and the phase model's."""
    by = [x, *other_sweeps(runs, x)]
    metrics = [TRANSFER, SCRATCH, GAIN]
    table = seed_stats(runs, by, metrics)
    if {D_STAR, PREDICTED, PHASE_PREDICTED} & set(runs.columns):
        frame = runs.copy()
        for column in by:
            frame[column] = _numeric(frame[column])
        theory = (
            frame.groupby(by, sort=True)
            .agg(
                **({"threshold_term": (D_STAR, "mean")} if D_STAR in frame.columns else {}),
                **({"theory_predicted": (PREDICTED, _mode)} if PREDICTED in frame.columns else {}),
                **({"phase_predicted": (PHASE_PREDICTED, _mode)} if PHASE_PREDICTED in frame.columns else {}),
            )
            .reset_index()
        )
        table = table.merge(theory, on=by, how="left")
    table.columns = [c.removeprefix("params.").removeprefix("metrics.") for c in table.columns]
    return table


def _errorbar(ax, table: pd.DataFrame, x: str, metric: str, **style) -> None:
    ax.errorbar(table[x], table[f"{metric}_mean"], yerr=table[f"{metric}_std"].fillna(0.0), capsize=3, marker="o", **style)


def fig1_figure(table: pd.DataFrame, x: str, xlabel: str, log_x: bool, title: str, others: Sequence[str] = ()) -> Figure:
    """Left: test accuracy with transfer and from scratch (mean, std bars); right: their paired gap in points
    (transfer - scratch on the same seed, x 100) with its 95% t interval as a band. A pair of lines per
    combination of the ``others`` columns."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    acc_ax, gain_ax = fig.subplots(1, 2)
    others = list(others)
    groups = table.groupby(others, sort=True) if others else [((), table)]
    for key, group in groups:
        suffix = (
            ""
            if not others
            else " (" + ", ".join(f"{o}={v}" for o, v in zip(others, key if isinstance(key, tuple) else (key,))) + ")"
        )
        _errorbar(acc_ax, group, x, "transfer_test_acc", label=f"transfer{suffix}")
        _errorbar(acc_ax, group, x, "scratch_test_acc", label=f"scratch{suffix}", linestyle="--")
        (line,) = gain_ax.plot(group[x], 100 * group["transfer_gain_mean"], marker="o", label=f"transfer - scratch{suffix}")
        if "transfer_gain_ci_low" in group:
            gain_ax.fill_between(
                group[x],
                100 * group["transfer_gain_ci_low"],
                100 * group["transfer_gain_ci_high"],
                color=line.get_color(),
                alpha=0.2,
                linewidth=0,
            )
    gain_ax.axhline(0.0, color="black", linewidth=0.8)
    acc_ax.set_ylabel("downstream test accuracy")
    gain_ax.set_ylabel("transfer - scratch (points)")
    for ax in (acc_ax, gain_ax):
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
        if log_x:
            ax.set_xscale("log")
        ax.legend(fontsize=8)
    low, high = int(table["transfer_test_acc_count"].min()), int(table["transfer_test_acc_count"].max())
    seeds = f"{low}" if low == high else f"{low}-{high}"
    fig.suptitle(f"{title}\nmean and standard deviation over {seeds} seeds; gap: paired mean, band: 95% t interval", fontsize=10)
    return fig


def render_fig1(runs: pd.DataFrame, experiment: str, out_dir: Path) -> list[Path]:
    """A Figure 1 panel: accuracy with transfer and from scratch against the swept value."""
    sweep = next((v for k, v in FIG1_SWEEPS.items() if experiment.startswith(k)), None)
    if sweep is None:
        candidates = [p for p in swept_params(runs) if not p.startswith(THEORY_PARAMS)]
        if not candidates:
            raise ReportError(f"experiment {experiment!r}: no swept param to put on the x axis")
        sweep = (candidates[0], candidates[0].removeprefix("params."), False)
    x, xlabel, log_x = sweep
    _require(runs, [x, TRANSFER, SCRATCH, GAIN], experiment)
    table = fig1_table(runs, x)
    column = x.removeprefix("params.")
    fixed = _fixed_settings(
        runs,
        [
            "task.d",
            "task.n1",
            "task.n2",
            "task.u_norm",
            "task.v_norm",
            "noise.sigma_p1",
            "noise.sigma_p2",
            "transfer.alpha",
            "model.width",
        ],
    )
    others = [o.removeprefix("params.") for o in other_sweeps(runs, x)]
    figure = fig1_figure(table, column, xlabel, log_x, f"{experiment}: {fixed}", others)
    return [*save_figure(figure, out_dir, experiment), *write_table(table, out_dir, experiment)]


@dataclass(frozen=True)
class BoundaryFit:
    """The fitted boundary ``d = c * D*``: every ``c`` in ``[c_low, c_high)`` agrees on ``agreeing`` of
    ``cells``; ``c`` is their geometric middle."""

    c: float
    c_low: float
    c_high: float
    agreeing: int
    cells: int
    accuracy_threshold: float

    @property
    def agreement(self) -> float:
        return self.agreeing / self.cells if self.cells else math.nan


def fit_boundary(
    d: np.ndarray, d_star: np.ndarray, accuracy: np.ndarray, accuracy_threshold: float = NEAR_OPTIMAL_ACCURACY
) -> BoundaryFit:
    """The ``C`` whose regime ``d <= C D*`` agrees best with ``accuracy >= accuracy_threshold``.

    Agreement only changes where ``C`` crosses a cell's ratio ``d / D*``, so one ``C`` per interval
    between consecutive ratios is tried; the first best interval wins. Cells with a nan ratio (nan
    ``D*``) are left out; a ratio of 0 (``D* = inf``) is near-optimal and of inf (``D* = 0``) sub-optimal
    for every ``C``.
    """
    ratio = np.asarray(d, float) / np.asarray(d_star, float)
    observed = np.asarray(accuracy, float) >= accuracy_threshold
    keep = ~np.isnan(ratio)
    ratio, observed = ratio[keep], observed[keep]
    if not len(ratio):
        return BoundaryFit(math.nan, math.nan, math.nan, 0, 0, accuracy_threshold)
    edges = np.unique(ratio[np.isfinite(ratio) & (ratio > 0)])
    lows = np.concatenate([[0.0], edges])
    highs = np.concatenate([edges, [math.inf]])
    scores = [int(((ratio <= low) == observed).sum()) for low in lows]
    best = int(np.argmax(scores))
    low, high = lows[best], highs[best]
    if low == 0:
        c = high / 2 if math.isfinite(high) else 1.0
    elif math.isinf(high):
        c = 2 * low
    else:
        c = math.sqrt(low * high)
    return BoundaryFit(c, low, high, scores[best], len(ratio), accuracy_threshold)


def _theory_inputs(runs: pd.DataFrame, experiment: str) -> dict[str, float]:
    keys = {
        "alpha": "params.transfer.alpha",
        "n1": "params.task.n1",
        "n2": "params.task.n2",
        "v_norm": "params.task.v_norm",
        "sigma_p1": "params.noise.sigma_p1",
        "sigma_p2": "params.noise.sigma_p2",
    }
    _require(runs, list(keys.values()), experiment)
    values = {}
    for name, column in keys.items():
        distinct = pd.to_numeric(runs[column]).unique()
        if len(distinct) != 1:
            raise ReportError(
                f"experiment {experiment!r}: {column.removeprefix('params.')} varies "
                f"({', '.join(map(str, sorted(distinct)))}); a phase diagram needs it fixed"
            )
        values[name] = float(distinct[0])
    if "params.transfer.kind" in runs.columns and (runs["params.transfer.kind"] == "none").all():
        values["alpha"] = 0.0
    return values


def d_star_of(u_norm: np.ndarray | float, inputs: dict[str, float]) -> np.ndarray:
    """``D*`` (Theorem 4.2) at the universal signal norms ``u_norm``, the other inputs fixed."""
    return np.array(
        [
            threshold_term(
                inputs["alpha"],
                inputs["n1"],
                inputs["n2"],
                u,
                target_signal_norm(u, inputs["v_norm"]),
                inputs["sigma_p1"],
                inputs["sigma_p2"],
            )
            for u in np.atleast_1d(u_norm)
        ]
    )


def fig2_table(
    runs: pd.DataFrame,
    experiment: str,
    accuracy_threshold: float = NEAR_OPTIMAL_ACCURACY,
) -> tuple[pd.DataFrame, BoundaryFit, dict[str, float]]:
    """Per (d, ||u||) cell: seed statistics, ``D*``, and the observed and fitted regimes."""
    d, u = "params.task.d", "params.task.u_norm"
    _require(runs, [d, u, TRANSFER], experiment)
    inputs = _theory_inputs(runs, experiment)
    metrics = [m for m in (TRANSFER, SCRATCH, GAIN) if m in runs.columns]
    table = seed_stats(runs, [d, u], metrics)
    table.columns = [c.removeprefix("params.").removeprefix("metrics.") for c in table.columns]
    table = table.rename(columns={"task.d": "d", "task.u_norm": "u_norm"})
    table["threshold_term"] = d_star_of(table["u_norm"].to_numpy(float), inputs)
    table["d_over_threshold"] = table["d"] / table["threshold_term"]
    fit = fit_boundary(
        table["d"].to_numpy(float),
        table["threshold_term"].to_numpy(),
        table["transfer_test_acc_mean"].to_numpy(),
        accuracy_threshold,
    )
    table["observed_near_optimal"] = table["transfer_test_acc_mean"] >= accuracy_threshold
    table["fitted_near_optimal"] = table["d_over_threshold"] <= fit.c
    table["agrees"] = table["observed_near_optimal"] == table["fitted_near_optimal"]
    return table, fit, inputs


def _index_of(values: np.ndarray, targets: np.ndarray, log: bool) -> np.ndarray:
    """Fractional cell index of ``targets`` on an axis whose cells sit at ``values`` (sorted)."""
    index = np.arange(len(values), dtype=float)
    if len(values) == 1:
        return np.zeros_like(targets, dtype=float)
    scale = np.log if log else (lambda a: a)
    with np.errstate(divide="ignore", invalid="ignore"):
        positions = scale(np.asarray(targets, float))
    grid = scale(values.astype(float))
    slope_low = (index[1] - index[0]) / (grid[1] - grid[0])
    slope_high = (index[-1] - index[-2]) / (grid[-1] - grid[-2])
    inside = np.interp(positions, grid, index)
    below = index[0] + (positions - grid[0]) * slope_low
    above = index[-1] + (positions - grid[-1]) * slope_high
    return np.where(positions < grid[0], below, np.where(positions > grid[-1], above, inside))


def fig2_figure(table: pd.DataFrame, fit: BoundaryFit, inputs: dict[str, float], title: str) -> Figure:
    """Heatmap of mean transfer accuracy (rows ||u||, columns d) with the fitted boundary d = C D*."""
    grid = table.pivot(index="u_norm", columns="d", values="transfer_test_acc_mean").sort_index().sort_index(axis=1)
    d_values, u_values = grid.columns.to_numpy(float), grid.index.to_numpy(float)
    log_d = len(d_values) > 2 and d_values[-1] / d_values[0] > 4 and np.ptp(np.diff(d_values)) > 0
    fig = Figure(figsize=(max(7.5, 3.5 + 0.45 * len(d_values)), 3.6 + 0.3 * len(u_values)), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid.to_numpy(), origin="lower", aspect="auto", cmap="viridis", vmin=0.5, vmax=1.0)
    fig.colorbar(image, ax=ax, label="transfer test accuracy (mean over seeds)")
    ax.set_xticks(range(len(d_values)), [f"{v:g}" for v in d_values], rotation=90 if len(d_values) > 10 else 0)
    ax.set_yticks(range(len(u_values)), [f"{v:g}" for v in u_values])
    ax.set_xlabel("dimension d")
    ax.set_ylabel(r"universal signal norm $\|u\|$")
    if len(d_values) * len(u_values) <= 144:
        for (row, col), value in np.ndenumerate(grid.to_numpy()):
            if not np.isnan(value):
                ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7, color="black" if value > 0.8 else "white")
    wrong = table[~table["agrees"]]
    columns = _index_of(d_values, wrong["d"].to_numpy(), log_d)
    rows = _index_of(u_values, wrong["u_norm"].to_numpy(), False)
    for number, (col, row) in enumerate(zip(columns, rows)):
        ax.add_patch(
            Rectangle(
                (col - 0.5, row - 0.5),
                1,
                1,
                fill=False,
                edgecolor="red",
                linewidth=1.5,
                linestyle="--",
                label="regime not predicted" if number == 0 else None,
            )
        )
    if math.isfinite(fit.c):
        u_line = np.linspace(u_values.min(), u_values.max(), 200)
        d_line = fit.c * d_star_of(u_line, inputs)
        ax.plot(
            _index_of(d_values, d_line, log_d),
            _index_of(u_values, u_line, False),
            color="red",
            linewidth=2,
            label=f"d = {fit.c:.3g} D*  (fitted C)",
        )
    ax.set_xlim(-0.5, len(d_values) - 0.5)
    ax.set_ylim(-0.5, len(u_values) - 0.5)
    fig.legend(loc="outside lower center", ncols=2, fontsize=8)
    fig.suptitle(
        f"{title}\nnear-optimal cell: transfer accuracy >= {fit.accuracy_threshold:g}; the fitted boundary "
        f"agrees on {fit.agreeing}/{fit.cells} cells = {fit.agreement:.1%}",
        fontsize=9,
    )
    return fig


def render_fig2(runs: pd.DataFrame, experiment: str, out_dir: Path) -> list[Path]:
    """The Figure 2 phase diagram with the fitted theory boundary and its agreement fraction."""
    table, fit, inputs = fig2_table(runs, experiment)
    fixed = _fixed_settings(
        runs, ["task.n1", "task.n2", "task.v_norm", "noise.sigma_p1", "noise.sigma_p2", "transfer.alpha", "model.width"]
    )
    figure = fig2_figure(table, fit, inputs, f"{experiment}\n{fixed}")
    boundary = pd.DataFrame(
        [
            {
                "fitted_C": fit.c,
                "C_low": fit.c_low,
                "C_high": fit.c_high,
                "accuracy_threshold": fit.accuracy_threshold,
                "agreeing_cells": fit.agreeing,
                "cells": fit.cells,
                "agreement": fit.agreement,
            }
        ]
    )
    return [
        *save_figure(figure, out_dir, experiment),
        *write_table(table, out_dir, experiment),
        *write_table(boundary, out_dir, f"{experiment}_boundary"),
    ]

"""The report of any sweep: figures chosen by the sweep's structure, not by the experiment's name.

What varies between the finished pipelines besides the seed (``sweep_keys``) decides the figure:

- one key: downstream test accuracy with transfer and from scratch against it (mean over seeds, band: 95%
  t interval of the mean) beside the paired gain in points (band: its 95% t interval);
- two keys (or more: the two with the most values, the others pooled): a heatmap of the mean paired gain in
  points, seeds pooled, each cell annotated with its gain and n;
- none: the table alone.

The table (``<experiment>.md``) has one row per cell, its keys named in words and only the columns that vary:
the swept values, n seeds, transfer and scratch accuracy (%), the gain in points with its 95% interval and
verdict, and the theory's prediction where there is one; ``<experiment>.csv`` holds the same numbers unrounded.
The paper's presets keep their own figures (``ptlab.report.registry``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ptlab.report.runs import (
    GAIN,
    RUN_ENVIRONMENT_PARAMS,  # noqa: F401 - re-exported
    one_run_per_seed,
    paired_ci,
    seed_stats,
    swept_params,
)

TRANSFER, SCRATCH, PREDICTED = "metrics.transfer_test_acc", "metrics.scratch_test_acc", "params.theory.predicted"
PHASE_PREDICTED = "params.prediction.outcome"
"""The fitted phase model's predicted outcome (``ptlab.phase``), logged beside the theory's by synthetic runs."""
STAGE_METRICS = ["metrics.upstream_test_acc", TRANSFER, SCRATCH, GAIN]

KEY_WORDS = {
    "transfer.alpha": "transferred fraction alpha",
    "transfer.selection.name": "filter selection",
    "task.d": "dimension d",
    "task.n1": "task-1 samples N1",
    "task.n2": "task-2 samples N2",
    "task.n_test": "test samples",
    "task.n1_ratio": "N1 / N2",
    "task.k": "task-1 classes k",
    "task.u_norm": "universal signal norm ‖u‖",
    "task.v_norm": "task signal norm ‖v‖",
    "task.label_noise": "label noise",
    "noise.sigma_p1": "task-1 noise sigma_p1",
    "noise.sigma_p2": "task-2 noise sigma_p2",
    "model.width": "model width",
    "model.arch": "downstream model",
    "upstream_model.arch": "upstream model",
    "model.name": "downstream model",
    "upstream_model.name": "upstream model",
    "model.init_std": "init std sigma_0",
    "train.lr": "learning rate",
    "train.upstream_steps": "upstream GD steps",
    "train.downstream_steps": "downstream GD steps",
    "train.upstream_epochs": "upstream epochs",
    "train.downstream_epochs": "downstream epochs",
    "train.batch_size": "batch size",
}
"""Config keys as a table column or an axis says them; any other key is its dotted name with spaces."""


def key_words(column: str) -> str:
    """``params.task.u_norm`` -> ``universal signal norm ||u||``; an unknown key as ``task n2``-style words."""
    key = column.removeprefix("params.")
    return KEY_WORDS.get(key, key.replace("_", " ").replace(".", " "))


def sweep_keys(runs: pd.DataFrame) -> list[str]:
    """The params that vary between the runs besides the seed, without ``_target_`` paths and without a key
    that moves in lockstep with an earlier one (``model.arch`` beside ``model.name``); most values first."""
    keys: list[str] = []
    for column in swept_params(runs):
        if column.endswith("._target_") or column.startswith("params.theory."):
            continue
        values = runs[column].astype(str)
        if any(
            runs.groupby(values)[kept].nunique().max() == 1 and runs.groupby(runs[kept].astype(str))[column].nunique().max() == 1
            for kept in keys
        ):
            continue
        keys.append(column)
    return sorted(keys, key=lambda c: -runs[c].astype(str).nunique())


def _numeric(column: pd.Series) -> pd.Series:
    try:
        return pd.to_numeric(column)
    except (TypeError, ValueError):
        return column


def _mode(values: pd.Series) -> str:
    counts = values.dropna().astype(str).value_counts()
    return counts.index[0] if len(counts) else ""


def cell_stats(runs: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """One row per cell (a combination of ``keys``, seeds pooled): n, mean transfer and scratch accuracy with
    95% t intervals, the paired gain in points with its 95% t interval and verdict, the theory's prediction and
    the phase model's (where the runs logged them)."""
    stats = seed_stats(runs, list(keys), [TRANSFER, SCRATCH, GAIN])
    by = [*keys, *stats.attrs.get("config_columns", [])]
    frame = one_run_per_seed(runs, by).copy()  # the runs seed_stats pooled, grouped the same way
    for column in by:
        frame[column] = _numeric(frame[column])
    groups = [group for _, group in frame.groupby(by, sort=True, dropna=False)]
    table = stats[by].copy()
    table["n"] = stats[f"{GAIN}_count"].astype(int).to_numpy()
    for name, metric in (("transfer", TRANSFER), ("scratch", SCRATCH)):
        table[f"{name}_acc"] = stats[f"{metric}_mean"].to_numpy()
        intervals = [paired_ci(group[metric]) for group in groups]
        table[f"{name}_acc_ci_low"] = [low for low, _ in intervals]
        table[f"{name}_acc_ci_high"] = [high for _, high in intervals]
    table["gain_points"] = 100 * stats[f"{GAIN}_mean"].to_numpy()
    table["gain_points_ci_low"] = 100 * stats[f"{GAIN}_ci_low"].to_numpy()
    table["gain_points_ci_high"] = 100 * stats[f"{GAIN}_ci_high"].to_numpy()
    table["verdict"] = stats["verdict"].to_numpy()
    for name, column in (("prediction", PREDICTED), ("phase_prediction", PHASE_PREDICTED)):
        if column in frame.columns:
            table[name] = [_mode(group[column]) for group in groups]
    table.attrs["keys"] = by
    return table


def _points(low: float, high: float) -> str:
    return "" if pd.isna(low) else f"[{low:+.1f}, {high:+.1f}]"


def markdown_table(table: pd.DataFrame) -> str:
    """The cell table as a reader wants it: keys in words, percentages and points rounded to 0.1."""
    shown = pd.DataFrame({key_words(key): table[key] for key in table.attrs["keys"]})
    shown["n seeds"] = table["n"]
    shown["transfer (%)"] = (100 * table["transfer_acc"]).map("{:.1f}".format)
    shown["scratch (%)"] = (100 * table["scratch_acc"]).map("{:.1f}".format)
    shown["gain (points)"] = table["gain_points"].map("{:+.1f}".format)
    shown["95% interval"] = [_points(low, high) for low, high in zip(table["gain_points_ci_low"], table["gain_points_ci_high"])]
    shown["verdict"] = table["verdict"]
    if "prediction" in table:
        shown["theory predicts"] = table["prediction"]
    if "phase_prediction" in table:
        shown["phase model predicts"] = table["phase_prediction"]
    return shown.to_markdown(index=False, disable_numparse=True) + "\n"


def write_table(table: pd.DataFrame, out_dir: Path, stem: str) -> list[Path]:
    """``stem.csv`` and ``stem.md`` of ``table`` (the presets' tables: numbers to 4 decimals)."""
    csv, md = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    table.to_csv(csv, index=False)
    md.write_text(table.to_markdown(index=False, floatfmt=".4f") + "\n")
    return [csv, md]


def _positions(values: pd.Series) -> tuple[np.ndarray, list[str] | None]:
    """x positions of ``values``: the numbers themselves, or 0, 1, ... with tick labels for categories."""
    numeric = pd.to_numeric(values, errors="coerce")
    if numeric.notna().all():
        return numeric.to_numpy(dtype=float), None
    return np.arange(len(values), dtype=float), [str(v) for v in values]


def line_figure(table: pd.DataFrame, key: str, title: str) -> Figure:
    """Accuracies (%) and the paired gain (points) against the one swept ``key``, with 95% bands."""
    fig = Figure(figsize=(9.5, 3.8), layout="constrained")
    acc_ax, gain_ax = fig.subplots(1, 2)
    x, labels = _positions(table[key])
    for name, style in (("transfer", "-"), ("scratch", "--")):
        (line,) = acc_ax.plot(x, 100 * table[f"{name}_acc"], style, marker="o", label=name)
        acc_ax.fill_between(
            x,
            np.clip(100 * table[f"{name}_acc_ci_low"], 0, 100),
            np.clip(100 * table[f"{name}_acc_ci_high"], 0, 100),
            color=line.get_color(),
            alpha=0.2,
            linewidth=0,
        )
    (line,) = gain_ax.plot(x, table["gain_points"], marker="o", color="tab:green", label="transfer - scratch")
    gain_ax.fill_between(
        x,
        table["gain_points_ci_low"],
        table["gain_points_ci_high"],
        color=line.get_color(),
        alpha=0.2,
        linewidth=0,
        label="95% interval (paired)",
    )
    gain_ax.axhline(0.0, color="black", linewidth=0.8)
    acc_ax.set_ylabel("downstream test accuracy (%)")
    gain_ax.set_ylabel("gain: transfer - scratch (points)")
    positive = labels is None and (x > 0).all() and x.max() / x.min() >= 50
    for ax in (acc_ax, gain_ax):
        ax.set_xlabel(key_words(key))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        if labels is not None:
            ax.set_xticks(x, labels, rotation=20)
        elif positive:
            ax.set_xscale("log")
    n_low, n_high = int(table["n"].min()), int(table["n"].max())
    seeds = f"{n_low}" if n_low == n_high else f"{n_low}-{n_high}"
    fig.suptitle(f"{title}: mean over {seeds} seeds, bands: 95% t intervals", fontsize=10)
    return fig


def heatmap_figure(runs: pd.DataFrame, rows: str, columns: str, title: str, pooled: Sequence[str] = ()) -> Figure:
    """The mean paired gain (points) over ``rows`` x ``columns``, seeds (and ``pooled`` keys) pooled."""
    frame = runs.assign(**{rows: _numeric(runs[rows]), columns: _numeric(runs[columns]), "gain": 100 * pd.to_numeric(runs[GAIN])})
    grid = frame.pivot_table(index=rows, columns=columns, values="gain", aggfunc="mean", sort=True)
    counts = frame.pivot_table(index=rows, columns=columns, values="gain", aggfunc="count", sort=True)
    limit = max(float(np.nanmax(np.abs(grid.to_numpy()))), 1e-9)
    fig = Figure(figsize=(1.2 * len(grid.columns) + 3.2, 0.6 * len(grid.index) + 2.2), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid.to_numpy(), cmap="RdBu", vmin=-limit, vmax=limit, origin="lower", aspect="auto")
    for i in range(len(grid.index)):
        for j in range(len(grid.columns)):
            value = grid.iat[i, j]
            if not np.isnan(value):
                ax.text(
                    j,
                    i,
                    f"{value:+.1f}\nn={int(counts.iat[i, j])}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if abs(value) > 0.6 * limit else "black",
                )
    ax.set_xticks(range(len(grid.columns)), [f"{v:g}" if isinstance(v, float) else str(v) for v in grid.columns])
    ax.set_yticks(range(len(grid.index)), [f"{v:g}" if isinstance(v, float) else str(v) for v in grid.index])
    ax.set_xlabel(key_words(columns))
    ax.set_ylabel(key_words(rows))
    fig.colorbar(image, ax=ax, label="gain: transfer - scratch (points)")
    extra = f"; pooled over {', '.join(key_words(k) for k in pooled)}" if pooled else ""
    ax.set_title(f"{title}: mean paired gain, seeds pooled{extra}", fontsize=10)
    return fig


def render_generic(runs: pd.DataFrame, experiment: str, out_dir: Path) -> list[Path]:
    """The table of every cell and the figure the sweep's structure calls for (see the module's docstring)."""
    keys = sweep_keys(runs)
    if not keys:
        runs, keys = runs.assign(**{"params.experiment": experiment}), ["params.experiment"]
    if GAIN not in runs.columns or TRANSFER not in runs.columns:  # no transfer stage: accuracies only
        table = seed_stats(runs, keys, [m for m in STAGE_METRICS if m in runs.columns])
        table.columns = [c.removeprefix("params.").removeprefix("metrics.") for c in table.columns]
        return write_table(table, out_dir, experiment)
    table = cell_stats(runs, keys)
    csv, md = out_dir / f"{experiment}.csv", out_dir / f"{experiment}.md"
    table.rename(columns={k: k.removeprefix("params.") for k in table.attrs["keys"]}).to_csv(csv, index=False)
    md.write_text(markdown_table(table))
    paths = [csv, md]
    figure = None
    if keys == ["params.experiment"]:
        pass  # nothing swept: the table alone
    elif len(keys) == 1:
        figure = line_figure(table, keys[0], experiment)
    elif len(keys) >= 2:
        figure = heatmap_figure(runs, keys[0], keys[1], experiment, pooled=keys[2:])
    if figure is not None:
        for suffix in ("png", "pdf"):
            path = out_dir / f"{experiment}.{suffix}"
            figure.savefig(path, dpi=150)
            paths.append(path)
    return paths

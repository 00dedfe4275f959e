"""The paper's real-data results redrawn from MLflow: Table 1 and Figure 3 (docs/design.md section 4).

Table 1 (experiments ``table1*``): downstream test accuracy (%) with transfer per architecture pair
and N1/N2, beside the scratch baseline of the same pair, and the gain over scratch (mean over seeds of
the paired per-seed gains). Files: ``<experiment>.md`` (the paper's layout, "mean ± std (gain)"
cells) and ``<experiment>.csv`` (one numeric row per pair and ratio).
Figure 3 (``fig3*``): transfer and scratch test accuracy against the task-2 noise std sigma_p2
(0-255 pixel scale), one panel per pair, mean ± std over seeds; ``<experiment>.png`` plus the table.

Both also test the paper's claim as a trend, with seeds as the unit (``trend_table``): for each seed,
the ordinary least-squares slope of its paired gain (points) on x (log2 N1/N2 for Table 1, sigma_p2
for Figure 3) over the cells of that seed; then the mean of the per-seed slopes with its 95% t
interval (n - 1 degrees of freedom). Only seeds that ran every x value of their group count, so each
per-seed slope is on the same design. ``<experiment>_trend.csv`` holds the slopes; the figures draw
the mean gain with its 95% t band per cell and the mean per-seed line.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ptlab.report.generic import write_table
from ptlab.report.runs import ReportError, one_run_per_seed, paired_ci, seed_stats, swept_params

TRANSFER, SCRATCH, GAIN = "metrics.transfer_test_acc", "metrics.scratch_test_acc", "metrics.transfer_gain"
RATIO, SIGMA = "params.task.n1_ratio", "params.noise.sigma_p2"
PAIR = "pair"


def _label(arch: pd.Series, width: pd.Series) -> pd.Series:
    scale = pd.to_numeric(width, errors="coerce").fillna(1.0)
    return arch.astype(str) + scale.map(lambda w: "" if w == 1.0 else f" (x{w:g})")


def with_pairs(runs: pd.DataFrame, needed: list[str]) -> pd.DataFrame:
    """``runs`` with a ``pair`` column ("upstream -> downstream", widths noted when not 1)."""
    columns = ["params.upstream_model.arch", "params.model.arch", *needed]
    missing = [c for c in columns if c not in runs.columns]
    if missing:
        raise ReportError(
            f"runs lack {', '.join(missing)}: not image transfer pipelines (task=cifar10|cifar100|digits|fashion_mnist)"
        )
    width = {side: runs.get(f"params.{side}.width", pd.Series("1.0", index=runs.index)) for side in ("upstream_model", "model")}
    pair = (
        _label(runs["params.upstream_model.arch"], width["upstream_model"])
        + " -> "
        + _label(runs["params.model.arch"], width["model"])
    )
    return runs.assign(**{PAIR: pair})


def _cell(
    mean: float, std: float, gain: float | None = None, low: float = math.nan, high: float = math.nan, n: int | None = None
) -> str:
    text = f"{100 * mean:.1f}" + ("" if pd.isna(std) else f" ± {100 * std:.1f}")
    if gain is None:
        return text
    ci = "" if pd.isna(low) else f" [{100 * low:+.1f}, {100 * high:+.1f}]"
    return f"{text} ({100 * gain:+.1f}{ci}, n={n})"


TREND_VERDICTS = {"better": "increasing", "worse": "decreasing", "no detectable difference": "no detectable trend"}


def seed_slopes(
    runs: pd.DataFrame,
    by: list[str],
    x: str,
    transform: Callable[[np.ndarray], np.ndarray],
) -> pd.DataFrame:
    """Per group of ``by`` and seed: the OLS slope and intercept of the gain (points) on ``transform(x)``;
    seeds that lack an x value of their group are left out (``complete`` counts those kept)."""
    frame = one_run_per_seed(runs, [*by, x])
    frame = frame.assign(
        _x=transform(pd.to_numeric(frame[x]).to_numpy(dtype=float)), _gain=100 * pd.to_numeric(frame[GAIN]).to_numpy(dtype=float)
    ).dropna(subset=["_gain"])
    rows = []
    for key, group in frame.groupby(by, sort=True, dropna=False):
        design = np.sort(group["_x"].unique())
        if len(design) < 2:
            continue
        for seed, cells in group.groupby("params.seed", sort=True):
            if len(cells) != len(design) or not np.array_equal(np.sort(cells["_x"].to_numpy()), design):
                continue
            slope, intercept = np.polyfit(cells["_x"].to_numpy(), cells["_gain"].to_numpy(), 1)
            rows.append(
                {
                    **dict(zip(by, key if isinstance(key, tuple) else (key,))),
                    "seed": seed,
                    "slope": float(slope),
                    "intercept": float(intercept),
                }
            )
    return pd.DataFrame(rows, columns=[*by, "seed", "slope", "intercept"])


def trend_table(
    runs: pd.DataFrame, by: list[str], x: str, transform: Callable[[np.ndarray], np.ndarray], x_label: str
) -> pd.DataFrame:
    """Per group: mean per-seed slope of the gain (points per unit of ``x_label``), its 95% t interval over
    seeds, the seeds used and a verdict (increasing / decreasing / no detectable trend)."""
    slopes = seed_slopes(runs, by, x, transform)
    rows = []
    for key, group in slopes.groupby(by, sort=True, dropna=False):
        low, high = paired_ci(group["slope"])
        verdict = TREND_VERDICTS.get(_verdict(low, high, len(group)), _verdict(low, high, len(group)))
        rows.append(
            {
                **dict(zip(by, key if isinstance(key, tuple) else (key,))),
                "x": x_label,
                "slope": group["slope"].mean(),
                "ci_low": low,
                "ci_high": high,
                "intercept": group["intercept"].mean(),
                "seeds": len(group),
                "verdict": verdict,
            }
        )
    return pd.DataFrame(rows, columns=[*by, "x", "slope", "ci_low", "ci_high", "intercept", "seeds", "verdict"])


def _verdict(low: float, high: float, n: int) -> str:
    from ptlab.report.runs import verdict

    return verdict(low, high, n)


def _groups(runs: pd.DataFrame, by: list[str], x: str) -> list[str]:
    """``by`` plus the params (other than ``x`` and the seed) that differ within it: never mix configs."""
    return [
        *by,
        *(
            c
            for c in swept_params(runs)
            if c not in by and c != x and runs.groupby(by, dropna=False)[c].nunique(dropna=False).max() > 1
        ),
    ]


def labelled(table: pd.DataFrame, extra: list[str]) -> pd.DataFrame:
    """``table`` with the params ``extra`` that set a group apart appended to its pair: "pair (key=value)"."""
    if not extra:
        return table
    label = table[extra].apply(lambda row: ", ".join(f"{c.rsplit('.', 1)[-1]}={v}" for c, v in row.items()), axis=1)
    return table.assign(**{PAIR: table[PAIR] + " (" + label + ")"})


def trend_text(trend: pd.DataFrame, name: str) -> str:
    """One line per group: the slope with its interval, seeds and verdict."""
    return "\n".join(
        f"- {row[name]}: slope of the gain on {row['x']} {row['slope']:+.3f} points "
        f"[{row['ci_low']:+.3f}, {row['ci_high']:+.3f}] (95% t interval over n={row['seeds']} "
        f"seeds): {row['verdict']}"
        for _, row in trend.iterrows()
    )


def draw_gain(
    ax: Axes,
    cells: pd.DataFrame,
    x: str,
    trend: pd.Series | None,
    label: str,
    transform: Callable[[np.ndarray], np.ndarray],
    color: str,
) -> None:
    """The mean paired gain (points) per cell with its 95% t band, and the mean per-seed trend line."""
    cells = cells.sort_values(x)
    xs = cells[x].to_numpy(dtype=float)
    ax.plot(xs, 100 * cells[f"{GAIN}_mean"], marker="o", color=color, label=label)
    ax.fill_between(xs, 100 * cells[f"{GAIN}_ci_low"], 100 * cells[f"{GAIN}_ci_high"], color=color, alpha=0.2)
    if trend is not None:
        ax.plot(
            xs,
            trend["intercept"] + trend["slope"] * transform(xs),
            linestyle=":",
            color=color,
            label=f"slope {trend['slope']:+.3f} [{trend['ci_low']:+.3f}, {trend['ci_high']:+.3f}] "
            f"(n={trend['seeds']}): {trend['verdict']}",
        )
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.grid(alpha=0.3)


def render_table1(runs: pd.DataFrame, experiment: str, out_dir: Path) -> list[Path]:
    """Table 1: transfer accuracy per pair and N1/N2 with the paired gain over scratch (95% CI, n seeds);
    scratch per pair. Pipelines that differ in anything but the seed, the pair and the ratio are
    separate rows, labelled by what differs."""
    runs = with_pairs(runs, [RATIO, TRANSFER, SCRATCH, GAIN])
    stats = seed_stats(runs, [PAIR, RATIO], [TRANSFER, SCRATCH, GAIN])
    stats = labelled(stats, [c for c in stats.attrs.get("config_columns", []) if c not in (PAIR, RATIO)])
    ratios = sorted(stats[RATIO].unique())
    rows = []
    for pair, group in stats.groupby(PAIR, sort=True):
        first = group.iloc[0]
        row = {"upstream -> downstream": pair, "scratch": _cell(first[f"{SCRATCH}_mean"], first[f"{SCRATCH}_std"])}
        for _, cell in group.iterrows():
            row[f"N1/N2={cell[RATIO]:g}"] = _cell(
                cell[f"{TRANSFER}_mean"],
                cell[f"{TRANSFER}_std"],
                cell[f"{GAIN}_mean"],
                cell[f"{GAIN}_ci_low"],
                cell[f"{GAIN}_ci_high"],
                int(cell[f"{GAIN}_count"]),
            )
        rows.append(row)
    wide = pd.DataFrame(rows, columns=["upstream -> downstream", "scratch", *(f"N1/N2={r:g}" for r in ratios)])
    trend = labelled(
        trend_table(runs, _groups(runs, [PAIR], RATIO), RATIO, np.log2, "log2(N1/N2)"), _groups(runs, [PAIR], RATIO)[1:]
    )
    md = out_dir / f"{experiment}.md"
    md.write_text(
        "Test accuracy (%) on task 2, mean ± std over seeds; (paired gain over scratch [95% t "
        "interval], n seeds).\n\n" + wide.to_markdown(index=False) + "\n\nTrend (per seed, the "
        "least-squares slope of the gain in points on log2(N1/N2); mean over seeds with its 95% t "
        "interval):\n\n" + trend_text(trend, PAIR) + "\n"
    )
    csv = out_dir / f"{experiment}.csv"
    stats.rename(columns=lambda c: c.removeprefix("params.").removeprefix("metrics.")).to_csv(csv, index=False)
    trend_csv = out_dir / f"{experiment}_trend.csv"
    trend.rename(columns=lambda c: c.removeprefix("params.")).to_csv(trend_csv, index=False)
    figure = Figure(figsize=(5.6, 3.8), layout="constrained")
    ax = figure.subplots()
    for i, (pair, cells) in enumerate(stats.groupby(PAIR, sort=True)):
        match = trend[trend[PAIR] == pair]
        draw_gain(ax, cells, RATIO, match.iloc[0] if len(match) == 1 else None, pair, np.log2, f"C{i}")
    ax.set_xscale("log", base=2)
    ax.set_xticks(ratios, [f"{r:g}" for r in ratios])
    ax.set_xlabel("N1 / N2")
    ax.set_ylabel("transfer - scratch (points)")
    ax.set_title(f"{experiment}: paired gain, 95% t bands", fontsize=10)
    ax.legend(fontsize=7)
    png = out_dir / f"{experiment}.png"
    figure.savefig(png, dpi=130)
    return [md, csv, trend_csv, png]


def render_fig3(runs: pd.DataFrame, experiment: str, out_dir: Path) -> list[Path]:
    """Figure 3: transfer vs scratch test accuracy against sigma_p2, one panel per pair (top), and the
    paired gain with its 95% t band and the per-seed trend of the gain on sigma_p2 (bottom)."""
    runs = with_pairs(runs, [SIGMA, TRANSFER, SCRATCH, GAIN])
    stats = seed_stats(runs, [PAIR, SIGMA], [TRANSFER, SCRATCH, GAIN])
    stats = labelled(stats, [c for c in stats.attrs.get("config_columns", []) if c not in (PAIR, SIGMA)])
    extra = _groups(runs, [PAIR], SIGMA)
    trend = labelled(trend_table(runs, extra, SIGMA, lambda x: x, "sigma_p2"), extra[1:])
    pairs = sorted(stats[PAIR].unique())
    figure = Figure(figsize=(4.6 * len(pairs), 6.4), layout="constrained")
    axes = figure.subplots(2, len(pairs), squeeze=False)
    for column, pair in enumerate(pairs):
        ax, gain_ax = axes[0][column], axes[1][column]
        group = stats[stats[PAIR] == pair]
        for metric, label, marker in ((TRANSFER, "transfer", "o"), (SCRATCH, "scratch", "s")):
            ax.errorbar(
                group[SIGMA],
                100 * group[f"{metric}_mean"],
                yerr=100 * group[f"{metric}_std"].fillna(0),
                marker=marker,
                capsize=3,
                label=label,
            )
        ax.set_title(pair, fontsize=10)
        ax.set_xlabel(r"task-2 noise $\sigma_{p,2}$ (0-255 pixels)")
        ax.set_ylabel("task-2 test accuracy (%), mean ± std")
        ax.grid(alpha=0.3)
        ax.legend()
        match = trend[trend[PAIR] == pair]
        low, high = int(group[f"{GAIN}_count"].min()), int(group[f"{GAIN}_count"].max())
        seeds = f"{low}" if low == high else f"{low}-{high}"
        draw_gain(
            gain_ax, group, SIGMA, match.iloc[0] if len(match) == 1 else None, f"mean gain (n={seeds} seeds)", lambda x: x, "C2"
        )
        gain_ax.set_xlabel(r"task-2 noise $\sigma_{p,2}$ (0-255 pixels)")
        gain_ax.set_ylabel("transfer - scratch (points)")
        gain_ax.set_title("paired gain, 95% t band; dotted: mean per-seed fit", fontsize=9)
        gain_ax.legend(fontsize=7)
    png = out_dir / f"{experiment}.png"
    figure.savefig(png, dpi=120)
    table = stats.rename(columns=lambda c: c.removeprefix("params.").removeprefix("metrics."))
    trend_csv = out_dir / f"{experiment}_trend.csv"
    trend.rename(columns=lambda c: c.removeprefix("params.")).to_csv(trend_csv, index=False)
    md_trend = out_dir / f"{experiment}_trend.md"
    md_trend.write_text(
        "Trend (per seed, the least-squares slope of the gain in points on sigma_p2; mean over "
        "seeds with its 95% t interval):\n\n" + trend_text(trend, PAIR) + "\n"
    )
    return [png, *write_table(table, out_dir, experiment), trend_csv, md_trend]

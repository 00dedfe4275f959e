"""The paper's real-data results redrawn from MLflow: Table 1 and Figure 3 (docs/design.md section 4).

Table 1 (experiments ``table1*``): downstream test accuracy (%) with transfer per architecture pair
and N1/N2, beside the scratch baseline of the same pair, and the gain over scratch (mean over seeds of
the paired per-seed gains). Files: ``<experiment>.md`` (the paper's layout, "mean ± std (gain)"
cells) and ``<experiment>.csv`` (one numeric row per pair and ratio).
Figure 3 (``fig3*``): transfer and scratch test accuracy against the task-2 noise std sigma_p2
(0-255 pixel scale), one panel per pair, mean ± std over seeds; ``<experiment>.png`` plus the table.
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
from matplotlib.figure import Figure

from ptlab.report.generic import write_table
from ptlab.report.runs import ReportError, config_label, seed_stats

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
        raise ReportError(f"runs lack {', '.join(missing)}: "
                          "not image transfer pipelines (task=cifar10|cifar100|digits)")
    width = {side: runs.get(f"params.{side}.width", pd.Series("1.0", index=runs.index))
             for side in ("upstream_model", "model")}
    pair = (_label(runs["params.upstream_model.arch"], width["upstream_model"]) + " -> "
            + _label(runs["params.model.arch"], width["model"]))
    return runs.assign(**{PAIR: pair})


def _cell(mean: float, std: float, gain: float | None = None, low: float = math.nan, high: float = math.nan,
          n: int | None = None) -> str:
    text = f"{100 * mean:.1f}" + ("" if pd.isna(std) else f" ± {100 * std:.1f}")
    if gain is None:
        return text
    ci = "" if pd.isna(low) else f" [{100 * low:+.1f}, {100 * high:+.1f}]"
    return f"{text} ({100 * gain:+.1f}{ci}, n={n})"


def render_table1(runs: pd.DataFrame, experiment: str, out_dir: Path) -> list[Path]:
    """Table 1: transfer accuracy per pair and N1/N2 with the paired gain over scratch (95% CI, n seeds);
    scratch per pair. Pipelines that differ in anything but the seed, the pair and the ratio are
    separate rows, labelled by what differs."""
    runs = with_pairs(runs, [RATIO, TRANSFER, SCRATCH, GAIN])
    stats = seed_stats(runs, [PAIR, RATIO], [TRANSFER, SCRATCH, GAIN])
    label = config_label(stats, [PAIR, RATIO])
    stats[PAIR] = stats[PAIR].where(label == "", stats[PAIR] + " (" + label + ")")
    ratios = sorted(stats[RATIO].unique())
    rows = []
    for pair, group in stats.groupby(PAIR, sort=True):
        first = group.iloc[0]
        row = {"upstream -> downstream": pair, "scratch": _cell(first[f"{SCRATCH}_mean"], first[f"{SCRATCH}_std"])}
        for _, cell in group.iterrows():
            row[f"N1/N2={cell[RATIO]:g}"] = _cell(cell[f"{TRANSFER}_mean"], cell[f"{TRANSFER}_std"],
                                                  cell[f"{GAIN}_mean"], cell[f"{GAIN}_ci_low"],
                                                  cell[f"{GAIN}_ci_high"], int(cell[f"{GAIN}_count"]))
        rows.append(row)
    wide = pd.DataFrame(rows, columns=["upstream -> downstream", "scratch", *(f"N1/N2={r:g}" for r in ratios)])
    md = out_dir / f"{experiment}.md"
    md.write_text("Test accuracy (%) on task 2, mean ± std over seeds; (paired gain over scratch [95% t "
                  "interval], n seeds).\n\n" + wide.to_markdown(index=False) + "\n")
    csv = out_dir / f"{experiment}.csv"
    stats.rename(columns=lambda c: c.removeprefix("params.").removeprefix("metrics.")).to_csv(csv, index=False)
    return [md, csv]


def render_fig3(runs: pd.DataFrame, experiment: str, out_dir: Path) -> list[Path]:
    """Figure 3: transfer vs scratch test accuracy against sigma_p2, one panel per pair."""
    runs = with_pairs(runs, [SIGMA, TRANSFER, SCRATCH, GAIN])
    stats = seed_stats(runs, [PAIR, SIGMA], [TRANSFER, SCRATCH, GAIN])
    pairs = sorted(stats[PAIR].unique())
    figure = Figure(figsize=(4.2 * len(pairs), 3.4), layout="constrained")
    for ax, pair in zip(figure.subplots(1, len(pairs), squeeze=False)[0], pairs):
        group = stats[stats[PAIR] == pair]
        for metric, label, marker in ((TRANSFER, "transfer", "o"), (SCRATCH, "scratch", "s")):
            ax.errorbar(group[SIGMA], 100 * group[f"{metric}_mean"], yerr=100 * group[f"{metric}_std"].fillna(0),
                        marker=marker, capsize=3, label=label)
        ax.set_title(pair)
        ax.set_xlabel(r"task-2 noise $\sigma_{p,2}$ (0-255 pixels)")
        ax.set_ylabel("task-2 test accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    png = out_dir / f"{experiment}.png"
    figure.savefig(png, dpi=120)
    table = stats.rename(columns=lambda c: c.removeprefix("params.").removeprefix("metrics."))
    return [png, *write_table(table, out_dir, experiment)]

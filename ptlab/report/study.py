"""The report of a mechanism study (experiments named ``study*``): controls, regularisers, transferability.

Beside the generic report's cell table and figure (paired gain per cell with its 95% t interval), a study
asks whether a score known before downstream training ranks the measured gain: for every logged
``transferability/*`` score, Spearman's rank correlation with the paired gain, over runs (one pipeline a
point) and over cells (seed means), each with a percentile bootstrap 95% interval (scipy.stats.bootstrap,
pairs resampled, seeded). A score with a scratch reference (``logme`` beside ``logme_scratch``) also enters
as its difference, since the gain itself is relative to scratch. Written: ``<experiment>_scores.csv|md`` and a
scatter of each score against the gain (``<experiment>_scores.png|pdf``). With three swept keys or more, a gain heatmap
over the first two for each combination of the others (``<experiment>_facet<i>.png|pdf``): arms are not pooled.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ptlab.report.generic import heatmap_figure, key_words, render_generic, sweep_keys
from ptlab.report.runs import CONFIDENCE, GAIN

SCORE_PREFIX = "metrics.transferability/"
SCRATCH_SUFFIX = "_scratch"
RESAMPLES = 2000
"""Bootstrap resamples of each interval."""
BOOTSTRAP_SEED = 0


def score_columns(runs: pd.DataFrame) -> dict[str, pd.Series]:
    """Each transferability score by name, and ``<score> - <score>_scratch`` where the scratch reference exists."""
    scores = {
        c.removeprefix(SCORE_PREFIX): pd.to_numeric(runs[c], errors="coerce") for c in runs.columns if c.startswith(SCORE_PREFIX)
    }
    for name in list(scores):
        reference = scores.get(f"{name}{SCRATCH_SUFFIX}")
        if reference is not None and not name.endswith(SCRATCH_SUFFIX):
            scores[f"{name} - {name}{SCRATCH_SUFFIX}"] = scores[name] - reference
    return scores


def spearman_interval(
    x: Sequence[float], y: Sequence[float], confidence: float = CONFIDENCE, resamples: int = RESAMPLES, seed: int = BOOTSTRAP_SEED
) -> tuple[float, float, float]:
    """Spearman's rho of the pairs ``(x, y)`` and its percentile bootstrap interval (pairs resampled together);
    NaN where fewer than 3 pairs or a constant side leaves the coefficient undefined."""
    from scipy import stats

    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return np.nan, np.nan, np.nan
    rho = float(stats.spearmanr(x, y).statistic)

    def statistic(a: np.ndarray, b: np.ndarray) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", stats.ConstantInputWarning)
            value = stats.spearmanr(a, b).statistic
        return 0.0 if np.isnan(value) else float(value)  # a resample with one side constant carries no ranking

    result = stats.bootstrap(
        (x, y),
        statistic,
        paired=True,
        vectorized=False,
        n_resamples=resamples,
        confidence_level=confidence,
        method="percentile",
        rng=np.random.default_rng(seed),
    )
    return rho, float(result.confidence_interval.low), float(result.confidence_interval.high)


def correlation_table(runs: pd.DataFrame, keys: Sequence[str]) -> pd.DataFrame:
    """One row per score and level (``runs``: one pipeline a point; ``cells``: the means over seeds of each
    combination of ``keys``): n, Spearman's rho with the paired gain, its bootstrap 95% interval."""
    gain = pd.to_numeric(runs[GAIN], errors="coerce")
    rows = []
    for name, score in score_columns(runs).items():
        frame = pd.DataFrame({"score": score, "gain": gain}).dropna()
        levels = {"runs": frame}
        if keys:
            grouped = pd.concat([frame, runs.loc[frame.index, list(keys)].astype(str)], axis=1)
            levels["cells"] = grouped.groupby(list(keys), dropna=False)[["score", "gain"]].mean()  # NaN: a key unset
        for level, points in levels.items():
            rho, low, high = spearman_interval(points["score"], points["gain"])
            rows.append({"score": name, "level": level, "n": len(points), "spearman": rho, "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=["score", "level", "n", "spearman", "ci_low", "ci_high"])


def _markdown(table: pd.DataFrame) -> str:
    shown = table.assign(
        spearman=[f"{rho:+.2f}" if np.isfinite(rho) else "undefined (a constant side)" for rho in table["spearman"]],
        interval=[
            f"[{low:+.2f}, {high:+.2f}]" if np.isfinite(low) else "" for low, high in zip(table["ci_low"], table["ci_high"])
        ],
    )[["score", "level", "n", "spearman", "interval"]]
    shown.columns = ["score", "points", "n", "Spearman rho with the gain", f"{CONFIDENCE:.0%} bootstrap interval"]
    return shown.to_markdown(index=False, disable_numparse=True) + "\n"


def scatter_figure(runs: pd.DataFrame, title: str) -> Figure:
    """Each score (x) against the paired gain in points (y), one point a pipeline."""
    scores = score_columns(runs)
    gain = 100 * pd.to_numeric(runs[GAIN], errors="coerce")
    fig = Figure(figsize=(4.2 * len(scores), 3.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(1, len(scores)))
    for ax, (name, score) in zip(axes, scores.items()):
        ax.scatter(score, gain, s=10, alpha=0.6)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xlabel(name)
        ax.set_ylabel("gain: transfer - scratch (points)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{title}: transferability scores before downstream training vs the measured gain", fontsize=10)
    return fig


def _save(figure: Figure, stem: Path) -> list[Path]:
    paths = []
    for suffix in ("png", "pdf"):
        path = stem.with_name(f"{stem.name}.{suffix}")
        figure.savefig(path, dpi=150)
        paths.append(path)
    return paths


def _fold_partial_keys(runs: pd.DataFrame, keys: Sequence[str]) -> tuple[pd.DataFrame, list[str]]:
    """Keys that some runs leave unset (``regularizer.lam`` beside ``regularizer=freeze``) are options of an arm: folded
    into the first fully set key's label (``l2sp lam=0.1``), so an arm is one row of a heatmap, not a facet."""
    partial = [k for k in keys if runs[k].isna().any() and runs[k].notna().any()]
    whole = [k for k in keys if k not in partial]
    if not partial or not whole:
        return runs, list(keys)
    arm = whole[0]
    labels = [
        str(row[arm]) + "".join(f" {k.rsplit('.', 1)[-1]}={row[k]}" for k in partial if pd.notna(row[k]))
        for _, row in runs.iterrows()
    ]
    return runs.assign(**{arm: labels}), whole


def facet_heatmaps(runs: pd.DataFrame, keys: Sequence[str], experiment: str, out_dir: Path) -> list[Path]:
    """With three swept keys or more, the gain heatmap over the first two once per combination of the others
    (``<experiment>_facet<i>``), instead of the generic figure's pooling over them: arms of a study are not pooled
    (options that only some arms have are folded into the arm's label first)."""
    runs, keys = _fold_partial_keys(runs, keys)
    if len(keys) < 3:
        return (
            _save(heatmap_figure(runs, keys[0], keys[1], experiment), out_dir / f"{experiment}_facet0") if len(keys) == 2 else []
        )
    paths: list[Path] = []
    rest = list(keys[2:])
    for i, (values, part) in enumerate(runs.groupby([runs[k].astype(str) for k in rest], sort=True)):
        label = ", ".join(f"{key_words(k)} = {v}" for k, v in zip(rest, np.atleast_1d(values)))
        paths += _save(heatmap_figure(part, keys[0], keys[1], f"{experiment}\n({label})"), out_dir / f"{experiment}_facet{i}")
    return paths


def render_study(runs: pd.DataFrame, experiment: str, out_dir: Path) -> list[Path]:
    """The generic cell table and figure (with three keys or more: a heatmap per combination of the others), then the
    scores' rank correlations with the gain and their scatter."""
    paths = render_generic(runs, experiment, out_dir)
    keys = sweep_keys(runs)
    if len(keys) >= 3 and GAIN in runs.columns:
        paths += facet_heatmaps(runs, keys, experiment, out_dir)
    if GAIN not in runs.columns or not score_columns(runs):
        return paths
    table = correlation_table(runs, keys)
    csv, md = out_dir / f"{experiment}_scores.csv", out_dir / f"{experiment}_scores.md"
    table.to_csv(csv, index=False)
    md.write_text(_markdown(table))
    paths += [csv, md]
    return paths + _save(scatter_figure(runs, experiment), out_dir / f"{experiment}_scores")

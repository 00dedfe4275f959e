"""Fitting the theory's unknown constants to measured runs, and scoring the fit on held-out cells.

``python -m ptlab.report calibrate fig1a fig1b fig1c fig2`` (docs/design.md section 2, "Calibration"):

1. Cells. Each experiment's finished pipelines are grouped by their whole config minus the seed
   (``seed_stats``); a cell's measured outcome is its paired verdict (transfer - scratch on the same
   seed, 95% t interval): better / no detectable difference / worse.
2. Split. The cells of every experiment are split like a checkerboard over the ranks of its swept
   values (sum of ranks even: fit, odd: held out), so both halves cover the whole grid.
3. Fit, on the fit half only, each constant to the statement it belongs to: ``c1`` of Theorem 4.2 so
   that "transfer error within 0.01 of the Bayes error" agrees best with ``d <= c1 D*``, ``c3`` so that
   "transfer error >= 0.1" agrees best with ``d >= c3 D*``; ``c1'``, ``c3'`` of Theorem 4.3 the same way
   from the scratch accuracies against ``N2 S2^4 / s2^4``; then Proposition 4.4's ``C_gamma`` (transfer helps when scratch is sub-optimal and ``Gamma >= C_gamma``)
   and ``C4`` (negative transfer), each so that the predicted outcome agrees best with the verdicts.
4. Score: on the held-out half, the fraction of cells whose predicted outcome equals the verdict,
   per experiment.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ptlab.report.runs import GAIN, ReportError, load_pipelines, seed_stats
from ptlab.report.synthetic import NEAR_OPTIMAL_ACCURACY, SCRATCH, TRANSFER, BoundaryFit, fit_boundary
from ptlab.theory import (NEGATIVE_TRANSFER, NO_DIFFERENCE, TRANSFER_HELPS, TheoryConstants, gamma, predict,
                          scratch_threshold, source_strength, target_signal_norm, threshold_term)

OUTCOME_OF_VERDICT = {"better": TRANSFER_HELPS, "no detectable difference": NO_DIFFERENCE,
                      "worse": NEGATIVE_TRANSFER}
"""The theory's outcome label that a paired verdict measures."""

INPUTS = {"d": "params.task.d", "n1": "params.task.n1", "n2": "params.task.n2", "u_norm": "params.task.u_norm",
          "v_norm": "params.task.v_norm", "sigma_p1": "params.noise.sigma_p1", "sigma_p2": "params.noise.sigma_p2",
          "alpha": "params.transfer.alpha", "label_noise": "params.task.label_noise"}
"""The theory's inputs and the params that hold them."""

FIT, HELD_OUT = "fit", "held-out"
NEAR_OPTIMAL_MARGIN = 0.01
"""Near Bayes-optimal: a test error at most this much above the Bayes error (the label noise)."""


def cell_table(runs: pd.DataFrame, experiment: str) -> pd.DataFrame:
    """One row per cell (config minus seed) of a synthetic experiment: the theory's inputs, the seed
    statistics, the measured outcome and the fit / held-out split."""
    runs = runs if INPUTS["label_noise"] in runs.columns else runs.assign(**{INPUTS["label_noise"]: "0.0"})
    missing = [c for c in [*INPUTS.values(), TRANSFER, SCRATCH, GAIN] if c not in runs.columns]
    if missing:
        raise ReportError(f"experiment {experiment!r} lacks {', '.join(missing)}: calibration needs synthetic "
                          "transfer pipelines")
    table = seed_stats(runs, [], [TRANSFER, SCRATCH, GAIN])
    swept = list(table.attrs["config_columns"])
    for name, column in INPUTS.items():
        values = table[column] if column in table.columns else runs[column].iloc[0]
        table[name] = pd.to_numeric(values) if column in table.columns else float(values)
    if "params.transfer.kind" in runs.columns and (runs["params.transfer.kind"] == "none").all():
        table["alpha"] = 0.0
    table["experiment"] = experiment
    table["measured"] = table["verdict"].map(OUTCOME_OF_VERDICT)
    ranks = sum((table[c].rank(method="dense").astype(int) - 1 for c in swept), start=pd.Series(0, index=table.index))
    table["split"] = np.where(ranks % 2 == 0, FIT, HELD_OUT)
    table["transfer_acc"] = table[f"{TRANSFER}_mean"]
    table["scratch_acc"] = table[f"{SCRATCH}_mean"]
    table["n_seeds"] = table[f"{GAIN}_count"].astype(int)
    table["gain"] = table[f"{GAIN}_mean"]
    table["gain_ci_low"], table["gain_ci_high"] = table[f"{GAIN}_ci_low"], table[f"{GAIN}_ci_high"]
    table["cell"] = table[swept].apply(
        lambda row: " ".join(f"{c.rsplit('.', 1)[-1]}={v}" for c, v in row.items()), axis=1) if swept else ""
    keep = ["experiment", "cell", "split", *INPUTS, "n_seeds", "transfer_acc", "scratch_acc", "gain",
            "gain_ci_low", "gain_ci_high", "verdict", "measured"]
    return table[keep]


def add_thresholds(cells: pd.DataFrame) -> pd.DataFrame:
    """``D*`` (Theorem 4.2), the scratch threshold (Theorem 4.3) and the source strength per cell."""
    cells = cells.copy()
    s2 = [target_signal_norm(u, v) for u, v in zip(cells["u_norm"], cells["v_norm"])]
    cells["threshold_term"] = [threshold_term(a, int(n1), int(n2), u, s, p1, p2) for a, n1, n2, u, s, p1, p2 in
                               zip(cells["alpha"], cells["n1"], cells["n2"], cells["u_norm"], s2,
                                   cells["sigma_p1"], cells["sigma_p2"])]
    cells["scratch_threshold"] = [scratch_threshold(int(n2), s, p2) for n2, s, p2 in
                                  zip(cells["n2"], s2, cells["sigma_p2"])]
    cells["gamma"] = [gamma(a, int(n1), u, p1, p2, int(d)) for a, n1, u, p1, p2, d in
                      zip(cells["alpha"], cells["n1"], cells["u_norm"], cells["sigma_p1"], cells["sigma_p2"], cells["d"])]
    cells["source_strength"] = [source_strength(a, int(n1), int(n2), p1, p2) for a, n1, n2, p1, p2 in
                                zip(cells["alpha"], cells["n1"], cells["n2"], cells["sigma_p1"], cells["sigma_p2"])]
    return cells


def predicted_outcomes(cells: pd.DataFrame, constants: TheoryConstants) -> list[str]:
    """The theory's predicted outcome of every cell under ``constants``."""
    return [predict(int(r.d), int(r.n1), int(r.n2), r.u_norm, r.v_norm, r.sigma_p1, r.sigma_p2, r.alpha,
                    constants).predicted for r in cells.itertuples()]


def _agreement(cells: pd.DataFrame, constants: TheoryConstants) -> int:
    measured = cells["measured"].to_numpy()
    return int((np.array(predicted_outcomes(cells, constants), dtype=object) == measured).sum())


@dataclass(frozen=True)
class Calibration:
    """Fitted constants, the regime boundary fit of each of c1, c3, c1_prime, c3_prime, and every cell
    with its prediction."""

    constants: TheoryConstants
    boundaries: dict[str, BoundaryFit]
    outcome_agreeing: int
    cells: pd.DataFrame

    def agreement(self) -> pd.DataFrame:
        """Per experiment and split: cells, agreeing cells and their fraction."""
        grouped = self.cells.groupby(["experiment", "split"], sort=True)["agrees"]
        table = grouped.agg(cells="count", agreeing="sum").reset_index()
        table["agreement"] = table["agreeing"] / table["cells"]
        return table


def fit_constant(cells: pd.DataFrame, base: TheoryConstants, key: str, values: pd.Series) -> tuple[float, int]:
    """The value of constant ``key`` whose predicted outcomes agree best with the measured ones. The
    prediction only changes where the constant crosses one of the cells' ``values`` (Gamma for
    ``c_gamma``, the source strength for ``c4``), so one candidate per interval between them is tried
    (ties go to the largest: the theory's "large constant")."""
    finite = np.unique(values[np.isfinite(values) & (values > 0)])
    candidates = [*(finite[:1] / 2), *np.sqrt(finite[:-1] * finite[1:]), *(finite[-1:] * 2)]
    if not candidates:
        return getattr(base, key), _agreement(cells, base)
    scores = [_agreement(cells, replace(base, **{key: float(c)})) for c in candidates]
    best = max(range(len(candidates)), key=lambda i: (scores[i], candidates[i]))
    return float(candidates[best]), scores[best]


def _regime_fits(cells: pd.DataFrame, threshold: str, accuracy: str) -> tuple[BoundaryFit, BoundaryFit]:
    """The near-optimal boundary (``d <= c1 * threshold`` where the error is within ``NEAR_OPTIMAL_MARGIN``
    of the Bayes error, the label noise) and the sub-optimal one (``d >= c3 * threshold`` where the error
    is >= 0.1, i.e. accuracy < 0.9)."""
    d, ratio_to = cells["d"].to_numpy(float), cells[threshold].to_numpy(float)
    near = fit_boundary(d, ratio_to, (cells[accuracy] + cells["label_noise"]).to_numpy(float),
                        1.0 - NEAR_OPTIMAL_MARGIN)
    sub = fit_boundary(d, ratio_to, cells[accuracy].to_numpy(float), NEAR_OPTIMAL_ACCURACY)
    return near, sub


def calibrate(cells: pd.DataFrame) -> Calibration:
    """Fit the constants on the ``fit`` cells (module docstring) and predict every cell."""
    cells = add_thresholds(cells)
    fit = cells[(cells["split"] == FIT) & cells["measured"].notna()]
    if fit.empty:
        raise ReportError("no fit cell has a paired verdict: calibration needs at least 2 seeds per cell")
    transfer_near, transfer_sub = _regime_fits(fit, "threshold_term", "transfer_acc")
    scratch_cells = fit.drop_duplicates(["d", "scratch_threshold", "scratch_acc"])
    scratch_near, scratch_sub = _regime_fits(scratch_cells, "scratch_threshold", "scratch_acc")
    base = TheoryConstants(c1=transfer_near.c, c3=transfer_sub.c, c1_prime=scratch_near.c, c3_prime=scratch_sub.c)
    c_gamma, _ = fit_constant(fit, replace(base, c4=math.inf), "c_gamma", fit["gamma"])
    c4, agreeing = fit_constant(fit, replace(base, c_gamma=c_gamma), "c4", fit["source_strength"])
    constants = replace(base, c_gamma=c_gamma, c4=c4)
    cells["predicted"] = predicted_outcomes(cells, constants)
    cells["agrees"] = cells["predicted"] == cells["measured"]
    return Calibration(constants, {"c1": transfer_near, "c3": transfer_sub, "c1_prime": scratch_near,
                                   "c3_prime": scratch_sub}, agreeing, cells)


def load_cells(experiments: Sequence[str], tracking_uri: str) -> pd.DataFrame:
    """The cells of every experiment, one table."""
    return pd.concat([cell_table(load_pipelines(tracking_uri, e), e) for e in experiments], ignore_index=True)


def constants_yaml(result: Calibration, experiments: Sequence[str], today: dt.date | None = None) -> str:
    """A ``conf/theory/*.yaml`` file holding the fitted constants and where they came from."""
    c = result.constants
    agreement = result.agreement()
    held = agreement[agreement["split"] == HELD_OUT]
    seeds = sorted(set(int(n) for n in result.cells["n_seeds"]))
    day = (today or dt.date.today()).isoformat()
    per_preset = ", ".join(f"{r.experiment} {r.agreeing}/{r.cells}" for r in held.itertuples())
    source = (f"fitted {day} by `python -m ptlab.report calibrate {' '.join(experiments)}` on the fit half of "
              f"{len(result.cells)} cells ({'/'.join(map(str, seeds))} seeds each); held-out agreement {per_preset}")
    fits = "; ".join(f"{key} {b.agreeing}/{b.cells} cells (any value in [{b.c_low:.4g}, {b.c_high:.4g}))"
                     for key, b in result.boundaries.items())
    lines = [
        "# Theory constants fitted to measured runs (docs/design.md section 2, Calibration).",
        f"# Refit: python -m ptlab -m experiment=<each preset> && python -m ptlab.report calibrate {' '.join(experiments)} "
        "--write conf/theory/calibrated.yaml",
        f"# Regime boundaries agree with the fit cells: {fits}.",
        f"# c_gamma and c4: {result.outcome_agreeing} fit cells agree on the outcome.",
        "# Held-out outcome agreement: " + "; ".join(f"{r.experiment} {r.agreeing}/{r.cells} = {r.agreement:.0%}"
                                                   for r in held.itertuples()),
        f"c1: {c.c1:.6g}",
        f"c3: {c.c3:.6g}",
        f"c1_prime: {c.c1_prime:.6g}",
        f"c3_prime: {c.c3_prime:.6g}",
        f"c4: {c.c4:.6g}",
        f"c_gamma: {c.c_gamma:.6g}",
        f"source: {json.dumps(source)}",
    ]
    return "\n".join(lines) + "\n"


def agreement_text(result: Calibration) -> str:
    """The fitted constants and the agreement per experiment and split, as printable lines."""
    c = result.constants
    lines = [f"{key} = {getattr(c, key):.4g} ({'transfer' if key in ('c1', 'c3') else 'scratch'} "
             f"{'near' if key.startswith('c1') else 'sub'}-optimal boundary: {b.agreeing}/{b.cells} fit cells agree)"
             for key, b in result.boundaries.items()]
    lines += [f"c_gamma = {c.c_gamma:.4g}, c4 = {c.c4:.4g} (Proposition 4.4: {result.outcome_agreeing} fit cells "
              "agree on the outcome)",
             "outcome agreement (predicted vs the paired verdict):"]
    for r in result.agreement().itertuples():
        lines.append(f"  {r.experiment:<12} {r.split:<9} {r.agreeing:>4}/{r.cells:<4} = {r.agreement:.1%}")
    return "\n".join(lines)


def write_outputs(result: Calibration, out_dir: Path) -> list[Path]:
    """``cells.csv`` (every cell, its split, measurement and prediction) and ``agreement.csv``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cells, agreement = out_dir / "calibration_cells.csv", out_dir / "calibration_agreement.csv"
    result.cells.to_csv(cells, index=False)
    result.agreement().to_csv(agreement, index=False)
    return [cells, agreement]

"""The Kou et al. 2023 heatmap (experiment ``kou2023*``): scratch test error over dimension and signal
strength, with the Theorem 4.3 boundary ``n ||mu||^4 = C sigma_p^4 d`` and its single constant fitted.

Kou et al. 2023 ("Benign Overfitting in Two-layer ReLU Convolutional Neural Networks", the paper's
Theorem 4.3) prove that the test error is near the Bayes error p if ``n ||mu||^4 >= C1 sigma_p^4 d`` and a
constant above it if ``n ||mu||^4 <= C3 sigma_p^4 d``. Here ``mu`` is the one signal direction (``v2``; the
preset sets ``u = 0``), n = ``task.n2``, sigma_p = ``noise.sigma_p2``. The fit: a cell (mean over seeds) is
"benign" when its test error is below the midpoint between the Bayes error p and chance,
``(p + 0.5) / 2``; the boundary is ``d = C * n ||mu||^4 / sigma_p^4`` and ``C`` is the value that classifies
the most cells correctly (``ptlab.report.synthetic.fit_boundary`` on the ratio ``d / (n ||mu||^4 / sigma_p^4)``,
the geometric middle of the best interval). So the fitted ``C`` is the paper's ``1 / C1 = 1 / C3`` of a
single sharp boundary, in the units of ptlab's ``theory.c1_prime`` (docs/design.md section 2).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from ptlab.report.generic import write_table
from ptlab.report.runs import ReportError
from ptlab.report.synthetic import BoundaryFit, fit_boundary, save_figure

D, MU, SCRATCH = "params.task.d", "params.task.v_norm", "metrics.scratch_test_acc"
FIXED = {"n": "params.task.n2", "sigma_p": "params.noise.sigma_p2", "p": "params.task.label_noise"}


def _fixed(runs: pd.DataFrame, experiment: str) -> dict[str, float]:
    values = {}
    for name, column in FIXED.items():
        if column not in runs:
            raise ReportError(f"experiment {experiment!r} has no {column.removeprefix('params.')} column")
        distinct = pd.to_numeric(runs[column]).unique()
        if len(distinct) != 1:
            raise ReportError(f"experiment {experiment!r}: {column.removeprefix('params.')} varies; the heatmap needs it fixed")
        values[name] = float(distinct[0])
    return values


def kou2023_table(runs: pd.DataFrame, experiment: str) -> tuple[pd.DataFrame, BoundaryFit, dict[str, float]]:
    """Per (d, ||mu||) cell: mean and std of the test error over seeds, the seed count, the theory's
    ``n ||mu||^4 / sigma_p^4`` and the observed and fitted regimes; the boundary fit; the fixed values."""
    for column in (D, MU, SCRATCH):
        if column not in runs:
            raise ReportError(f"experiment {experiment!r} has no {column} column: is it a kou2023 sweep?")
    fixed = _fixed(runs, experiment)
    frame = pd.DataFrame(
        {"d": pd.to_numeric(runs[D]), "mu": pd.to_numeric(runs[MU]), "error": 1.0 - pd.to_numeric(runs[SCRATCH])}
    )
    table = frame.groupby(["d", "mu"]).error.agg(["mean", "std", "count"]).reset_index()
    table.columns = ["d", "mu", "error_mean", "error_std", "seeds"]
    table["signal_term"] = fixed["n"] * table.mu**4 / fixed["sigma_p"] ** 4
    threshold = (fixed["p"] + 0.5) / 2
    with np.errstate(divide="ignore"):  # ||mu|| = 0: the ratio d / 0 is inf, harmful for every C
        fit = fit_boundary(table.d.to_numpy(), table.signal_term.to_numpy(), 1.0 - table.error_mean.to_numpy(), 1.0 - threshold)
    table["benign"] = table.error_mean < threshold
    table["predicted_benign"] = table.d <= fit.c * table.signal_term
    return table, fit, fixed


def kou2023_figure(table: pd.DataFrame, fit: BoundaryFit, fixed: dict[str, float], title: str) -> Figure:
    """The heatmap in Kou et al.'s axes (d across, ||mu|| up) with the fitted boundary
    ``||mu|| = (C sigma_p^4 d / n)^(1/4)``."""
    grid = table.pivot(index="mu", columns="d", values="error_mean").sort_index()
    d_values, mu_values = grid.columns.to_numpy(float), grid.index.to_numpy(float)
    figure = Figure(figsize=(7.5, 6), layout="constrained")
    ax = figure.subplots()
    # rasterized: the PDF holds the 10,000 cells as one image, not a path each (8-10 s of savefig for kou2023)
    mesh = ax.pcolormesh(
        d_values, mu_values, grid.to_numpy(), shading="nearest", cmap="viridis", vmin=0, vmax=0.5, rasterized=True
    )
    figure.colorbar(mesh, ax=ax, label="test error (mean over seeds)")
    line_d = np.linspace(d_values.min(), d_values.max(), 200)
    boundary = (fit.c * fixed["sigma_p"] ** 4 * line_d / fixed["n"]) ** 0.25
    shown = boundary <= mu_values.max()
    ax.plot(
        line_d[shown],
        boundary[shown],
        color="red",
        linewidth=2,
        label=f"$n\\|\\mu\\|^4 = C\\sigma_p^4 d$, C = {fit.c:.3g} ({fit.agreement:.1%} of cells agree)",
    )
    ax.set(xlabel="dimension $d$", ylabel=r"signal strength $\|\mu\|$", title=title)
    ax.legend(loc="upper left", fontsize=8)
    return figure


def render_kou2023(runs: pd.DataFrame, experiment: str, out_dir: Path) -> list[Path]:
    """The heatmap with its fitted boundary, the per-cell table and the fit."""
    table, fit, fixed = kou2023_table(runs, experiment)
    title = (
        f"{experiment}: n={fixed['n']:g}, $\\sigma_p$={fixed['sigma_p']:g}, p={fixed['p']:g}, {int(table.seeds.sum())} trainings"
    )
    figure = kou2023_figure(table, fit, fixed, title)
    boundary = pd.DataFrame(
        [
            {
                "fitted_C": fit.c,
                "C_low": fit.c_low,
                "C_high": fit.c_high,
                "error_threshold": 1.0 - fit.accuracy_threshold,
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

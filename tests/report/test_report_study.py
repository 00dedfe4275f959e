"""The study report: Spearman's rho of each transferability score with the gain, with a bootstrap interval."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ptlab.report.registry import renderer_for
from ptlab.report.study import correlation_table, score_columns, spearman_interval


def _runs(seeds: int = 12) -> pd.DataFrame:
    """Two controls x two ||u|| cells: the gain rises with the logme score, leep is noise."""
    rng = np.random.default_rng(3)
    rows = []
    for control in ("none", "shuffled"):
        for u in (0.0, 2.0):
            for seed in range(seeds):
                logme = u + (control == "none") + 0.1 * rng.standard_normal()
                rows.append(
                    {
                        "params.transfer.control": control,
                        "params.task.u_norm": str(u),
                        "params.seed": str(seed),
                        "metrics.transferability/logme": logme,
                        "metrics.transferability/logme_scratch": 0.5 + 0.01 * rng.standard_normal(),
                        "metrics.transferability/leep": rng.standard_normal(),
                        "metrics.transfer_test_acc": 0.7 + 0.02 * logme,
                        "metrics.scratch_test_acc": 0.7,
                        "metrics.transfer_gain": 0.02 * logme + 0.005 * rng.standard_normal(),
                    }
                )
    return pd.DataFrame(rows)


def test_spearman_interval_matches_scipy_and_covers_it() -> None:
    x = np.arange(30.0)
    y = x + np.random.default_rng(0).normal(scale=8.0, size=30)
    rho, low, high = spearman_interval(x, y)
    assert rho == pytest.approx(stats.spearmanr(x, y).statistic, abs=1e-12)
    assert low < rho < high and -1 <= low and high <= 1
    assert spearman_interval(x, y) == (rho, low, high)  # seeded: the same interval twice


def test_spearman_interval_undefined_cases_are_nan() -> None:
    assert all(np.isnan(spearman_interval([1.0, 2.0], [3.0, 4.0])))
    assert all(np.isnan(spearman_interval([1.0, 1.0, 1.0, 1.0], [1.0, 2.0, 3.0, 4.0])))
    rho, _, _ = spearman_interval([1.0, 2.0, np.nan, 4.0, 5.0], [1.0, 2.0, 9.0, 4.0, 5.0])
    assert rho == pytest.approx(1.0)  # the NaN pair is dropped, the rest is monotone


def test_correlation_table_over_runs_and_cells() -> None:
    runs = _runs()
    assert set(score_columns(runs)) == {"logme", "logme_scratch", "leep", "logme - logme_scratch"}
    table = correlation_table(runs, ["params.transfer.control", "params.task.u_norm"]).set_index(["score", "level"])
    assert table.loc[("logme", "runs"), "n"] == 48 and table.loc[("logme", "cells"), "n"] == 4
    expected = stats.spearmanr(runs["metrics.transferability/logme"], runs["metrics.transfer_gain"]).statistic
    assert table.loc[("logme", "runs"), "spearman"] == pytest.approx(expected)
    assert table.loc[("logme", "runs"), "ci_low"] > 0.8  # the gain follows logme
    assert table.loc[("logme", "cells"), "spearman"] == pytest.approx(1.0)  # cell means in the same order
    assert table.loc[("leep", "runs"), "ci_low"] < 0 < table.loc[("leep", "runs"), "ci_high"]  # noise: no ranking
    unset = runs.assign(**{"params.task.u_norm": runs["params.task.u_norm"].where(runs["params.task.u_norm"] == "2.0")})
    cells = correlation_table(unset, ["params.transfer.control", "params.task.u_norm"]).set_index(["score", "level"])
    assert cells.loc[("logme", "cells"), "n"] == 4  # a key left unset (NaN) in some cells is a value of its own


def test_study_renderer_writes_the_score_table(tmp_path) -> None:
    assert renderer_for("study_controls").__name__ == "render_study"
    paths = renderer_for("study_controls")(_runs(), "study_controls", tmp_path)
    names = {p.name for p in paths}
    assert {"study_controls.md", "study_controls_scores.md", "study_controls_scores.png"} <= names
    text = (tmp_path / "study_controls_scores.md").read_text()
    assert "logme - logme_scratch" in text and "bootstrap interval" in text


def test_options_of_some_arms_fold_into_the_arm_and_each_other_key_gets_a_facet(tmp_path) -> None:
    """``regularizer.lam`` exists only beside l2sp: it joins the arm's label (``l2sp lam=0.1``), so the heatmaps are
    arm x ||u||, one per alpha, and no arm is dropped as a NaN column."""
    from ptlab.report.study import _fold_partial_keys, facet_heatmaps

    rows = []
    for arm, lam in (("none", None), ("l2sp", "0.01"), ("l2sp", "0.1"), ("freeze", None)):
        for u in ("0.0", "2.0"):
            for alpha in ("0.5", "1.0"):
                for seed in range(3):
                    rows.append(
                        {
                            "params.regularizer.name": arm,
                            "params.regularizer.lam": lam,
                            "params.task.u_norm": u,
                            "params.transfer.alpha": alpha,
                            "params.seed": str(seed),
                            "metrics.transfer_gain": 0.01 * seed,
                        }
                    )
    runs = pd.DataFrame(rows)
    keys = ["params.regularizer.name", "params.regularizer.lam", "params.task.u_norm", "params.transfer.alpha"]
    folded, kept = _fold_partial_keys(runs, keys)
    assert kept == ["params.regularizer.name", "params.task.u_norm", "params.transfer.alpha"]
    assert sorted(set(folded["params.regularizer.name"])) == ["freeze", "l2sp lam=0.01", "l2sp lam=0.1", "none"]
    paths = facet_heatmaps(runs, keys, "study_x", tmp_path)
    assert sorted(p.name for p in paths if p.suffix == ".png") == ["study_x_facet0.png", "study_x_facet1.png"]

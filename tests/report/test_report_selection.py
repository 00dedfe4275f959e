"""The selection report: strategies ranked by paired gain over random, per setting, with t intervals; and
the synthetic preset run end to end at a tiny size and reported from MLflow."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ptlab.report import make_report
from ptlab.report.registry import renderer_for
from ptlab.report.runs import ReportError
from ptlab.report.selection import rank_strategies, render_selection
from tests.conftest import SMALL, run_cli

ACC = {  # (alpha, strategy) -> transfer test accuracy per seed 0..3
    (0.25, "random"): [0.70, 0.72, 0.71, 0.69],
    (0.25, "signal"): [0.80, 0.83, 0.79, 0.80],
    (0.25, "l1"): [0.75, 0.76, 0.74, 0.75],
    (0.5, "random"): [0.90, 0.91, 0.89, 0.90],
    (0.5, "signal"): [0.90, 0.92, 0.90, 0.91],
    (0.5, "l1"): [0.88, 0.90, 0.86, 0.89],
}
SCRATCH = [0.65, 0.66, 0.64, 0.65]


def runs() -> pd.DataFrame:
    """Params as MLflow returns them (strings); the scratch accuracy depends on the seed only."""
    return pd.DataFrame(
        [
            {
                "params.transfer.alpha": str(alpha),
                "params.transfer.selection": name,
                "params.seed": str(seed),
                "params.task.n2": "20",
                "metrics.transfer_test_acc": acc,
                "metrics.scratch_test_acc": SCRATCH[seed],
                "metrics.transfer_gain": acc - SCRATCH[seed],
            }
            for (alpha, name), accs in ACC.items()
            for seed, acc in enumerate(accs)
        ]
    )


def t_interval(diffs: list[float]) -> tuple[float, float]:
    values = np.asarray(diffs)
    half = stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return values.mean() - half, values.mean() + half


def test_gains_over_random_are_paired_by_seed_with_t_intervals() -> None:
    table = rank_strategies(runs())
    assert table["strategy"].tolist() == ["signal", "l1", "random", "signal", "random", "l1"]  # ranked per alpha
    row = table[(table["params.transfer.alpha"] == 0.25) & (table["strategy"] == "l1")].iloc[0]
    diffs = [a - r for a, r in zip(ACC[(0.25, "l1")], ACC[(0.25, "random")])]
    assert row["gain_over_random"] == pytest.approx(np.mean(diffs))
    assert (row["gain_over_random_ci_low"], row["gain_over_random_ci_high"]) == pytest.approx(t_interval(diffs))
    assert row["gain_over_random_n"] == 4 and row["verdict"] == "better"
    gaps = [a - s for a, s in zip(ACC[(0.25, "l1")], ACC[(0.25, "signal")])]
    assert row["gap_to_signal"] == pytest.approx(np.mean(gaps))
    assert (row["gap_to_signal_ci_low"], row["gap_to_signal_ci_high"]) == pytest.approx(t_interval(gaps))
    oracle = np.mean([s - r for s, r in zip(ACC[(0.25, "signal")], ACC[(0.25, "random")])])
    assert row["share_of_signal_gain"] == pytest.approx(np.mean(diffs) / oracle)
    assert row["gain_over_scratch"] == pytest.approx(np.mean(ACC[(0.25, "l1")]) - np.mean(SCRATCH))
    half = table[table["params.transfer.alpha"] == 0.5].set_index("strategy")
    # the oracle's gain at alpha=0.5 has a CI that includes 0: no share is computed from it
    assert half.loc["signal", "gain_over_random_ci_low"] <= 0 and half["share_of_signal_gain"].isna().all()
    assert half.loc["random", "verdict"] == "random" and half.loc["random", "gain_over_random"] == 0.0


def test_a_seed_missing_for_random_is_left_out_of_the_pairs() -> None:
    frame = runs()
    frame = frame[~((frame["params.transfer.selection"] == "random") & (frame["params.seed"] == "3"))]
    table = rank_strategies(frame)
    assert table.loc[table["strategy"] == "l1", "gain_over_random_n"].tolist() == [3, 3]


def test_report_files_and_errors(tmp_path: Path) -> None:
    assert renderer_for("selection_digits") is render_selection
    paths = render_selection(runs(), "selection_synthetic", tmp_path)
    assert sorted(p.name for p in paths) == ["selection_synthetic.csv", "selection_synthetic.md"]
    text = (tmp_path / "selection_synthetic.md").read_text()
    assert "## alpha=0.25" in text and "| 1 | signal | 80.5 | +10.00 |" in text
    assert "Better than random (CI above 0): signal, l1; worse (CI below 0): none." in text
    assert len(pd.read_csv(tmp_path / "selection_synthetic.csv")) == 6
    with pytest.raises(ReportError, match="no 'random' runs to pair with"):
        rank_strategies(runs().query("`params.transfer.selection` != 'random'"))


@pytest.mark.slow
def test_the_synthetic_preset_runs_batched_and_reports(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = ["transfer.selection=random,signal,task2_alignment", "transfer.alpha=0.25", "task.u_norm=1.0", "seed=0,1"]
    done = run_cli(
        ["-m", "experiment=selection_synthetic", f"logger.tracking_uri={uri}", *SMALL, *sweep, f"cache.dir={tmp_path / 'cache'}"],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    paths = make_report("selection_synthetic", uri, tmp_path / "report", log_to_mlflow=False)
    table = pd.read_csv(next(p for p in paths if p.suffix == ".csv"))
    assert sorted(table["strategy"]) == ["random", "signal", "task2_alignment"]
    assert table["gain_over_random_n"].tolist() == [2, 2, 2]


def test_a_strategy_chosen_by_group_is_named_by_its_target() -> None:
    frame = runs()
    group = frame["params.transfer.selection"] == "l1"
    frame["params.transfer.selection._target_"] = None
    frame.loc[group, "params.transfer.selection._target_"] = "mylab.strategies.L1Variant"
    frame.loc[group, "params.transfer.selection"] = None
    assert set(rank_strategies(frame)["strategy"]) == {"random", "signal", "L1Variant"}

"""Report statistics: the paired CI against its formula, groups that never mix configs, verdicts."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd
import pytest

from ptlab.report.images import render_table1
from ptlab.report.runs import config_label, paired_ci, seed_stats, verdict


def pipelines(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    frame["metrics.transfer_gain"] = frame["metrics.transfer_test_acc"] - frame["metrics.scratch_test_acc"]
    frame["start_time"] = range(len(frame))
    return frame


def test_paired_ci_is_the_t_interval_of_the_mean_gain() -> None:
    gains = pd.Series([0.01, 0.03, 0.02])
    low, high = paired_ci(gains)
    half = 4.302652729911275 * 0.01 / math.sqrt(3)  # t_{0.975, 2} * sd / sqrt(n)
    assert low == pytest.approx(0.02 - half, abs=1e-12) and high == pytest.approx(0.02 + half, abs=1e-12)
    assert all(math.isnan(v) for v in paired_ci(pd.Series([0.05])))
    assert verdict(low, high, 3) == "no detectable difference"  # 0.02 +- 0.025 includes 0
    assert verdict(0.001, 0.04, 3) == "better" and verdict(-0.03, -0.01, 3) == "worse"
    assert verdict(-0.01, 0.02, 3) == "no detectable difference" and verdict(math.nan, math.nan, 1) == "n=1: no CI"


def test_pipelines_that_differ_in_more_than_the_seed_are_separate_rows() -> None:
    runs = pipelines(
        [
            {
                "params.seed": "0",
                "params.task.u_norm": "0.0",
                "params.train.downstream_epochs": "2",
                "metrics.transfer_test_acc": 0.90,
                "metrics.scratch_test_acc": 0.88,
            },
            {
                "params.seed": "1",
                "params.task.u_norm": "0.0",
                "params.train.downstream_epochs": "2",
                "metrics.transfer_test_acc": 0.92,
                "metrics.scratch_test_acc": 0.89,
            },
            {
                "params.seed": "0",
                "params.task.u_norm": "0.0",
                "params.train.downstream_epochs": "3",
                "metrics.transfer_test_acc": 0.70,
                "metrics.scratch_test_acc": 0.95,
            },
        ]
    )
    table = seed_stats(runs, ["params.task.u_norm"], ["metrics.transfer_test_acc", "metrics.transfer_gain"])
    assert len(table) == 2
    assert table["metrics.transfer_gain_count"].tolist() == [2, 1]
    assert table["metrics.transfer_gain_mean"].tolist() == pytest.approx([0.025, -0.25])
    assert config_label(table, ["params.task.u_norm"]).tolist() == ["downstream_epochs=2", "downstream_epochs=3"]
    assert table["verdict"].tolist()[1] == "n=1: no CI"


def test_table1_gives_a_row_per_config_with_n_and_ci(tmp_path: Path) -> None:
    base = {
        "params.upstream_model.arch": "resnet34",
        "params.model.arch": "resnet18",
        "params.task.n1_ratio": "2.0",
        "params.upstream_model.width": "0.25",
        "params.model.width": "0.25",
    }
    rows = [
        {
            **base,
            "params.seed": str(s),
            "params.train.downstream_epochs": e,
            "metrics.transfer_test_acc": t,
            "metrics.scratch_test_acc": c,
        }
        for s, e, t, c in [(0, "2", 0.91, 0.90), (1, "2", 0.93, 0.90), (0, "3", 0.80, 0.95)]
    ]
    runs = pipelines(rows)
    render_table1(runs, "table1_test", tmp_path)
    text = (tmp_path / "table1_test.md").read_text()
    assert "(downstream_epochs=2)" in text and "(downstream_epochs=3)" in text
    assert "n=2" in text and "n=1" in text


def trend_runs() -> pd.DataFrame:
    """Table 1 rows of one pair: gains (points) per seed at N1/N2 = 1, 2, 4, 8 (log2: 0, 1, 2, 3)."""
    gains = {0: [0, 2, 3, 5], 1: [5, 7, 9, 11], 2: [2, 4, 6, 8], 3: [2, 2]}  # seed 3 lacks N1/N2 = 4, 8
    rows = []
    for seed, points in gains.items():
        for ratio, gain in zip((1, 2, 4, 8), points):
            rows.append(
                {
                    "params.upstream_model.arch": "vgg16",
                    "params.model.arch": "vgg11",
                    "params.task.n1_ratio": str(ratio),
                    "params.seed": str(seed),
                    "metrics.transfer_test_acc": 0.6 + gain / 100,
                    "metrics.scratch_test_acc": 0.6,
                }
            )
    return pipelines(rows)


def test_trend_is_the_t_interval_of_per_seed_ols_slopes(tmp_path: Path) -> None:
    import numpy as np

    from ptlab.report.images import render_table1, seed_slopes, trend_table, with_pairs

    runs = with_pairs(trend_runs(), ["params.task.n1_ratio"])
    slopes = seed_slopes(runs, ["pair"], "params.task.n1_ratio", np.log2)
    # seed 0: x = 0..3, y = 0, 2, 3, 5: sum (x - 1.5)(y - 2.5) = 8, sum (x - 1.5)^2 = 5 -> 1.6; seeds 1, 2: 2, 2
    assert slopes["slope"].tolist() == pytest.approx([1.6, 2.0, 2.0])
    assert slopes["seed"].tolist() == ["0", "1", "2"]  # seed 3 (two of four cells) is left out
    trend = trend_table(runs, ["pair"], "params.task.n1_ratio", np.log2, "log2(N1/N2)").iloc[0]
    mean, sd = (1.6 + 2 + 2) / 3, float(np.std([1.6, 2.0, 2.0], ddof=1))
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert trend["slope"] == pytest.approx(mean) and trend["seeds"] == 3
    assert trend["ci_low"] == pytest.approx(mean - half) and trend["ci_high"] == pytest.approx(mean + half)
    assert mean - half > 0 and trend["verdict"] == "increasing"  # 1.87 +- 0.57
    paths = render_table1(trend_runs(), "table1_trend", tmp_path)
    assert [p.name for p in paths] == ["table1_trend.md", "table1_trend.csv", "table1_trend_trend.csv", "table1_trend.png"]
    text = paths[0].read_text()
    assert f"slope of the gain on log2(N1/N2) {mean:+.3f} points [{mean - half:+.3f}, {mean + half:+.3f}]" in text
    assert "n=3 seeds): increasing" in text


def test_trend_verdict_without_a_trend() -> None:
    import numpy as np

    from ptlab.report.images import trend_table, with_pairs

    runs = trend_runs()
    runs = runs[runs["params.seed"].isin(["0", "1"])].copy()
    runs.loc[runs["params.seed"] == "1", "metrics.transfer_gain"] *= -1  # slopes 1.6 and -2
    trend = trend_table(with_pairs(runs, []), ["pair"], "params.task.n1_ratio", np.log2, "x").iloc[0]
    assert trend["slope"] == pytest.approx(-0.2) and trend["verdict"] == "no detectable trend"

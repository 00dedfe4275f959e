"""Figure 1 / Figure 2 reports: seed statistics, the fitted theory boundary, files, MLflow, errors."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from ptlab.pipeline import run_pipeline
from ptlab.report import make_report
from ptlab.report.cli import main as report_main
from ptlab.report.registry import renderer_for
from ptlab.report.synthetic import d_star_of, fit_boundary, render_fig1, render_fig2
from tests.conftest import run_cli

FIXED = {
    "params.task.n1": "200",
    "params.task.n2": "20",
    "params.task.v_norm": "2.0",
    "params.noise.sigma_p1": "1.0",
    "params.noise.sigma_p2": "1.0",
    "params.transfer.alpha": "0.5",
    "params.transfer.kind": "filters",
}


def fig1_runs() -> pd.DataFrame:
    """Two seeds at each of two ||u|| values, params as MLflow returns them (strings)."""
    rows = [(0.0, 0, 0.70, 0.74), (0.0, 1, 0.72, 0.76), (2.0, 0, 0.96, 0.90), (2.0, 1, 0.98, 0.86)]
    return pd.DataFrame(
        [
            {
                **FIXED,
                "params.task.u_norm": str(u),
                "params.seed": str(seed),
                "params.theory.predicted": "negative_transfer" if u == 0 else "no_difference",
                "params.prediction.outcome": "negative_transfer" if u == 0 else "transfer_helps",
                "metrics.transfer_test_acc": t,
                "metrics.scratch_test_acc": s,
                "metrics.transfer_gain": t - s,
                "metrics.theory/threshold_term": 91.0 if u == 0 else 2651.0,
            }
            for u, seed, t, s in rows
        ]
    )


def test_renderers_are_found_by_experiment_prefix() -> None:
    assert renderer_for("fig1c_small") is render_fig1
    assert renderer_for("fig1a") is render_fig1
    assert renderer_for("fig2_small") is render_fig2


def test_fig1_report_numbers_and_files(tmp_path: Path) -> None:
    paths = render_fig1(fig1_runs(), "fig1c_small", tmp_path)
    assert sorted(p.name for p in paths) == sorted(f"fig1c_small.{ext}" for ext in ("png", "pdf", "csv", "md"))
    assert all(p.stat().st_size > 0 for p in paths)
    table = pd.read_csv(tmp_path / "fig1c_small.csv")
    assert table["task.u_norm"].tolist() == [0.0, 2.0]
    assert table["transfer_test_acc_mean"].tolist() == pytest.approx([0.71, 0.97])
    assert table["scratch_test_acc_mean"].tolist() == pytest.approx([0.75, 0.88])
    assert table["transfer_gain_mean"].tolist() == pytest.approx([-0.04, 0.09])
    assert table["transfer_test_acc_std"].tolist() == pytest.approx([math.sqrt(2 * 0.01**2), math.sqrt(2 * 0.01**2)])
    assert table["transfer_test_acc_count"].tolist() == [2, 2]
    assert table["theory_predicted"].tolist() == ["negative_transfer", "no_difference"]
    assert table["phase_predicted"].tolist() == ["negative_transfer", "transfer_helps"]
    assert re.search(r"\|\s+0.7100\s+\|", (tmp_path / "fig1c_small.md").read_text())


def test_fit_boundary_hand_example() -> None:
    # ratios d / D* = 0.25, 0.5, 1, 2; near-optimal only at the first two: any C in [0.5, 1) is exact.
    fit = fit_boundary(np.array([1.0, 2.0, 4.0, 8.0]), np.full(4, 4.0), np.array([0.95, 0.95, 0.5, 0.5]))
    assert (fit.c_low, fit.c_high, fit.agreeing, fit.cells) == (0.5, 1.0, 4, 4)
    assert fit.c == pytest.approx(math.sqrt(0.5)) and fit.agreement == 1.0
    # One cell out of line: the best C gets 3 of 4.
    noisy = fit_boundary(np.array([1.0, 2.0, 4.0, 8.0]), np.full(4, 4.0), np.array([0.95, 0.5, 0.95, 0.5]))
    assert (noisy.agreeing, noisy.agreement) == (3, 0.75)
    # D* = inf is near-optimal for every C, nan is left out.
    edge = fit_boundary(np.array([1.0, 2.0, 3.0]), np.array([math.inf, math.nan, 1.0]), np.array([0.95, 0.95, 0.5]))
    assert (edge.agreeing, edge.cells) == (2, 2)


def fig2_runs(true_c: float) -> pd.DataFrame:
    """A (d, ||u||) grid whose accuracy is high exactly where d <= true_c * D*(||u||)."""
    inputs = {"alpha": 0.5, "n1": 200, "n2": 20, "v_norm": 2.0, "sigma_p1": 1.0, "sigma_p2": 1.0}
    rows = []
    for u in (0.0, 1.0, 2.0, 3.0):
        d_star = d_star_of(u, inputs)[0]
        for d in (250, 1000, 4000, 16000):
            acc = 0.97 if d <= true_c * d_star else 0.7
            rows.append(
                {
                    **FIXED,
                    "params.task.d": str(d),
                    "params.task.u_norm": str(u),
                    "params.seed": "0",
                    "metrics.transfer_test_acc": acc,
                    "metrics.scratch_test_acc": 0.8,
                    "metrics.transfer_gain": acc - 0.8,
                }
            )
    return pd.DataFrame(rows)


def test_fig2_report_fits_the_boundary(tmp_path: Path) -> None:
    # D*(0)=91.4, D*(1)=285.7, D*(2)=2651.4, D*(3)=12537.1; with C=1.5 the near cells are
    # (1, 250), (2, 250), (2, 1000), (3, 250), (3, 1000), (3, 4000), (3, 16000).
    paths = render_fig2(fig2_runs(true_c=1.5), "fig2_small", tmp_path)
    assert {p.name for p in paths} == {
        "fig2_small.png",
        "fig2_small.pdf",
        "fig2_small.csv",
        "fig2_small.md",
        "fig2_small_boundary.csv",
        "fig2_small_boundary.md",
    }
    boundary = pd.read_csv(tmp_path / "fig2_small_boundary.csv").iloc[0]
    assert (boundary["agreeing_cells"], boundary["cells"], boundary["agreement"]) == (16, 16, 1.0)
    # The fitted interval is bounded by the nearest cells on either side of the true boundary.
    assert boundary["C_low"] == pytest.approx(16000 / 12537.142857142857)
    assert boundary["C_high"] == pytest.approx(4000 / (185600 / 70))
    assert boundary["C_low"] <= 1.5 < boundary["C_high"]
    cells = pd.read_csv(tmp_path / "fig2_small.csv")
    assert len(cells) == 16 and cells["agrees"].all()
    assert cells.loc[(cells["d"] == 1000) & (cells["u_norm"] == 2.0), "threshold_term"].item() == pytest.approx(185600 / 70)
    assert "agreement" in (tmp_path / "fig2_small_boundary.md").read_text()


def test_fig2_needs_fixed_theory_inputs(tmp_path: Path) -> None:
    runs = fig2_runs(1.0)
    runs.loc[0, "params.task.n2"] = "40"
    with pytest.raises(Exception, match=r"task\.n2 varies \(20, 40\)"):
        render_fig2(runs, "fig2_small", tmp_path)


def test_report_from_mlflow_logs_a_report_run(make_cfg, tracking_uri: str, tmp_path: Path) -> None:
    for u in ("0.0", "2.0"):
        run_pipeline(make_cfg(f"task.u_norm={u}", "logger.experiment_name=fig1c_tiny"), tmp_path / f"run{u}")
    paths = make_report("fig1c_tiny", tracking_uri, tmp_path / "report")
    assert {p.suffix for p in paths} == {".png", ".pdf", ".csv", ".md"}
    table = pd.read_csv(tmp_path / "report" / "fig1c_tiny.csv")
    assert table["task.u_norm"].tolist() == [0.0, 2.0] and table["transfer_test_acc_count"].tolist() == [1, 1]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("fig1c_tiny")
    [report] = client.search_runs([experiment.experiment_id], "tags.`ptlab.stage` = 'report'")
    assert {a.path for a in client.list_artifacts(report.info.run_id, "report")} == {
        f"report/fig1c_tiny.{ext}" for ext in ("png", "pdf", "csv", "md")
    }


def test_report_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = f"sqlite:///{tmp_path / 'absent.db'}"
    assert report_main(["fig1a_small", "--tracking-uri", missing, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err and "Traceback" not in err

    # An experiment that exists but holds no finished pipeline run.
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(store).create_experiment("fig1b_small", artifact_location=(tmp_path / "art").as_uri())
    capsys.readouterr()
    assert report_main(["fig1b_small", "--tracking-uri", store, "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no finished pipeline runs" in err


@pytest.mark.slow
def test_small_presets_show_the_papers_trends(tmp_path: Path) -> None:
    """Run fig1a/b/c_small through the CLI and check the directions on the report's seed averages."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    expected = {"fig1a_small": "task.n1", "fig1b_small": "noise.sigma_p1", "fig1c_small": "task.u_norm"}
    for experiment, column in expected.items():
        done = run_cli(["-m", f"experiment={experiment}", f"logger.tracking_uri={uri}"], cwd=tmp_path, timeout=900)
        assert done.returncode == 0, done.stderr[-2000:]
        make_report(experiment, uri, tmp_path / "reports" / experiment)
        table = pd.read_csv(tmp_path / "reports" / experiment / f"{experiment}.csv").sort_values(column)
        transfer = table["transfer_test_acc_mean"].to_numpy()
        steps = np.diff(transfer)
        if experiment == "fig1b_small":
            assert (steps < 0).all(), table.to_string()
        else:
            assert (steps > 0).all(), table.to_string()
        if experiment == "fig1c_small":
            at_zero = table[table[column] == 0.0].iloc[0]
            assert at_zero["transfer_test_acc_mean"] < at_zero["scratch_test_acc_mean"], table.to_string()


def test_a_repeated_pipeline_counts_once(make_cfg, tracking_uri: str, tmp_path: Path) -> None:
    from ptlab.report.runs import load_pipelines

    for k, u in enumerate(("0.0", "2.0", "2.0")):
        run_pipeline(make_cfg(f"task.u_norm={u}", "logger.experiment_name=repeated"), tmp_path / f"run{k}")
    runs = load_pipelines(tracking_uri, "repeated")
    assert len(runs) == 2 and sorted(runs["params.task.u_norm"].astype(float)) == [0.0, 2.0]

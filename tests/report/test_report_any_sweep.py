"""The report of any sweep: the figure follows the sweep's structure, gains are in points, the table names its
keys in words and keeps to the columns that vary. The store comes from a real (batched gram) sweep."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from ptlab.report.cli import make_report
from ptlab.report.generic import cell_stats, heatmap_figure, line_figure, render_generic, sweep_keys
from ptlab.report.registry import renderer_for
from ptlab.report.runs import load_pipelines
from tests.conftest import REPO, SMALL

ALPHA, U_NORM = "params.transfer.alpha", "params.task.u_norm"


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> tuple[str, Path]:
    """18 pipelines: transfer.alpha in {0, 0.5, 1} x task.u_norm in {0.5, 2} x 3 seeds, one batched sweep."""
    root = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ptlab",
            "-m",
            "hydra/launcher=ptlab_gram",
            "hydra/sweeper=ptlab_batched",
            "transfer.alpha=0,0.5,1",
            "task.u_norm=0.5,2",
            "seed=0,1,2",
            *SMALL,
            f"logger.tracking_uri={uri}",
            "logger.experiment_name=any_sweep",
            f"cache.dir={root / 'cache'}",
            f"hydra.sweep.dir={root / 'multirun'}",
        ],
        cwd=root,
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return uri, root


def expected_gains(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """Per cell, by hand: n, the mean paired gain in points and its 95% t interval."""
    frame = runs.assign(gain=100 * (runs["metrics.transfer_test_acc"] - runs["metrics.scratch_test_acc"]))
    for key in keys:
        frame[key] = pd.to_numeric(frame[key])
    rows = []
    for _, group in frame.groupby(keys, sort=True):
        low, high = (
            stats.t.interval(0.95, len(group) - 1, loc=group["gain"].mean(), scale=stats.sem(group["gain"]))
            if group["gain"].std() > 0
            else (group["gain"].mean(),) * 2
        )
        rows.append({"n": len(group), "gain": group["gain"].mean(), "low": low, "high": high})
    return pd.DataFrame(rows)


def test_two_swept_keys_give_a_heatmap_of_the_gain_in_points(store, tmp_path):
    uri, _ = store
    paths = make_report("any_sweep", uri, tmp_path, log_to_mlflow=False)
    assert {p.name for p in paths} == {"any_sweep.md", "any_sweep.csv", "any_sweep.png", "any_sweep.pdf"}
    runs = load_pipelines(uri, "any_sweep")
    assert len(runs) == 18 and sweep_keys(runs) == [ALPHA, U_NORM]
    for column in ("tags.mlflow.user", "tags.mlflow.source.name", "tags.mlflow.source.git.commit"):
        assert runs[column].notna().all()  # the batched sweep's parents carry what its children carry
    want = expected_gains(runs, [ALPHA, U_NORM])
    table = pd.read_csv(tmp_path / "any_sweep.csv")
    assert list(table["n"]) == [3] * 6
    np.testing.assert_allclose(table["gain_points"], want["gain"], atol=1e-9)
    np.testing.assert_allclose(table["gain_points_ci_low"], want["low"], atol=1e-9)
    figure = heatmap_figure(runs, ALPHA, U_NORM, "any_sweep")
    grid = figure.axes[0].images[0].get_array()
    np.testing.assert_allclose(np.asarray(grid).ravel(), want["gain"], atol=1e-9)  # rows alpha, columns ||u||
    header = (tmp_path / "any_sweep.md").read_text().splitlines()[0]
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "transferred fraction alpha",
        "universal signal norm ‖u‖",
        "n seeds",
        "transfer (%)",
        "scratch (%)",
        "gain (points)",
        "95% interval",
        "verdict",
        "theory predicts",
        "phase model predicts",
    ]
    # The phase model's column is what its runs logged (one config's seeds share it).
    numeric = runs.astype({ALPHA: float, U_NORM: float})
    logged = numeric.groupby([ALPHA, U_NORM], sort=True)["params.prediction.outcome"].agg(lambda v: v.mode()[0])
    assert list(table["phase_prediction"]) == list(logged)
    body = (tmp_path / "any_sweep.md").read_text()
    assert "_target_" not in body and "params." not in body and "metrics." not in body
    first = (tmp_path / "any_sweep.md").read_text().splitlines()[2]
    assert f"| {want['gain'][0]:+.1f} " in first


def test_one_swept_key_gives_accuracies_and_the_gain_against_it_with_bands(store, tmp_path):
    uri, _ = store
    runs = load_pipelines(uri, "any_sweep")
    one = runs[pd.to_numeric(runs[U_NORM]) == 2.0].reset_index(drop=True)
    assert sweep_keys(one) == [ALPHA]
    paths = render_generic(one, "alpha_only", tmp_path)
    assert (tmp_path / "alpha_only.png").stat().st_size > 10_000 and len(paths) == 4
    table = cell_stats(one, [ALPHA])
    want = expected_gains(one, [ALPHA])
    figure = line_figure(table, ALPHA, "alpha_only")
    acc_ax, gain_ax = figure.axes[:2]
    np.testing.assert_allclose(gain_ax.lines[0].get_ydata(), want["gain"], atol=1e-9)
    np.testing.assert_allclose(gain_ax.lines[0].get_xdata(), [0.0, 0.5, 1.0])
    transfer = 100 * one.groupby(pd.to_numeric(one[ALPHA]))["metrics.transfer_test_acc"].mean()
    np.testing.assert_allclose(acc_ax.lines[0].get_ydata(), transfer.to_numpy(), atol=1e-9)
    assert gain_ax.get_ylabel() == "gain: transfer - scratch (points)"
    assert acc_ax.get_xlabel() == "transferred fraction alpha"
    assert len(gain_ax.collections) == 1 and len(acc_ax.collections) == 2  # the 95% bands


def test_sweep_keys_leave_out_target_paths_lockstep_keys_and_the_seed():
    runs = pd.DataFrame(
        {
            "params.seed": ["0", "1", "0", "1"],
            "params.model.name": ["a", "a", "b", "b"],
            "params.model.arch": ["x", "x", "y", "y"],
            "params.model._target_": ["m.A", "m.A", "m.B", "m.B"],
            "params.task.d": ["10"] * 4,
            "params.theory.predicted": ["helps", "helps", "hurts", "hurts"],
        }
    )
    assert sweep_keys(runs) == ["params.model.name"]


def test_experiments_named_for_a_preset_keep_their_figures():
    assert renderer_for("any_sweep").__name__ == "render_generic"
    assert renderer_for("default").__name__ == "render_generic"
    assert renderer_for("fig1a_small").__name__ == "render_fig1"
    assert renderer_for("table1_digits").__name__ == "render_table1"

"""Theory calibration: constants recovered from cells whose regimes follow known constants, the
checkerboard split, the agreement table, the written theory config, and the CLI."""

from __future__ import annotations

import itertools
from pathlib import Path

import pandas as pd
import pytest
import yaml
from tests.conftest import run_cli

from ptlab.report.calibrate import FIT, HELD_OUT, add_thresholds, calibrate, cell_table, constants_yaml
from ptlab.report.runs import one_run_per_seed, seed_stats
from ptlab.theory import scratch_threshold, target_signal_norm, threshold_term

BASE = {"params.task.n1": "200", "params.task.n2": "20", "params.task.v_norm": "2.0", "params.noise.sigma_p1": "1.0",
        "params.noise.sigma_p2": "1.0", "params.transfer.alpha": "0.5", "params.transfer.kind": "filters"}
TRUE_C, TRUE_C_PRIME = 3.0, 0.5
D_GRID = [250, 350, 500, 700, 1000, 1400, 2000, 2800, 4000, 5600, 8000]
U_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]


def accuracy(d: float, threshold: float, c: float) -> float:
    return 0.995 if d <= c * threshold else 0.75


def synthetic_runs(seeds: int = 4) -> pd.DataFrame:
    """A fig2-like grid whose transfer / scratch regimes follow C = 3 and C' = 0.5 exactly, with a seed
    jitter, so the paired verdicts are those the regimes imply."""
    rows = []
    for d, u, seed in itertools.product(D_GRID, U_GRID, range(seeds)):
        s2 = target_signal_norm(u, 2.0)
        transfer = accuracy(d, threshold_term(0.5, 200, 20, u, s2, 1.0, 1.0), TRUE_C)
        scratch = accuracy(d, scratch_threshold(20, s2, 1.0), TRUE_C_PRIME)
        jitter = 0.002 * (seed - 1.5)
        rows.append({**BASE, "params.task.d": str(d), "params.task.u_norm": str(u), "params.seed": str(seed),
                     "metrics.transfer_test_acc": transfer + jitter, "metrics.scratch_test_acc": scratch + jitter / 2})
    frame = pd.DataFrame(rows)
    frame["metrics.transfer_gain"] = frame["metrics.transfer_test_acc"] - frame["metrics.scratch_test_acc"]
    frame["start_time"] = range(len(frame))
    return frame


def test_cells_split_like_a_checkerboard_and_carry_their_verdicts() -> None:
    cells = cell_table(synthetic_runs(), "grid")
    assert len(cells) == 77 and set(cells["n_seeds"]) == {4}
    by_position = cells.set_index(["d", "u_norm"])["split"]
    assert by_position[(250, 0.0)] == FIT and by_position[(250, 0.5)] == HELD_OUT
    assert by_position[(350, 0.0)] == HELD_OUT and by_position[(350, 0.5)] == FIT
    assert (cells["split"] == FIT).sum() == 39
    assert set(cells["measured"]) <= {"transfer_helps", "no_difference", "negative_transfer"}


def test_calibration_recovers_the_constants_and_predicts_held_out_cells() -> None:
    result = calibrate(cell_table(synthetic_runs(), "grid"))
    c = result.constants
    for key, true in (("c1", TRUE_C), ("c3", TRUE_C), ("c1_prime", TRUE_C_PRIME), ("c3_prime", TRUE_C_PRIME)):
        fit = result.boundaries[key]
        assert fit.c_low <= true < fit.c_high and fit.agreeing == fit.cells
        assert getattr(c, key) == fit.c
    agreement = result.agreement().set_index("split")
    assert agreement.loc[HELD_OUT, "cells"] == 38
    assert agreement.loc[HELD_OUT, "agreement"] >= 0.9


def test_thresholds_match_the_theory_functions() -> None:
    cells = add_thresholds(cell_table(synthetic_runs(), "grid"))
    row = cells[(cells["d"] == 1000) & (cells["u_norm"] == 2.0)].iloc[0]
    assert row["threshold_term"] == pytest.approx((0.25 * 200**2 * 16 + 400 * 64) / (0.25 * 200 + 20))
    assert row["scratch_threshold"] == pytest.approx(20 * 64) and row["source_strength"] == pytest.approx(5.0)


def test_the_written_theory_config_composes_and_says_where_it_came_from(make_cfg, tmp_path: Path) -> None:
    result = calibrate(cell_table(synthetic_runs(), "grid"))
    text = constants_yaml(result, ["grid"])
    values = yaml.safe_load(text)
    assert values["c1"] == pytest.approx(result.constants.c1, rel=1e-5)
    assert "calibrate grid" in values["source"] and "held-out agreement grid" in values["source"]
    cfg = make_cfg(*(f"theory.{k}={values[k]}" for k in ("c1", "c3", "c1_prime", "c3_prime", "c4")))
    assert cfg.theory.c1 == pytest.approx(result.constants.c1, rel=1e-5)


def test_a_seed_repeated_under_another_config_hash_counts_once() -> None:
    runs = synthetic_runs(seeds=2)
    repeat = runs.iloc[[0]].assign(**{"metrics.transfer_test_acc": 0.1, "start_time": 10**6})
    both = pd.concat([runs, repeat], ignore_index=True)
    assert len(one_run_per_seed(both, ["params.task.d", "params.task.u_norm"])) == len(runs)
    table = seed_stats(both, ["params.task.d", "params.task.u_norm"], ["metrics.transfer_test_acc"])
    assert set(table["metrics.transfer_test_acc_count"]) == {2}
    first = table[(table["params.task.d"] == 250) & (table["params.task.u_norm"] == 0.0)].iloc[0]
    assert first["metrics.transfer_test_acc_mean"] == pytest.approx((0.1 + runs.iloc[1]["metrics.transfer_test_acc"]) / 2)


def test_calibrate_cli_fits_a_real_store(tmp_path: Path, tracking_uri: str) -> None:
    from ptlab.report.cli import main

    done = run_cli(["-m", "experiment=fig1c_small", "hydra/launcher=ptlab_gram", "hydra/sweeper=ptlab_batched",
                    "task.d=200", "model.width=4", "train.upstream_steps=20", "train.downstream_steps=10",
                    "task.n_test=100", "seed=0,1", "task.u_norm=0.0,2.0", f"logger.tracking_uri={tracking_uri}",
                    f"cache.dir={tmp_path / 'cache'}"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    store = tracking_uri
    out = tmp_path / "cal"
    assert main(["calibrate", "fig1c_small", "--tracking-uri", store, "--out", str(out),
                 "--write", str(tmp_path / "calibrated.yaml")]) == 0
    cells = pd.read_csv(out / "calibration_cells.csv")
    assert len(cells) == 2 and set(cells["n_seeds"]) == {2}
    assert yaml.safe_load((tmp_path / "calibrated.yaml").read_text())["c1"] > 0
    assert main(["calibrate", "no_such_experiment", "--tracking-uri", store]) == 2

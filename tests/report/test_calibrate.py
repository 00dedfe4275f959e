"""Random-design calibration: constants recovered from cells whose regimes follow known constants, the
Wilson interval and the scores against hand-computed values, the phase model fitted and written, and the
CLI on a real store of two random designs."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ptlab.phase import ALL_FEATURES, load
from ptlab.report.calibrate import (
    FIT,
    HELD_OUT,
    PHASE,
    PHASE_CANDIDATES,
    THEORY,
    Candidate,
    add_thresholds,
    calibrate,
    cell_table,
    choose_candidate,
    constants_yaml,
    fit_constants,
    noise_ceiling,
    replicate_verdicts,
    score,
    wilson_interval,
)
from ptlab.report.runs import one_run_per_seed, paired_ci, seed_stats, verdict
from ptlab.theory import scratch_threshold, target_signal_norm, threshold_term
from tests.conftest import run_cli

BASE = {
    "params.task.n1": "200",
    "params.task.n2": "20",
    "params.task.v_norm": "2.0",
    "params.noise.sigma_p1": "1.0",
    "params.noise.sigma_p2": "1.0",
    "params.transfer.alpha": "0.5",
    "params.transfer.kind": "filters",
}
TRUE_C, TRUE_C_PRIME = 3.0, 0.5
D_GRID = [250, 350, 500, 700, 1000, 1400, 2000, 2800, 4000, 5600, 8000]
U_GRID = [0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0]


def accuracy(d: float, threshold: float, c: float) -> float:
    return 0.995 if d <= c * threshold else 0.75


def synthetic_runs(seeds: int = 4, d_grid=D_GRID, u_grid=U_GRID) -> pd.DataFrame:
    """A grid whose transfer / scratch regimes follow C = 3 and C' = 0.5 exactly, with a seed jitter, so the
        paired verdicts are those the regimes imply (equal regimes: no detectable difference, but transfer
    0.2 points worse at ||u|| = 0)."""
    rows = []
    for d, u, seed in itertools.product(d_grid, u_grid, range(seeds)):
        s2 = target_signal_norm(u, 2.0)
        transfer = accuracy(d, threshold_term(0.5, 200, 20, u, s2, 1.0, 1.0), TRUE_C)
        scratch = accuracy(d, scratch_threshold(20, s2, 1.0), TRUE_C_PRIME)
        jitter = 0.0004 * (seed - 1.5)
        transfer -= 0.002 if u == 0 else 0.0  # negative transfer without a universal signal
        rows.append(
            {
                **BASE,
                "params.task.d": str(d),
                "params.task.u_norm": str(u),
                "params.seed": str(seed),
                "metrics.transfer_test_acc": transfer + jitter,
                "metrics.scratch_test_acc": scratch + jitter / 2,
            }
        )
    frame = pd.DataFrame(rows)
    frame["metrics.transfer_gain"] = frame["metrics.transfer_test_acc"] - frame["metrics.scratch_test_acc"]
    frame["start_time"] = range(len(frame))
    return frame


FEW = (Candidate("logistic", 1.0), Candidate("pairs", 0.1, ALL_FEATURES), Candidate("tree", 3))
"""A few candidates, one of each storable kind, so that the tests' cross-validation stays short."""


def two_designs() -> pd.DataFrame:
    fit = cell_table(synthetic_runs(), "fit", FIT)
    held = cell_table(synthetic_runs(d_grid=[300, 600, 1200, 2400, 4800], u_grid=[0.0, 0.5, 1.5, 2.5]), "held", HELD_OUT)
    return pd.concat([fit, held], ignore_index=True)


def test_cells_carry_their_split_and_verdicts() -> None:
    cells = two_designs()
    assert (cells["split"] == FIT).sum() == 77 and (cells["split"] == HELD_OUT).sum() == 20
    assert set(cells["n_seeds"]) == {4}
    assert set(cells["measured"]) == {"transfer_helps", "no_difference", "negative_transfer"}
    # Each cell keeps its per-seed paired gains (the noise ceiling resamples them), in seed_stats's order.
    assert all(len(g) == 4 and g.mean() == pytest.approx(m) for g, m in zip(cells["gains"], cells["gain"]))
    first = cells[(cells["d"] == 250) & (cells["u_norm"] == 0.0) & (cells["split"] == FIT)].iloc[0]["gains"]
    np.testing.assert_allclose(first, 0.995 - 0.002 - 0.75 + 0.0002 * (np.arange(4) - 1.5), atol=1e-12)  # scratch sub-optimal
    # d = 2000, u = 2: transfer near-optimal (2000 <= 3 * 2651), scratch sub-optimal (2000 > 0.5 * 1280).
    row = cells[(cells["d"] == 2000) & (cells["u_norm"] == 2.0)].iloc[0]
    assert row["measured"] == "transfer_helps" and row["gain"] == pytest.approx(0.245)
    assert set(cells.loc[cells["u_norm"] == 0.0, "measured"]) <= {"negative_transfer", "transfer_helps"}


def test_cell_order_does_not_depend_on_the_column_order_of_the_runs() -> None:
    runs = synthetic_runs()
    shuffled = runs[list(reversed(runs.columns))].sample(frac=1.0, random_state=1)
    a, b = cell_table(runs, "x"), cell_table(shuffled, "x")
    assert a[["d", "u_norm", "gain", "measured"]].equals(b[["d", "u_norm", "gain", "measured"]])
    assert list(a["d"]) == sorted(a["d"])


def test_calibration_recovers_the_constants() -> None:
    cells = add_thresholds(two_designs())
    constants, boundaries, _ = fit_constants(cells[cells["split"] == FIT])
    for key, true in (("c1", TRUE_C), ("c3", TRUE_C), ("c1_prime", TRUE_C_PRIME), ("c3_prime", TRUE_C_PRIME)):
        fit = boundaries[key]
        assert fit.c_low <= true < fit.c_high and fit.agreeing == fit.cells
        assert getattr(constants, key) == fit.c


@pytest.fixture(scope="module")
def calibrated():
    return calibrate(two_designs(), candidates=FEW)


def test_calibration_scores_every_predictor_on_the_held_out_cells(calibrated) -> None:
    result = calibrated
    held = result.scores[HELD_OUT]
    assert set(held) == {PHASE, THEORY, "always helps", "helps iff ||u|| > 0", "theory, unit constants"}
    cells = result.cells[result.cells["split"] == HELD_OUT]
    # Every cell where the fitted theory commits to a label carries the measured one (the regimes are exact).
    committed = cells[cells[THEORY] != "undetermined"]
    assert len(committed) > 0 and (committed[THEORY] == committed["measured"]).all()
    always = held["always helps"]
    assert always.agreeing == int((cells["measured"] == "transfer_helps").sum()) and always.cells == 20
    assert held[PHASE].agreement >= 0.8
    table = result.agreement()
    assert set(table["split"]) == {FIT, HELD_OUT} and (table["wilson_low"] <= table["agreement"]).all()


def test_wilson_interval_hand_values() -> None:
    # 8 of 10, z = 1.959964: centre 0.71674, half width 0.22658.
    low, high = wilson_interval(8, 10)
    assert (low, high) == (pytest.approx(0.49016, abs=1e-5), pytest.approx(0.94331, abs=1e-5))
    assert wilson_interval(0, 20)[0] == 0.0 and wilson_interval(0, 20)[1] == pytest.approx(0.16113, abs=1e-5)
    assert np.isnan(wilson_interval(0, 0)[0])


def test_score_counts_confusion_precision_and_recall() -> None:
    measured = ["negative_transfer", "negative_transfer", "transfer_helps", "no_difference"]
    predicted = ["negative_transfer", "transfer_helps", "negative_transfer", "undetermined"]
    result = score("x", measured, predicted)
    assert (result.agreeing, result.cells) == (1, 4)
    assert result.negative_precision == 0.5 and result.negative_recall == 0.5
    assert result.confusion.loc["no_difference", "undetermined"] == 1
    assert result.confusion.to_numpy().sum() == 4


def test_the_written_theory_config_composes_and_says_where_it_came_from(make_cfg, calibrated) -> None:
    result = calibrated
    text = constants_yaml(result, "python -m ptlab.report calibrate --fit fit --held-out held")
    values = yaml.safe_load(text)
    assert values["c1"] == pytest.approx(result.constants.c1, rel=1e-5)
    assert "--fit fit --held-out held" in values["source"] and "held-out agreement" in values["source"]
    cfg = make_cfg(*(f"theory.{k}={values[k]}" for k in ("c1", "c3", "c1_prime", "c3_prime", "c4", "c_ratio")))
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


def test_the_phase_model_is_the_best_storable_candidate_by_cross_validation(calibrated) -> None:
    assert set(calibrated.phase_cv) == {c.key for c in FEW}
    best = max(FEW, key=lambda c: calibrated.phase_cv[c.key])
    assert calibrated.phase.name.startswith(
        {"logistic": "logistic (C", "pairs": "logistic with pairwise", "tree": "tree"}[best.kind]
    )
    scores = {"forest:4/9": 0.99, "logistic:1/9": 0.8, "tree:3/9": 0.8, "pairs:0.1/13": 0.79}
    candidates = [Candidate("forest", 4), *FEW]
    assert choose_candidate(scores, candidates) == Candidate("logistic", 1.0)  # never a reference; ties: earlier
    assert choose_candidate({}, candidates) == Candidate("logistic", 1.0)
    assert len({c.key for c in PHASE_CANDIDATES}) == len(PHASE_CANDIDATES) == 28
    assert all(c.storable for c in PHASE_CANDIDATES) and not Candidate("boosting", 2).storable


def test_replicate_verdicts_follow_the_reports_paired_t_rule() -> None:
    gains = np.array([0.01, -0.004, 0.002, 0.006, 0.0, 0.003, -0.001, 0.008])
    for method in ("bootstrap", "normal"):
        verdicts = replicate_verdicts(gains, method, 50, np.random.default_rng(7))
        rng = np.random.default_rng(7)
        draws = (
            gains[rng.integers(0, 8, size=(50, 8))]
            if method == "bootstrap"
            else rng.normal(gains.mean(), gains.std(ddof=1), size=(50, 8))
        )
        expected = [{"better": 1, "worse": -1}.get(verdict(*paired_ci(pd.Series(row)), 8), 0) for row in draws]
        assert verdicts.tolist() == expected and len(set(expected)) > 1
    with pytest.raises(ValueError, match="method=exact"):
        replicate_verdicts(gains, "exact", 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="needs >= 2"):
        replicate_verdicts(gains[:1], "normal", 10, np.random.default_rng(0))


def test_noise_ceiling_is_one_for_huge_effects_and_the_t_coverage_for_none() -> None:
    rng = np.random.default_rng(3)
    huge = [rng.normal(sign * 0.2, 0.01, 16) for sign in (1, -1, 1, 1, -1)]
    for method in ("bootstrap", "normal"):
        result = noise_ceiling(huge, method, replicates=500)
        assert result.ceiling == 1.0 and (result.low, result.high) == (1.0, 1.0) and result.cells == 5
    # Zero mean gain: a normal replicate's t interval covers 0 with probability 0.95 exactly, so the
    # oracle's best guess ("no difference") agrees 95% of the time; the bootstrap's replicates have a
    # sd shrunk by sqrt(15/16) and coarser means, so a little less.
    zero = [np.concatenate([d, -d]) for d in (rng.normal(0, 0.01, 8) for _ in range(20))]
    normal = noise_ceiling(zero, "normal", replicates=4000)
    assert normal.ceiling == pytest.approx(0.95, abs=0.006) and normal.low < normal.ceiling < normal.high
    boot = noise_ceiling(zero, "bootstrap", replicates=4000)
    assert 0.88 < boot.ceiling < 0.95
    # Half huge, half zero: the mean of the cells' ceilings, reproducible from its seed.
    mixed = noise_ceiling([*huge[:4], *zero[:4]], "normal", replicates=4000, seed=5)
    assert mixed.ceiling == pytest.approx((4 + 4 * 0.95) / 8, abs=0.01)
    again = noise_ceiling([*huge[:4], *zero[:4]], "normal", replicates=4000, seed=5)
    assert np.array_equal(again.cell_ceilings, mixed.cell_ceilings) and (again.low, again.high) == (mixed.low, mixed.high)
    with pytest.raises(ValueError, match="no cells"):
        noise_ceiling([])


def test_the_plug_in_ceiling_is_biased_both_ways() -> None:
    """Cells drawn with no true effect: the oracle agrees 95% of the time, the plug-in ceiling (observed mean as
    the true one) says less; cells whose true t sits at the interval's critical value: the oracle agrees 51%
    (noncentral t), the plug-in says much more."""
    from scipy import stats

    rng = np.random.default_rng(7)
    critical = stats.t.ppf(0.975, 15)
    at_edge = stats.nct.sf(critical, 15, critical)
    oracle_edge = max(at_edge, 1 - at_edge - stats.nct.cdf(-critical, 15, critical))
    assert oracle_edge == pytest.approx(0.514, abs=0.001)
    zero = noise_ceiling([rng.normal(0, 1, 16) for _ in range(300)], "normal", 1000, resamples=10).ceiling
    edge = noise_ceiling([rng.normal(critical / 4, 1, 16) for _ in range(300)], "normal", 1000, resamples=10).ceiling
    assert zero < 0.95 - 0.05 and edge > oracle_edge + 0.15


TINY = ["model.width=4", "train.upstream_steps=20", "train.downstream_steps=10", "task.n_test=100"]


def run_fit_and_held_out_designs(tmp_path: Path, box: Path, fit_uri: str, held_uri: str) -> None:
    """Random designs 1 (experiment ``fit_design``, into ``fit_uri``) and 2 (``held_design``, into ``held_uri``) of
    ``box``, 4 cells x 3 seeds each, run through the CLI's calibration sweep at the ``TINY`` size."""
    from ptlab.report.cli import main

    for seed, name, uri in ((1, "fit_design", fit_uri), (2, "held_design", held_uri)):
        design = tmp_path / f"d{seed}.yaml"
        assert main(["design", "--seed", str(seed), "--cells", "4", "--seeds", "3", "--box", str(box), "--out", str(design)]) == 0
        done = run_cli(
            [
                "-m",
                "experiment=calibration",
                f"hydra.sweeper.cells={design}",
                *TINY,
                f"logger.tracking_uri={uri}",
                f"logger.experiment_name={name}",
                f"cache.dir={tmp_path / 'cache'}",
                f"hydra.sweep.dir={tmp_path / name}",
            ],
            tmp_path,
        )
        assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_calibrate_cli_fits_one_random_design_and_scores_another(tmp_path: Path, tracking_uri: str) -> None:
    from ptlab.report.cli import main

    box = tmp_path / "box.yaml"
    box.write_text(
        "box:\n  task.d: {low: 100, high: 400, scale: log, type: int}\n"
        "  task.u_norm: {low: 0.0, high: 3.0, p_low: 0.3}\n  task.n1: 40\n"
    )
    held_uri = f"sqlite:///{tmp_path / 'held.db'}"
    run_fit_and_held_out_designs(tmp_path, box, tracking_uri, held_uri)
    out, phase = tmp_path / "cal", tmp_path / "phase.yaml"
    assert (
        main(
            [
                "calibrate",
                "--fit",
                "fit_design",
                "--held-out",
                "held_design",
                "--min-seeds",
                "3",
                "--tracking-uri",
                tracking_uri,
                "--held-out-tracking-uri",
                held_uri,
                "--out",
                str(out),
                "--box",
                str(box),
                "--ceiling",
                "--write",
                str(tmp_path / "calibrated.yaml"),
                "--write-phase",
                str(phase),
            ]
        )
        == 0
    )
    text = (out / "calibration.txt").read_text()
    assert "noise ceiling, held-out cells (4), bootstrap" in text and "noise ceiling, fit cells (4), normal" in text
    cells = pd.read_csv(out / "calibration_cells.csv")
    assert len(cells) == 8 and set(cells["n_seeds"]) == {3}
    assert list(cells["split"]).count("held-out") == 4
    assert yaml.safe_load((tmp_path / "calibrated.yaml").read_text())["c1"] > 0
    model = load(phase)
    assert model.provenance["fit_cells"] == 4 and model.provenance["held_out"]["cells"] == 4
    assert model.provenance["box"]["task.n1"] == 40
    assert main(["calibrate", "--fit", "no_such_experiment", "--tracking-uri", tracking_uri]) == 2
    assert main(["calibrate", "--fit", "fit_design", "--held-out", "fit_design", "--tracking-uri", tracking_uri]) == 2
    # A design run again under another name shares its run seeds: it cannot be held out.
    done = run_cli(
        [
            "-m",
            "experiment=calibration",
            f"hydra.sweeper.cells={tmp_path / 'd1.yaml'}",
            *TINY,
            "transfer.alpha=0.3",
            f"logger.tracking_uri={tracking_uri}",
            "logger.experiment_name=again",
            f"cache.dir={tmp_path / 'cache'}",
            f"hydra.sweep.dir={tmp_path / 'again'}",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (
        main(
            [
                "calibrate",
                "--fit",
                "fit_design",
                "--held-out",
                "again",
                "--min-seeds",
                "3",
                "--tracking-uri",
                tracking_uri,
                "--out",
                str(out),
            ]
        )
        == 2
    )

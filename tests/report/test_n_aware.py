"""The n-aware phase model (ptlab.report.n_aware, ptlab.phase kind n_aware): its verdict probabilities against the
normal-cdf formula by hand, its regressions recovering known coefficients and tau on a synthetic table, the
logistic-derived variant reproducing its logistic at the calibration's seed count, and the round trip through its
file."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import norm, t

from ptlab.phase import N_AWARE_CLASSES, PhaseModel, expand_pairs, load, save, verdict_probabilities
from ptlab.report.calibrate import N_AWARE_CANDIDATES, Candidate, choose_candidate
from ptlab.report.n_aware import cross_validated, fit_params, log_sd_bias

HAND = PhaseModel(
    name="hand",
    kind="n_aware",
    features=("alpha",),
    classes=N_AWARE_CLASSES,
    params={
        "mean_from": "regression",
        "pairs": [],
        "mean": [0.5],
        "scale": [0.25],
        "mu": {"coef": [2.0], "intercept": -1.0},
        "log_sigma": {"coef": [0.0], "intercept": math.log(2.0)},
        "tau": 0.5,
        "seeds": 16,
        "calibration_seeds": 16,
        "t_crit": float(t.ppf(0.975, 15)),
    },
    gain={"interval": "normal"},
)


def hand_probabilities(mu: float, sigma: float, tau: float, n: int) -> list[float]:
    spread = math.sqrt(tau**2 + sigma**2 / n)
    half = t.ppf(0.975, n - 1) * sigma / math.sqrt(n)
    helps, negative = norm.cdf((mu - half) / spread), norm.cdf((-mu - half) / spread)
    return [negative, 1 - helps - negative, helps]


def test_verdict_probabilities_follow_the_normal_cdf_formula() -> None:
    # alpha = 0.75: standardised 1, mu = 2 - 1 = 1 point, sigma = 2, tau = 0.5. At 16 seeds the half width is
    # 2.131 * 2 / 4 = 1.066 and the sd of the mean sqrt(0.25 + 0.25) = 0.707: P(helps) = Phi(-0.093) = 0.4630.
    x = np.array([[0.75]])
    p = HAND.probabilities(x)[0]
    np.testing.assert_allclose(p, hand_probabilities(1.0, 2.0, 0.5, 16), atol=1e-9)
    assert p[2] == pytest.approx(0.4630, abs=1e-4) and p.sum() == pytest.approx(1.0)
    at_32 = HAND.with_seeds(32)
    np.testing.assert_allclose(at_32.probabilities(x)[0], hand_probabilities(1.0, 2.0, 0.5, 32), atol=1e-9)
    assert at_32.seeds == 32 and at_32.params["t_crit"] == pytest.approx(t.ppf(0.975, 31))
    assert HAND.predict_outcomes(np.array([[0.75], [0.5], [2.5]])) == ["no_difference", "no_difference", "transfer_helps"]
    row = HAND.predict({"alpha": 0.75})
    half = 1.959964 * math.sqrt(0.25 + 4 / 16)
    assert row["gain"] == pytest.approx(1.0) and row["gain_high"] == pytest.approx(1.0 + half, abs=1e-4)
    assert row["seeds"] == 16 and row["outcome"] == "no_difference"
    # No model error and no effect: the t interval's own coverage (Phi(2.131) - Phi(-2.131) = 0.967, the normal
    # approximation of the t's 0.95).
    assert verdict_probabilities([0.0], [1.0], 0.0, 16, 2.131)[0, 1] == pytest.approx(2 * norm.cdf(2.131) - 1)


def test_a_gain_model_in_the_file_reports_the_gain_and_the_verdict_stays_the_normal_models() -> None:
    """With a ridge gain part (what calibrate writes for every kind), the reported gain and its interval are the
    ridge's (alpha = 0.75: standardised 1, 0.5 + 3 = 3.5 +- 2 points); the verdict's probabilities do not change."""
    from dataclasses import replace

    ridge = {"mean": [0.5], "scale": [0.25], "coef": [3.0], "intercept": 0.5, "interval_half_width": 2.0}
    with_gain = replace(HAND, gain=ridge)
    row = with_gain.predict({"alpha": 0.75})
    assert (row["gain"], row["gain_low"], row["gain_high"]) == pytest.approx((3.5, 1.5, 5.5))
    assert row["outcome"] == HAND.predict({"alpha": 0.75})["outcome"] == "no_difference"
    np.testing.assert_array_equal(with_gain.probabilities(np.array([[0.75]])), HAND.probabilities(np.array([[0.75]])))


def test_bad_n_aware_models_are_refused() -> None:
    with pytest.raises(ValueError, match="lacking \\['tau'\\]"):
        PhaseModel("x", "n_aware", ("alpha",), N_AWARE_CLASSES, {k: v for k, v in HAND.params.items() if k != "tau"}, {})
    with pytest.raises(ValueError, match="seeds=1"):
        PhaseModel("x", "n_aware", ("alpha",), N_AWARE_CLASSES, {**HAND.params, "seeds": 1}, {})
    with pytest.raises(ValueError, match="only an n_aware model"):
        params = {"mean": [0], "scale": [1], "coef": [[0]], "intercept": [0]}
        PhaseModel("x", "logistic", ("alpha",), ("a",), params, {}).with_seeds(8)


def synthetic_table(cells: int = 400, n: int = 16, tau: float = 0.8, seed: int = 0):
    """Cells with two features, true mean gain ``1 + 2 x0 - x1`` points plus N(0, tau^2), sd ``exp(0.3 + 0.4 x1)``
    points; ``n`` gains a cell (stored as fractions, as the runs hold them)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(cells, 2))
    mean = 1 + 2 * x[:, 0] - x[:, 1] + rng.normal(0, tau, cells)
    sd = np.exp(0.3 + 0.4 * x[:, 1])
    gains = [rng.normal(m, s, n) / 100 for m, s in zip(mean, sd)]
    return x, gains


def raw_coefficients(params: dict, part: str) -> np.ndarray:
    """The intercept and the coefficients on the raw (unstandardised) expanded features."""
    coef = np.asarray(params[part]["coef"]) / np.asarray(params["scale"])
    return np.concatenate([[params[part]["intercept"] - coef @ np.asarray(params["mean"])], coef])


def test_the_regressions_recover_known_coefficients_and_tau() -> None:
    x, gains = synthetic_table()
    params = fit_params(x, gains, 1.0)
    assert params["pairs"] == [[0, 1]] and params["seeds"] == params["calibration_seeds"] == 16
    np.testing.assert_allclose(raw_coefficients(params, "mu"), [1.0, 2.0, -1.0, 0.0], atol=0.15)
    np.testing.assert_allclose(raw_coefficients(params, "log_sigma"), [0.3, 0.0, 0.4, 0.0], atol=0.06)
    assert params["tau"] == pytest.approx(0.8, abs=0.1)
    assert log_sd_bias(np.array([16]))[0] == pytest.approx(-0.0345, abs=5e-4)
    model = PhaseModel("fit", "n_aware", ("alpha", "log_n2"), N_AWARE_CLASSES, params, {})
    mu, sigma, tau = model.moments(x[:3])
    np.testing.assert_allclose(mu, raw_coefficients(params, "mu") @ np.c_[np.ones(3), expand_pairs(x[:3], [[0, 1]])].T)
    assert np.all(tau == params["tau"]) and np.all(sigma > 0)


def labelled(x: np.ndarray, gains: list[np.ndarray]) -> np.ndarray:
    """Each cell's paired 95% t verdict."""
    g = np.array(gains) * 100
    half = t.ppf(0.975, g.shape[1] - 1) * g.std(axis=1, ddof=1) / math.sqrt(g.shape[1])
    mean = g.mean(axis=1)
    return np.where(mean - half > 0, "transfer_helps", np.where(mean + half < 0, "negative_transfer", "no_difference"))


def test_the_logistic_variant_reproduces_its_logistic_at_the_calibration_seeds(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression

    x, gains = synthetic_table(cells=300, tau=0.3)
    x[:, 0] /= 3  # many cells near the boundary: all three verdicts
    labels = labelled(x, gains)
    params = fit_params(x, gains, 1.0, mean_from="logistic", labels=labels)
    model = PhaseModel("fit", "n_aware", ("alpha", "log_n2"), N_AWARE_CLASSES, params, {})
    z = (expand_pairs(x, params["pairs"]) - np.asarray(params["mean"])) / np.asarray(params["scale"])
    logistic = LogisticRegression(C=1.0, max_iter=20000).fit(z, labels).predict_proba(z)
    _, _, tau = model.moments(x)
    np.testing.assert_allclose(model.probabilities(x)[tau > 0], logistic[tau > 0], atol=1e-6)
    assert (tau > 0).mean() > 0.5
    path = tmp_path / "phase.yaml"
    save(model, path, "# n-aware\n")
    again = load(path)
    assert again == model and again.seeds == 16
    np.testing.assert_array_equal(again.with_seeds(32).probabilities(x), model.with_seeds(32).probabilities(x))


def test_cross_validation_and_the_choice_between_kinds() -> None:
    x, gains = synthetic_table(cells=150, tau=0.3)
    x[:, 0] /= 3
    labels = labelled(x, gains)
    found = cross_validated(x, labels, gains, [1.0], "logistic", repeats=1, seeds=(16, 32))[1.0]
    assert 0.5 < found["agreement"] <= 1 and set(found["expected"]) == {16, 32}
    assert found["oof_probabilities"].shape == (150, 3)
    aware, pairs = N_AWARE_CANDIDATES[-1], Candidate("pairs", 1.0)
    assert choose_candidate({aware.key: 0.875, pairs.key: 0.88}, [pairs, aware]) == aware  # within 1 point
    assert choose_candidate({aware.key: 0.865, pairs.key: 0.88}, [pairs, aware]) == pairs


def test_the_logistic_part_of_a_logistic_derived_model_gives_its_probabilities_at_the_calibration_seeds() -> None:
    x, gains = synthetic_table(cells=200, tau=0.3)
    x[:, 0] /= 3
    params = fit_params(x, gains, 1.0, mean_from="logistic", labels=labelled(x, gains))
    model = PhaseModel("fit", "n_aware", ("alpha", "log_n2"), N_AWARE_CLASSES, params, {})
    logistic = model.logistic_part()
    tau = model.moments(x)[2]
    assert logistic.kind == "logistic" and logistic.params["coef"] == params["logistic"]["coef"]
    np.testing.assert_allclose(logistic.probabilities(x)[tau > 0], model.probabilities(x)[tau > 0], atol=1e-9)
    with pytest.raises(ValueError, match="only a logistic-derived"):
        HAND.logistic_part()


def test_more_seeds_raise_the_ceiling_of_a_cell_near_the_boundary() -> None:
    from ptlab.report.calibrate import noise_ceiling, replicate_verdicts

    # One cell: 16 gains with mean 0.5 and sd 1 (points / 100). At 16 seeds its t statistic is 2.0 (a coin flip
    # around 2.13); at 64 it is 4.0, so nearly every replicate verdict says better.
    gains = np.random.default_rng(0).normal(size=16)
    gains = (gains - gains.mean()) / gains.std(ddof=1) + 0.5
    at_16 = noise_ceiling([gains], "normal", replicates=4000, resamples=10).ceiling
    at_64 = noise_ceiling([gains], "normal", replicates=4000, resamples=10, seeds=64).ceiling
    assert 0.5 <= at_16 < 0.7 and at_64 > 0.95
    assert replicate_verdicts(gains, "bootstrap", 5, np.random.default_rng(1), seeds=40).shape == (5,)
    with pytest.raises(ValueError, match="seeds=1"):
        replicate_verdicts(gains, "normal", 5, np.random.default_rng(1), seeds=1)

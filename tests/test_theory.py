"""ptlab.theory against hand-computed values (docs/design.md section 2), edge cases included."""

from __future__ import annotations

import math

import pytest

from ptlab.config import ConfigError, validate
from ptlab.spec import parse
from ptlab.theory import (
    NEAR_OPTIMAL,
    SUB_OPTIMAL,
    UNDETERMINED,
    Setting,
    TheoryConstants,
    condition_4_1_ratio,
    divide,
    gamma,
    negative_transfer_ratio,
    outcome_and_rule,
    predict,
    predict_from_spec,
    regime,
    scratch_threshold,
    source_strength,
    target_signal_norm,
    threshold_term,
)

# The quick experiment of docs/design.md: d=1000, N1=200, N2=20, sigma_p=1, v_norm=2, alpha=0.5.
BASE = dict(d=1000, n1=200, n2=20, v_norm=2.0, sigma_p1=1.0, sigma_p2=1.0, alpha=0.5)


def test_target_signal_norm_is_the_norm_of_orthogonal_sum() -> None:
    assert target_signal_norm(2.0, 2.0) == pytest.approx(math.sqrt(8.0))
    assert target_signal_norm(0.0, 2.0) == 2.0


@pytest.mark.parametrize(
    ("u", "s1", "s2", "expected"),
    [
        # (0 + 20^2 * 2^4) / (0.25 * 200 + 20) = 6400 / 70
        (0.0, 1.0, 1.0, 6400 / 70),
        # S2^4 = 64: (0.25 * 200^2 * 16 + 400 * 64) / 70 = 185600 / 70
        (2.0, 1.0, 1.0, 185600 / 70),
        # s1 = 2: (160000 / 16 + 25600) / (0.25 * 200 / 4 + 20) = 35600 / 32.5
        (2.0, 2.0, 1.0, 35600 / 32.5),
        # s2 = 2: (160000 + 25600 / 16) / (0.25 * 4 * 200 + 20) = 161600 / 220
        (2.0, 1.0, 2.0, 161600 / 220),
    ],
)
def test_threshold_term_hand_values(u: float, s1: float, s2: float, expected: float) -> None:
    s2_norm = target_signal_norm(u, 2.0)
    assert threshold_term(0.5, 200, 20, u, s2_norm, s1, s2) == pytest.approx(expected, rel=1e-12)


def test_alpha_zero_reduces_to_the_scratch_threshold() -> None:
    s2_norm = target_signal_norm(2.0, 2.0)
    assert scratch_threshold(20, s2_norm, 1.0) == pytest.approx(1280.0)
    assert threshold_term(0.0, 200, 20, 2.0, s2_norm, 1.0, 1.0) == pytest.approx(1280.0)
    # With nothing transferred the source noise level is irrelevant, even a zero one.
    assert threshold_term(0.0, 200, 20, 2.0, s2_norm, 0.0, 1.0) == pytest.approx(1280.0)


def test_zero_noise_levels_follow_their_limits() -> None:
    s2_norm = target_signal_norm(2.0, 2.0)
    assert threshold_term(0.5, 200, 20, 2.0, s2_norm, 0.0, 1.0) == math.inf
    assert threshold_term(0.5, 200, 20, 0.0, 2.0, 0.0, 1.0) == 0.0
    assert threshold_term(0.5, 200, 20, 2.0, s2_norm, 1.0, 0.0) == math.inf
    assert math.isnan(threshold_term(0.5, 200, 20, 0.0, 0.0, 1.0, 0.0))
    assert divide(0.0, 0.0) != divide(0.0, 0.0)
    assert divide(-1.0, 0.0) == -math.inf


def test_gamma_hand_values_and_edges() -> None:
    assert gamma(0.5, 200, 2.0, 1.0, 1.0, 1000) == pytest.approx(0.25 * 200 * 16 / 1000)
    assert gamma(0.5, 200, 2.0, 2.0, 0.5, 1000) == pytest.approx(0.25 * 200 * 16 / (4 * 0.25 * 1000))
    assert gamma(0.5, 200, 0.0, 1.0, 1.0, 1000) == 0.0
    assert gamma(0.0, 200, 2.0, 1.0, 1.0, 1000) == 0.0
    assert gamma(0.5, 200, 0.0, 0.0, 1.0, 1000) == 0.0
    assert gamma(0.5, 200, 2.0, 0.0, 1.0, 1000) == math.inf


def test_negative_transfer_ratio_hand_values_and_edges() -> None:
    s2_norm = target_signal_norm(2.0, 2.0)
    assert source_strength(0.5, 200, 20, 1.0, 1.0) == pytest.approx(5.0)
    # (8 / 4) / 5
    assert negative_transfer_ratio(0.5, 200, 20, 2.0, s2_norm, 1.0, 1.0) == pytest.approx(0.4)
    assert negative_transfer_ratio(0.5, 200, 20, 0.0, 2.0, 1.0, 1.0) == math.inf
    assert negative_transfer_ratio(0.0, 200, 20, 2.0, s2_norm, 1.0, 1.0) == math.inf


def test_regime_boundaries() -> None:
    assert regime(100, 100) == NEAR_OPTIMAL
    assert regime(101, 100) == SUB_OPTIMAL
    assert regime(150, 100, c_near=1.0, c_sub=2.0) == UNDETERMINED
    assert regime(200, 100, c_near=1.0, c_sub=2.0) == SUB_OPTIMAL
    assert regime(10, math.nan) == UNDETERMINED
    assert regime(10**9, math.inf) == NEAR_OPTIMAL


def test_predicted_outcomes() -> None:
    negative = predict(u_norm=0.0, **BASE)
    assert (negative.threshold_term, negative.scratch_threshold) == (pytest.approx(6400 / 70), pytest.approx(320.0))
    assert negative.negative_transfer_condition and negative.predicted == "negative_transfer"
    assert negative.gamma == 0.0 and negative.negative_transfer_ratio == math.inf and negative.n == 200

    # d=2000, ||u||=2: transfer near-optimal (2000 <= 2651.4), scratch sub-optimal (2000 > 1280).
    helps = predict(u_norm=2.0, **{**BASE, "d": 2000})
    assert (helps.transfer_regime, helps.scratch_regime, helps.predicted) == (NEAR_OPTIMAL, SUB_OPTIMAL, "transfer_helps")
    assert helps.d_over_threshold == pytest.approx(2000 / (185600 / 70))

    same = predict(u_norm=2.0, **BASE)
    assert same.predicted == "no_difference"
    # A wide band between the constants leaves the transfer regime open.
    wide = predict(u_norm=2.0, **{**BASE, "d": 2000}, constants=TheoryConstants(c1=0.5, c3=2.0))
    assert (wide.transfer_regime, wide.predicted) == (UNDETERMINED, "undetermined")
    # A large C4 switches the negative-transfer condition off; both models sub-optimal (1000 > 91.4 and
    # 1000 > 320): the theorems say nothing about which is worse.
    off = predict(u_norm=0.0, **BASE, constants=TheoryConstants(c4=10.0))
    assert not off.negative_transfer_condition and off.predicted == "undetermined" and off.rule == "none"
    # At u = 0 the chain's first ratio is inf: no c_ratio switches it off.
    assert predict(u_norm=0.0, **BASE, constants=TheoryConstants(c_ratio=1e9)).negative_transfer_condition
    # ||u|| = 1: S2^2 / U^2 = 5, strength 5, ratio 1: the chain holds at c_ratio = 1, not at 1.01.
    assert predict(u_norm=1.0, **BASE).negative_transfer_condition
    assert not predict(u_norm=1.0, **BASE, constants=TheoryConstants(c_ratio=1.01)).negative_transfer_condition
    # No signal and no noise at all: undefined, but no crash.
    empty = predict(u_norm=0.0, **{**BASE, "v_norm": 0.0, "sigma_p2": 0.0})
    assert math.isnan(empty.threshold_term) and empty.predicted == "undetermined"


def test_prediction_splits_into_metrics_and_labels() -> None:
    prediction = predict(u_norm=2.0, **BASE)
    assert set(prediction.labels()) == {"transfer_regime", "scratch_regime", "rule", "predicted"}
    assert prediction.metrics()["negative_transfer_condition"] == 0.0
    assert {"threshold_term", "gamma", "negative_transfer_ratio", "predicted"} <= set(prediction.as_dict())


def test_predict_from_spec_reads_task_noise_transfer_and_constants(make_cfg) -> None:
    cfg = parse(make_cfg("task.u_norm=2.0", "task.n1=200", "task.n2=20", "task.d=2000", "theory.c4=3.0"))
    prediction = predict_from_spec(cfg)
    assert prediction.threshold_term == pytest.approx(185600 / 70)
    no_transfer = predict_from_spec(parse(make_cfg("transfer=none", "task.u_norm=2.0", "task.n2=20")))
    assert no_transfer.threshold_term == pytest.approx(no_transfer.scratch_threshold)


def test_theory_constants_are_validated(make_cfg) -> None:
    with pytest.raises(ConfigError, match=r"^theory\.c1=-1\.0 is not allowed: must be > 0$"):
        validate(make_cfg("theory.c1=-1.0"))


def test_a_large_gamma_makes_transfer_help_while_scratch_is_not_near_optimal() -> None:
    # d=8000, ||u||=1: Gamma = 0.25 * 200 * 1 / 8000 = 0.00625; scratch threshold 500 << d, D* = 285.7 << d;
    # c4 = 10 keeps the negative-transfer condition (source strength 5) off.
    point = {**BASE, "d": 8000}

    def at(**constants: float):
        return predict(u_norm=1.0, **point, constants=TheoryConstants(**{"c4": 10.0, **constants}))

    plain = at()
    assert plain.gamma == pytest.approx(0.00625)
    assert (plain.transfer_regime, plain.scratch_regime, plain.predicted) == (SUB_OPTIMAL, SUB_OPTIMAL, "undetermined")
    # Theorem 4.2 calls transfer sub-optimal (8000 >= 285.7): the Gamma rule does not override it.
    assert at(c_gamma=0.006).predicted == "undetermined"
    # c3 = 30: transfer between the constants (285.7 < 8000 < 8571), so the Gamma rule decides.
    assert at(c_gamma=0.006, c3=30.0).transfer_regime == UNDETERMINED
    assert (at(c_gamma=0.006, c3=30.0).predicted, at(c_gamma=0.006, c3=30.0).rule) == ("transfer_helps", "gamma")
    assert at(c_gamma=0.007, c3=30.0).predicted == "undetermined"
    # Scratch near-optimal (c1' * 500 >= 8000), transfer sub-optimal: the theorems say transfer hurts.
    near = at(c_gamma=0.006, c1_prime=16.0, c3_prime=16.0)
    assert near.scratch_regime == NEAR_OPTIMAL and (near.predicted, near.rule) == ("negative_transfer", "regimes")
    # The negative-transfer condition (ratio 1 >= 1, strength 5 >= c4) wins over a large Gamma.
    negative = at(c_gamma=0.006, c4=1.0)
    assert negative.negative_transfer_condition and negative.predicted == "negative_transfer"


@pytest.mark.parametrize(
    ("transfer", "scratch", "chain", "big_gamma", "expected"),
    [
        (NEAR_OPTIMAL, SUB_OPTIMAL, False, False, ("transfer_helps", "regimes")),
        (SUB_OPTIMAL, NEAR_OPTIMAL, False, True, ("negative_transfer", "regimes")),
        (NEAR_OPTIMAL, NEAR_OPTIMAL, False, False, ("no_difference", "both_near_optimal")),
        (SUB_OPTIMAL, SUB_OPTIMAL, False, False, ("undetermined", "none")),
        (SUB_OPTIMAL, SUB_OPTIMAL, False, True, ("undetermined", "none")),
        (UNDETERMINED, SUB_OPTIMAL, False, True, ("transfer_helps", "gamma")),
        (UNDETERMINED, UNDETERMINED, False, True, ("transfer_helps", "gamma")),
        (UNDETERMINED, NEAR_OPTIMAL, False, True, ("undetermined", "none")),
        (NEAR_OPTIMAL, UNDETERMINED, False, False, ("undetermined", "none")),
        (NEAR_OPTIMAL, SUB_OPTIMAL, True, True, ("negative_transfer", "negative_transfer_chain")),
    ],
)
def test_outcome_rules(transfer: str, scratch: str, chain: bool, big_gamma: bool, expected: tuple) -> None:
    assert outcome_and_rule(transfer, scratch, chain, big_gamma) == expected


def test_condition_4_1_is_shown_beside_the_label() -> None:
    # n = 200: n^2 = 40000; n S2^2 / s^2 = 200 * 8 = 1600 -> ratio d / 40000.
    at_base = predict(u_norm=2.0, **BASE)
    assert at_base.condition_4_1_ratio == pytest.approx(1000 / 40000) and not at_base.condition_4_1
    assert predict(u_norm=2.0, **{**BASE, "d": 40000}).condition_4_1
    # s2 = 0.1: n S2^2 / s2^2 = 200 * 8 / 0.01 = 160000 > n^2.
    noisy = predict(u_norm=2.0, **{**BASE, "d": 80000, "sigma_p2": 0.1})
    assert noisy.condition_4_1_ratio == pytest.approx(0.5)
    assert condition_4_1_ratio(Setting(40000, 200, 20, 2.0, 2.0, 1.0, 1.0, 0.5)) == pytest.approx(1.0)


def test_the_prediction_rides_beside_the_theory_fields() -> None:
    from dataclasses import replace

    theory = replace(predict(u_norm=2.0, **BASE), prediction={"outcome": "transfer_helps"})
    assert "prediction" not in theory.as_dict() and "prediction" not in theory.metrics()
    assert theory.prediction == {"outcome": "transfer_helps"}

"""Fitting the ``n_aware`` phase model (``ptlab.phase``, docs/theory.md section 10) and cross-validating it.

A cell i has paired gains (transfer - scratch, points) with true mean ``m_i`` and sd ``sigma_i``; its calibration
verdict saw ``n_i`` of them, with sample mean ``y_i`` and sample sd ``s_i``. Two ridge regressions over the
features and their pairwise products (standardised):

- ``mu(x)`` of ``y_i``. Its out-of-fold residual is ``r_i = (m_i - mu(x_i)) + e_i`` with the sampling error
  ``e_i ~ N(0, sigma_i^2 / n_i)`` independent of the rest, so ``E r^2 = tau^2 + E sigma^2 / n`` where ``tau^2`` is
  the variance of the true mean around the regression. Since ``E s_i^2 = sigma_i^2``,
  ``tau^2 = max(0, mean(r_i^2) - mean(s_i^2 / n_i))``.
- ``log sigma(x)`` of ``log s_i - b(n_i)``, where ``b(n) = E log s - log sigma = (digamma((n-1)/2) -
  log((n-1)/2)) / 2`` for normal gains (-0.035 at n = 16), so that the target is unbiased for ``log sigma``;
  its ridge strength chosen by ``RidgeCV``.

For ``n`` new seeds the mean is ``N(mu(x), tau^2 + sigma(x)^2 / n)`` (``ptlab.phase.verdict_probabilities``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from ptlab.phase import N_AWARE_CLASSES, all_pairs, expand_pairs, n_aware_moments, t_quantile, verdict_probabilities
from ptlab.report.runs import CONFIDENCE

LOG_SIGMA_ALPHAS = (0.1, 1.0, 10.0, 100.0, 1000.0)
"""The ridge strengths ``RidgeCV`` chooses among for ``log sigma(x)``."""


def log_sd_bias(n: np.ndarray) -> np.ndarray:
    """``E log s - log sigma`` of the sample sd of ``n`` normal draws."""
    from scipy.special import digamma

    half = (np.asarray(n, float) - 1) / 2
    return (digamma(half) - np.log(half)) / 2


def cell_statistics(gains: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Each cell's mean gain and sample sd in points, and its number of seeds."""
    points = [np.asarray(g, float) * 100 for g in gains]
    if any(len(g) < 2 for g in points):
        raise ValueError("a cell with fewer than 2 gains: its sd is undefined")
    return (
        np.array([g.mean() for g in points]),
        np.array([g.std(ddof=1) for g in points]),
        np.array([len(g) for g in points]),
    )


SD_FLOOR = 0.1
"""Points: sample sds below it (cells whose gains are all equal, e.g. both models at 100% accuracy) count as this,
the sd of gains that differ by one test example in a thousand on about half the seeds."""


def fit_params(
    x: np.ndarray,
    gains: Sequence[np.ndarray],
    knob: float,
    seeds: int | None = None,
    mean_from: str = "regression",
    labels: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The ``params`` of an ``n_aware`` model fitted to the cells ``x`` (features) with their paired ``gains``
    (fractions, as stored): module docstring. ``knob``: the ridge strength of ``mu`` (``mean_from="regression"``)
    or the logistic's C (``"logistic"``, fitted to ``labels``, the measured outcomes). ``seeds``: the verdict's n it
    predicts for (default: the cells' most common n); ``tau`` from 5-fold out-of-fold residuals (shuffled, seed 0)."""
    from sklearn.linear_model import LogisticRegression, Ridge, RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict

    x = np.atleast_2d(np.asarray(x, float))
    pairs = all_pairs(x.shape[1])
    expanded = expand_pairs(x, pairs)
    mean, scale = expanded.mean(axis=0), expanded.std(axis=0)
    scale[scale == 0] = 1.0
    z = (expanded - mean) / scale
    y, s, n = cell_statistics(gains)
    own = int(np.bincount(n).argmax())
    seeds = int(seeds) if seeds is not None else own
    log_sigma = RidgeCV(alphas=LOG_SIGMA_ALPHAS).fit(z, np.log(np.maximum(s, SD_FLOOR)) - log_sd_bias(n))
    params: dict[str, Any] = {
        "mean_from": mean_from,
        "pairs": pairs,
        "mean": mean.tolist(),
        "scale": scale.tolist(),
        "log_sigma": {
            "coef": np.round(log_sigma.coef_, 8).tolist(),
            "intercept": float(log_sigma.intercept_),
            "ridge": float(log_sigma.alpha_),
        },
    }
    folds = KFold(min(5, len(y)), shuffle=True, random_state=0)
    if mean_from == "regression":
        residuals = y - cross_val_predict(Ridge(alpha=knob), z, y, cv=folds)
        sampling = float(np.mean(s**2 / n))
        mu = Ridge(alpha=knob).fit(z, y)
        params.update(
            ridge=float(knob),
            mu={"coef": np.round(mu.coef_, 8).tolist(), "intercept": float(mu.intercept_)},
            tau=math.sqrt(max(0.0, float(np.mean(residuals**2)) - sampling)),
            cv_rmse=float(np.sqrt(np.mean(residuals**2))),
            mean_sampling_variance=sampling,
        )
    elif mean_from == "logistic":
        if labels is None:
            raise ValueError("mean_from=logistic: needs the cells' measured outcomes (labels)")
        logistic = LogisticRegression(C=knob, max_iter=20000).fit(z, np.asarray(labels, dtype=object).astype(str))
        if tuple(logistic.classes_) != N_AWARE_CLASSES:
            raise ValueError(f"measured outcomes {list(logistic.classes_)}: need all of {list(N_AWARE_CLASSES)}")
        params.update(
            C=float(knob),
            logistic={"coef": np.round(logistic.coef_, 8).tolist(), "intercept": np.round(logistic.intercept_, 8).tolist()},
            calibration_t_crit=t_quantile(own, CONFIDENCE),
        )
    else:
        raise ValueError(f"mean_from={mean_from}: regression or logistic")
    params.update(calibration_seeds=own, seeds=seeds, confidence=CONFIDENCE, t_crit=t_quantile(seeds, CONFIDENCE))
    return params


def probabilities_at(params: dict[str, Any], x: np.ndarray, seeds: int) -> np.ndarray:
    """The verdict probabilities (``N_AWARE_CLASSES`` order) of ``params`` for ``seeds`` seeds."""
    mu, sigma, tau = n_aware_moments(params, x)
    return verdict_probabilities(mu, sigma, tau, seeds, t_quantile(seeds, CONFIDENCE))


def cross_validated(
    x: np.ndarray,
    labels: np.ndarray,
    gains: Sequence[np.ndarray],
    knobs: Sequence[float],
    mean_from: str = "regression",
    repeats: int = 5,
    folds: int = 5,
    seeds: Sequence[int] = (16,),
) -> dict[float, dict[str, Any]]:
    """Per knob (``fit_params``): the mean agreement with ``labels`` over ``repeats`` stratified ``folds``-fold splits
    (seeds 0, 1, ...: the splits of ``ptlab.report.calibrate.cross_validated``), predicting for the cells' own
    seed count, and, from the same out-of-fold fits, the expected agreement at each of ``seeds`` (the mean over
    cells and repeats of the largest verdict probability) and the out-of-fold probabilities at the cells' own n
    of the first repeat."""
    from sklearn.model_selection import StratifiedKFold

    x = np.atleast_2d(np.asarray(x, float))
    labels = np.asarray(labels, dtype=object).astype(str)
    gains = list(gains)
    own = int(np.bincount(cell_statistics(gains)[2]).argmax())
    names = np.asarray(N_AWARE_CLASSES, dtype=object)
    out: dict[float, dict[str, Any]] = {}
    for knob in knobs:
        agreement, expected, oof = [], {n: [] for n in seeds}, None
        for repeat in range(repeats):
            right, probs = 0, np.zeros((len(labels), 3))
            split = StratifiedKFold(n_splits=folds, shuffle=True, random_state=repeat).split(x, labels)
            for train, test in split:
                params = fit_params(x[train], [gains[i] for i in train], knob, mean_from=mean_from, labels=labels[train])
                probs[test] = probabilities_at(params, x[test], own)
                right += int((names[probs[test].argmax(axis=1)] == labels[test]).sum())
                for n in seeds:
                    expected[n].append(probabilities_at(params, x[test], n).max(axis=1))
            agreement.append(right / len(labels))
            oof = probs if oof is None else oof
        out[float(knob)] = {
            "agreement": float(np.mean(agreement)),
            "expected": {n: float(np.mean(np.concatenate(v))) for n, v in expected.items()},
            "oof_probabilities": oof,
        }
    return out

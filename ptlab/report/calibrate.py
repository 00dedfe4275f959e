"""Fitting the theory's constants and the phase model on one random design, scoring both on another.

``python -m ptlab.report calibrate --fit EXP... --held-out EXP...`` (docs/theory.md):

1. Cells. Each experiment's finished pipelines are grouped by their whole config minus the seed
   (``seed_stats``); a cell's measured outcome is its paired verdict as every report computes it
   (transfer - scratch on the same seed, 95% t interval, no minimum effect): better / no detectable
   difference / worse. Cells with fewer than ``min_seeds`` seeds (an interrupted sweep) are left out.
2. Split by experiment: the ``--fit`` experiments (one random design) fit, the ``--held-out`` ones (a
   design drawn with another seed, ``ptlab.design``) only score. No cell of a preset grid is held out.
3. Fit, on the fit cells only: ``c1``, ``c3`` of Theorem 4.2 so that "transfer error within 0.01 of the
   Bayes error" agrees best with ``d <= c1 D*`` and "transfer error >= 0.1" with ``d >= c3 D*``; ``c1'``,
   ``c3'`` of Theorem 4.3 the same way from the scratch accuracies; then Proposition 4.4's ``c_gamma``,
   ``c4`` and ``c_ratio`` so that the predicted outcome agrees best with the verdicts. And the phase
   model (``ptlab.phase``): the storable candidate of ``PHASE_CANDIDATES`` (multinomial logistic
   regression, with or without pairwise products, or a shallow tree, over 9 or 13 features) with the
   best agreement in 5 times repeated stratified 5-fold cross-validation on the fit cells, plus a linear
   model of the gain. A random forest and gradient boosting can be cross-validated beside them as
   references only (``REFERENCE_CANDIDATES``); with ``--n-aware`` the ``n_aware`` models
   (``ptlab.report.n_aware``, ``N_AWARE_CANDIDATES``), which predict the verdict of any seed count, too.
4. Score every predictor on the held-out cells: agreement with a Wilson 95% interval, the confusion
   matrix, negative-transfer precision and recall; predictors: the phase model, the theory with the
   fitted constants and with unit constants, and the baselines "always helps" and "helps iff ||u|| > 0,
   else negative transfer".
5. The noise ceiling (``noise_ceiling``): how often an oracle that knew each cell's mean gain could agree
   with a verdict of the cell's own seed count (or another, ``seeds``), from replicate verdicts of every
   cell's own paired gains.
"""

from __future__ import annotations

import datetime as dt
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ptlab.phase import (
    ALL_FEATURES,
    CONFIDENCE_EDGES,
    FEATURES,
    PhaseModel,
    all_pairs,
    confidence_band,
    confidence_band_label,
    expand_pairs,
    feature_matrix,
)
from ptlab.report.runs import (
    CONFIDENCE,
    GAIN,
    ReportError,
    experiment_stores,
    load_pipelines,
    one_run_per_seed,
    seed_stats,
)
from ptlab.report.synthetic import (
    NEAR_OPTIMAL_ACCURACY,
    SCRATCH,
    TRANSFER,
    BoundaryFit,
    fit_boundary,
)
from ptlab.theory import (
    NEGATIVE_TRANSFER,
    NO_DIFFERENCE,
    TRANSFER_HELPS,
    UNDETERMINED,
    Setting,
    TheoryConstants,
    gamma,
    negative_transfer_ratio,
    phase_features,
    predict,
    scratch_threshold,
    source_strength,
    target_signal_norm,
    threshold_term,
)

OUTCOME_OF_VERDICT = {"better": TRANSFER_HELPS, "no detectable difference": NO_DIFFERENCE, "worse": NEGATIVE_TRANSFER}
"""The theory's outcome label that a paired verdict measures."""
CLASSES = (TRANSFER_HELPS, NO_DIFFERENCE, NEGATIVE_TRANSFER)
PREDICTED_LABELS = (*CLASSES, UNDETERMINED)

INPUTS = {
    "d": "params.task.d",
    "n1": "params.task.n1",
    "n2": "params.task.n2",
    "u_norm": "params.task.u_norm",
    "v_norm": "params.task.v_norm",
    "sigma_p1": "params.noise.sigma_p1",
    "sigma_p2": "params.noise.sigma_p2",
    "alpha": "params.transfer.alpha",
    "label_noise": "params.task.label_noise",
}
"""The theory's inputs and the params that hold them."""

FIT, HELD_OUT = "fit", "held-out"
NEAR_OPTIMAL_MARGIN = 0.01
"""Near Bayes-optimal: a test error at most this much above the Bayes error (the label noise)."""
MIN_SEEDS = 16


@dataclass(frozen=True)
class Candidate:
    """A phase model to cross-validate: ``kind`` (logistic, pairs = logistic over the features and their
    pairwise products, tree, and the references forest and boosting), its knob (C or depth) and features."""

    kind: str
    knob: float
    features: tuple[str, ...] = FEATURES

    @property
    def storable(self) -> bool:
        """Whether ``ptlab.phase.PhaseModel`` can hold it (the ensembles are references only)."""
        return self.kind in ("logistic", "pairs", "tree", *N_AWARE_KINDS)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.knob:g}/{len(self.features)}"


PHASE_CANDIDATES = tuple(
    Candidate(kind, knob, names)
    for names in (FEATURES, ALL_FEATURES)
    for kind, knobs in (
        ("logistic", (0.1, 1.0, 10.0, 100.0)),
        ("pairs", (0.01, 0.03, 0.1, 0.3, 1.0, 10.0)),
        ("tree", (2, 3, 4, 5)),
    )
    for knob in knobs
)
"""The phase models compared by cross-validation on the fit cells (docs/theory.md sections 7 and 9: the pairwise
logistic at C 0.03 and 0.3 added for the fourth round); ties go to the earlier (simpler) candidate."""
REFERENCE_CANDIDATES = tuple(
    Candidate(kind, knob, names) for names in (FEATURES, ALL_FEATURES) for kind, knob in (("forest", 4), ("boosting", 2))
)
"""Ensembles cross-validated beside them as references (``calibrate --references``), never chosen."""
CV_FOLDS, CV_REPEATS = 5, 5
N_AWARE_KINDS = {"n_aware": "regression", "n_aware_logistic": "logistic"}
"""The ``n_aware`` phase models (``ptlab.report.n_aware``) and where their mean gain comes from."""
N_AWARE_CANDIDATES = (
    *(Candidate("n_aware", ridge) for ridge in (1.0, 10.0, 100.0)),
    *(Candidate("n_aware_logistic", c) for c in (0.1, 1.0, 10.0)),
)
"""The ``n_aware`` candidates (``calibrate --n-aware``; docs/theory.md section 10): ridge strength of ``mu(x)``, or C
of the pairwise logistic whose probabilities give ``mu(x)`` and ``tau(x)``; over the 9 ``FEATURES``."""
N_AWARE_MARGIN = 0.01
"""An ``n_aware`` candidate is chosen when its CV agreement is at most this far below the best other one (it
predicts the verdict of any seed count, the others only that of the calibration's)."""
EXPECTED_SEEDS = (16, 32, 48)


def wilson_interval(agreeing: int, cells: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a proportion ``agreeing / cells`` (nan for no cells)."""
    from scipy.stats import norm

    if cells <= 0:
        return math.nan, math.nan
    z = float(norm.ppf(0.5 + confidence / 2))
    p = agreeing / cells
    centre = (p + z * z / (2 * cells)) / (1 + z * z / cells)
    half = z / (1 + z * z / cells) * math.sqrt(p * (1 - p) / cells + z * z / (4 * cells * cells))
    return max(0.0, centre - half), min(1.0, centre + half)


def cell_table(runs: pd.DataFrame, experiment: str, split: str = FIT) -> pd.DataFrame:
    """One row per cell (config minus seed) of a synthetic experiment: the theory's inputs, the seed
    statistics, the per-seed gains, the measured outcome and the ``split`` the experiment belongs to; rows sorted
    by the inputs."""
    runs = runs if INPUTS["label_noise"] in runs.columns else runs.assign(**{INPUTS["label_noise"]: "0.0"})
    missing = [c for c in [*INPUTS.values(), TRANSFER, SCRATCH, GAIN] if c not in runs.columns]
    if missing:
        raise ReportError(f"experiment {experiment!r} lacks {', '.join(missing)}: calibration needs synthetic transfer pipelines")
    table = seed_stats(runs, [], [TRANSFER, SCRATCH, GAIN])
    swept = list(table.attrs["config_columns"])
    for name, column in INPUTS.items():
        values = table[column] if column in table.columns else runs[column].iloc[0]
        table[name] = pd.to_numeric(values) if column in table.columns else float(values)
    if "params.transfer.kind" in runs.columns and (runs["params.transfer.kind"] == "none").all():
        table["alpha"] = 0.0
    table["experiment"] = experiment
    table["measured"] = table["verdict"].map(OUTCOME_OF_VERDICT)
    table["split"] = split
    table["transfer_acc"] = table[f"{TRANSFER}_mean"]
    table["scratch_acc"] = table[f"{SCRATCH}_mean"]
    table["n_seeds"] = table[f"{GAIN}_count"].astype(int)
    table["gain"] = table[f"{GAIN}_mean"]
    table["gain_ci_low"], table["gain_ci_high"] = table[f"{GAIN}_ci_low"], table[f"{GAIN}_ci_high"]
    table["cell"] = (
        table[swept].apply(lambda row: " ".join(f"{c.rsplit('.', 1)[-1]}={v}" for c, v in row.items()), axis=1) if swept else ""
    )
    table["gains"] = _cell_gains(runs, swept)
    if not np.allclose([g.mean() for g in table["gains"]], table["gain"].to_numpy(float), equal_nan=True):
        raise ReportError(f"experiment {experiment!r}: the per-seed gains do not match the cells' means")
    keep = [
        "experiment",
        "cell",
        "split",
        *INPUTS,
        "n_seeds",
        "transfer_acc",
        "scratch_acc",
        "gain",
        "gain_ci_low",
        "gain_ci_high",
        "verdict",
        "measured",
        "gains",
    ]
    # Rows sorted by the theory's inputs: the cross-validation folds then do not depend on the column order
    # in which MLflow returned the params.
    return table[keep].sort_values([*INPUTS, "cell"], kind="stable").reset_index(drop=True)


def _cell_gains(runs: pd.DataFrame, swept: list[str]) -> list[np.ndarray]:
    """Each cell's paired gains, one per seed, in ``seed_stats``'s row order (the same grouping)."""
    frame = one_run_per_seed(runs, swept)[[*swept, GAIN]].copy()
    if not swept:
        return [frame[GAIN].dropna().to_numpy(float)]
    for column in swept:
        try:
            frame[column] = pd.to_numeric(frame[column])
        except (TypeError, ValueError):
            pass
    return [group[GAIN].dropna().to_numpy(float) for _, group in frame.groupby(swept, sort=True, dropna=False)]


def features_of(cells: pd.DataFrame, names: Sequence[str] = FEATURES) -> np.ndarray:
    """The phase model's feature matrix of the cells."""
    return feature_matrix([phase_features(s) for s in settings_of(cells)], names)


def settings_of(cells: pd.DataFrame) -> list[Setting]:
    return [
        Setting(
            int(r.d), int(r.n1), int(r.n2), float(r.u_norm), float(r.v_norm), float(r.sigma_p1), float(r.sigma_p2), float(r.alpha)
        )
        for r in cells.itertuples()
    ]


def add_thresholds(cells: pd.DataFrame) -> pd.DataFrame:
    """``D*`` (Theorem 4.2), the scratch threshold (Theorem 4.3), Gamma, the source strength and the
    negative-transfer ratio per cell."""
    cells = cells.copy()
    rows = list(
        zip(
            cells["d"],
            cells["n1"],
            cells["n2"],
            cells["u_norm"],
            cells["v_norm"],
            cells["sigma_p1"],
            cells["sigma_p2"],
            cells["alpha"],
        )
    )
    s2 = [target_signal_norm(u, v) for _, _, _, u, v, *_ in rows]
    cells["threshold_term"] = [
        threshold_term(a, int(n1), int(n2), u, s, p1, p2) for (_, n1, n2, u, _, p1, p2, a), s in zip(rows, s2)
    ]
    cells["scratch_threshold"] = [scratch_threshold(int(n2), s, p2) for (_, _, n2, _, _, _, p2, _), s in zip(rows, s2)]
    cells["gamma"] = [gamma(a, int(n1), u, p1, p2, int(d)) for d, n1, _, u, _, p1, p2, a in rows]
    cells["source_strength"] = [source_strength(a, int(n1), int(n2), p1, p2) for _, n1, n2, _, _, p1, p2, a in rows]
    cells["negative_transfer_ratio"] = [
        negative_transfer_ratio(a, int(n1), int(n2), u, s, p1, p2) for (_, n1, n2, u, _, p1, p2, a), s in zip(rows, s2)
    ]
    return cells


def predicted_outcomes(cells: pd.DataFrame, constants: TheoryConstants) -> list[str]:
    """The theory's predicted outcome of every cell under ``constants``."""
    return [
        predict(int(r.d), int(r.n1), int(r.n2), r.u_norm, r.v_norm, r.sigma_p1, r.sigma_p2, r.alpha, constants).predicted
        for r in cells.itertuples()
    ]


def _agreement(cells: pd.DataFrame, constants: TheoryConstants) -> int:
    measured = cells["measured"].to_numpy()
    return int((np.array(predicted_outcomes(cells, constants), dtype=object) == measured).sum())


def fit_constant(cells: pd.DataFrame, base: TheoryConstants, key: str, values: pd.Series) -> tuple[float, int]:
    """The value of constant ``key`` whose predicted outcomes agree best with the measured ones. The
    prediction only changes where the constant crosses one of the cells' ``values`` (Gamma for
    ``c_gamma``, the source strength for ``c4``, the negative-transfer ratio for ``c_ratio``), so one
    candidate per interval between them is tried (ties go to the largest: the theory's "large constant")."""
    finite = np.unique(values[np.isfinite(values) & (values > 0)])
    candidates = [*(finite[:1] / 2), *np.sqrt(finite[:-1] * finite[1:]), *(finite[-1:] * 2)]
    if not candidates:
        return getattr(base, key), _agreement(cells, base)
    scores = [_agreement(cells, replace(base, **{key: float(c)})) for c in candidates]
    best = max(range(len(candidates)), key=lambda i: (scores[i], candidates[i]))
    return float(candidates[best]), scores[best]


def _regime_fits(cells: pd.DataFrame, threshold: str, accuracy: str) -> tuple[BoundaryFit, BoundaryFit]:
    """The near-optimal boundary (``d <= c1 * threshold`` where the error is within ``NEAR_OPTIMAL_MARGIN``
    of the Bayes error, the label noise) and the sub-optimal one (``d >= c3 * threshold`` where the error
    is >= 0.1, i.e. accuracy < 0.9)."""
    d, ratio_to = cells["d"].to_numpy(float), cells[threshold].to_numpy(float)
    near = fit_boundary(d, ratio_to, (cells[accuracy] + cells["label_noise"]).to_numpy(float), 1.0 - NEAR_OPTIMAL_MARGIN)
    sub = fit_boundary(d, ratio_to, cells[accuracy].to_numpy(float), NEAR_OPTIMAL_ACCURACY)
    return near, sub


def fit_constants(fit: pd.DataFrame) -> tuple[TheoryConstants, dict[str, BoundaryFit], int]:
    """The theory's constants fitted to the ``fit`` cells (module docstring, step 3), the regime boundary
    fits, and how many fit cells the fitted outcome rule agrees with."""
    transfer_near, transfer_sub = _regime_fits(fit, "threshold_term", "transfer_acc")
    scratch_cells = fit.drop_duplicates(["d", "scratch_threshold", "scratch_acc"])
    scratch_near, scratch_sub = _regime_fits(scratch_cells, "scratch_threshold", "scratch_acc")
    base = TheoryConstants(
        c1=transfer_near.c,
        c3=max(transfer_sub.c, transfer_near.c),
        c1_prime=scratch_near.c,
        c3_prime=max(scratch_sub.c, scratch_near.c),
    )
    c_gamma, _ = fit_constant(fit, replace(base, c4=math.inf), "c_gamma", fit["gamma"])
    constants = replace(base, c_gamma=c_gamma)
    agreeing = _agreement(fit, constants)
    for _ in range(2):  # the chain's two constants, each given the other
        c4, agreeing = fit_constant(fit, constants, "c4", fit["source_strength"])
        constants = replace(constants, c4=c4)
        c_ratio, agreeing = fit_constant(fit, constants, "c_ratio", fit["negative_transfer_ratio"])
        constants = replace(constants, c_ratio=c_ratio)
    boundaries = {"c1": transfer_near, "c3": transfer_sub, "c1_prime": scratch_near, "c3_prime": scratch_sub}
    return constants, boundaries, agreeing


# ---- the phase model ---------------------------------------------------------------------------------


def _phase_estimator(candidate: Candidate):
    from sklearn.ensemble import GradientBoostingClassifier, RandomForestClassifier
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import FunctionTransformer, StandardScaler
    from sklearn.tree import DecisionTreeClassifier

    kind, knob = candidate.kind, candidate.knob
    if kind == "logistic":
        return make_pipeline(StandardScaler(), LogisticRegression(C=knob, max_iter=5000))
    if kind == "pairs":
        pairs = all_pairs(len(candidate.features))
        return make_pipeline(
            FunctionTransformer(expand_pairs, kw_args={"pairs": pairs}),
            StandardScaler(),
            LogisticRegression(C=knob, max_iter=20000),
        )
    if kind == "tree":
        return DecisionTreeClassifier(max_depth=int(knob), min_samples_leaf=3, random_state=0)
    if kind == "forest":
        return RandomForestClassifier(n_estimators=300, max_depth=int(knob), min_samples_leaf=3, random_state=0)
    if kind == "boosting":
        return GradientBoostingClassifier(max_depth=int(knob), n_estimators=100, random_state=0)
    raise ValueError(f"phase candidate kind={kind}: one of logistic, pairs, tree, forest, boosting")


def _columns(candidate: Candidate) -> list[int]:
    return [ALL_FEATURES.index(name) for name in candidate.features]


def cross_validated(
    x: np.ndarray,
    labels: np.ndarray,
    candidates: Sequence[Candidate] = PHASE_CANDIDATES,
    repeats: int = CV_REPEATS,
    gains: Sequence[np.ndarray] | None = None,
    expected: dict[str, dict[int, float]] | None = None,
    expected_seeds: Sequence[int] = EXPECTED_SEEDS,
) -> dict[str, float]:
    """Cross-validated agreement of each candidate on the fit cells (``x``: the ``ALL_FEATURES`` columns):
    the mean over ``repeats`` stratified 5-fold splits (seeds 0, 1, ...; fewer folds when a class has fewer
    cells), the same splits for every candidate; empty when there are too few cells or classes. The ``n_aware``
    candidates need the cells' paired ``gains``; their expected agreement at each of ``expected_seeds`` (the mean of
    their out-of-fold largest verdict probability, ``ptlab.report.n_aware.cross_validated``) goes into
    ``expected``."""
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    from ptlab.report import n_aware

    counts = pd.Series(labels).value_counts()
    if len(counts) < 2 or counts.min() < 2:
        return {}
    folds = int(min(CV_FOLDS, counts.min()))
    splits = [StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed) for seed in range(repeats)]
    scores = {}
    for c in candidates:
        if c.kind in N_AWARE_KINDS:
            if gains is None:
                raise ValueError(f"candidate {c.key}: the n_aware models need the cells' paired gains")
            found = n_aware.cross_validated(
                x[:, _columns(c)], labels, gains, [c.knob], N_AWARE_KINDS[c.kind], repeats, folds, expected_seeds
            )[float(c.knob)]
            scores[c.key] = found["agreement"]
            if expected is not None:
                expected[c.key] = found["expected"]
            continue
        scores[c.key] = float(
            np.mean([cross_val_score(_phase_estimator(c), x[:, _columns(c)], labels, cv=split).mean() for split in splits])
        )
    return scores


def choose_candidate(scores: dict[str, float], candidates: Sequence[Candidate] = PHASE_CANDIDATES) -> Candidate:
    """The storable candidate with the best cross-validated agreement (ties: the earlier); logistic with
    C = 1 on ``FEATURES`` when nothing could be cross-validated."""
    storable = [c for c in candidates if c.storable and c.key in scores]
    if not storable:
        return Candidate("logistic", 1.0, FEATURES)

    def best(group: list[Candidate]) -> Candidate:
        return max(group, key=lambda c: (round(scores[c.key], 9), -group.index(c)))

    aware = [c for c in storable if c.kind in N_AWARE_KINDS]
    others = [c for c in storable if c.kind not in N_AWARE_KINDS]
    if aware and others:  # the n_aware one when within N_AWARE_MARGIN of the best other candidate
        top = best(aware)
        return top if scores[top.key] >= scores[best(others).key] - N_AWARE_MARGIN - 1e-12 else best(others)
    return best(storable)


def _model_name(candidate: Candidate) -> str:
    kind = {
        "logistic": "logistic (C {:g})",
        "pairs": "logistic with pairwise products (C {:g})",
        "tree": "tree (depth {:g})",
        "n_aware": "n-aware normal model (mean gain by ridge {:g}, log sd by ridge)",
        "n_aware_logistic": "n-aware normal model (mean gain from a pairwise logistic, C {:g}; log sd by ridge)",
    }[candidate.kind].format(candidate.knob)
    return f"{kind} over {len(candidate.features)} theory quantities"


def fit_gain(x: np.ndarray, points: np.ndarray) -> dict[str, float | list[float]]:
    """The gain model: a ridge regression of the cells' mean gain in points on the features ``x``; its 95% interval
    is the 95th percentile of the absolute cross-validated residuals (5 folds, shuffled, seed 0)."""
    from sklearn.linear_model import Ridge
    from sklearn.model_selection import KFold, cross_val_predict

    mean, scale = x.mean(axis=0), x.std(axis=0)
    scale[scale == 0] = 1.0
    standard = (x - mean) / scale
    ridge = Ridge(alpha=1.0)
    if len(points) >= 2:
        folds = KFold(min(5, len(points)), shuffle=True, random_state=0)
        residuals = points - cross_val_predict(ridge, standard, points, cv=folds)
    ridge.fit(standard, points)
    if len(points) < 2:
        residuals = points - ridge.predict(standard)
    return {
        "mean": mean.tolist(),
        "scale": scale.tolist(),
        "coef": np.round(ridge.coef_, 8).tolist(),
        "intercept": float(ridge.intercept_),
        "interval_half_width": float(np.quantile(np.abs(residuals), 0.95)),
        "cv_rmse": float(np.sqrt(np.mean(residuals**2))),
    }


def fit_phase_model(
    fit: pd.DataFrame,
    provenance: dict | None = None,
    candidates: Sequence[Candidate] = PHASE_CANDIDATES,
    seeds: int | None = None,
    expected: dict[str, dict[int, float]] | None = None,
    expected_seeds: Sequence[int] = EXPECTED_SEEDS,
) -> tuple[PhaseModel, dict[str, float]]:
    """The phase model (module docstring) fitted to the fit cells, and every candidate's cross-validated
    agreement. The gain model (``fit_gain``, every kind): a ridge regression of the gain in points on the chosen
    model's features, with a 95% interval from its cross-validated residuals. An ``n_aware`` model predicts the
    verdict of ``seeds`` seeds (default: the fit cells'); its own mean gain ``mu(x)`` serves the verdict only (it is
    fitted to reproduce the verdict's probabilities, and covered 69% of fresh measured gains with its nominal 95%
    interval, docs/theory.md section 10), so its reported gain is the ridge one too."""
    from ptlab.report import n_aware

    x_all = features_of(fit, ALL_FEATURES)
    labels = fit["measured"].to_numpy(dtype=object).astype(str)
    gains = list(fit["gains"]) if "gains" in fit else None
    points = fit["gain"].to_numpy(float) * 100
    scores = cross_validated(x_all, labels, candidates, gains=gains, expected=expected, expected_seeds=expected_seeds)
    candidate = choose_candidate(scores, candidates)
    if candidate.kind in N_AWARE_KINDS and len(set(labels)) == len(CLASSES):
        x = x_all[:, _columns(candidate)]
        params = n_aware.fit_params(x, gains, candidate.knob, seeds, N_AWARE_KINDS[candidate.kind], labels)
        gain = fit_gain(x, points)
        model = PhaseModel(
            _model_name(candidate), "n_aware", candidate.features, n_aware.N_AWARE_CLASSES, params, gain, dict(provenance or {})
        )
        return model, scores
    if candidate.kind in N_AWARE_KINDS:
        candidate = choose_candidate(scores, [c for c in candidates if c.kind not in N_AWARE_KINDS])
    if len(set(labels)) == 1:  # one measured outcome: a constant model
        candidate = Candidate("logistic", 1.0, FEATURES)
    x = x_all[:, _columns(candidate)]
    if len(set(labels)) == 1:
        params = {
            "C": 1.0,
            "mean": x.mean(axis=0).tolist(),
            "scale": [1.0] * x.shape[1],
            "coef": [[0.0] * x.shape[1]],
            "intercept": [0.0],
        }
        classes = (str(labels[0]),)
    elif candidate.kind in ("logistic", "pairs"):
        estimator = _phase_estimator(candidate).fit(x, labels)
        scaler, logistic = estimator[-2], estimator[-1]
        classes = tuple(str(c) for c in logistic.classes_)
        coef, intercept = logistic.coef_, logistic.intercept_
        if len(classes) == 2:  # sklearn keeps one score for two classes: the second's against the first
            coef, intercept = np.vstack([-coef / 2, coef / 2]), np.array([-intercept[0] / 2, intercept[0] / 2])
        params = {
            "C": candidate.knob,
            "mean": scaler.mean_.tolist(),
            "scale": scaler.scale_.tolist(),
            "coef": np.round(coef, 8).tolist(),
            "intercept": np.round(intercept, 8).tolist(),
        }
        if candidate.kind == "pairs":
            params["pairs"] = all_pairs(len(candidate.features))
    else:
        estimator = _phase_estimator(candidate).fit(x, labels)
        tree = estimator.tree_
        classes = tuple(str(c) for c in estimator.classes_)
        params = {
            "max_depth": int(candidate.knob),
            "feature": tree.feature.tolist(),
            "threshold": tree.threshold.tolist(),
            "left": tree.children_left.tolist(),
            "right": tree.children_right.tolist(),
            "value": np.round(tree.value[:, 0, :], 8).tolist(),
            "importances": dict(zip(candidate.features, np.round(estimator.feature_importances_, 6).tolist())),
        }
    gain = fit_gain(x, points)
    model = PhaseModel(
        name=_model_name(candidate),
        kind="tree" if candidate.kind == "tree" else "logistic",
        features=candidate.features,
        classes=classes,
        params=params,
        gain=gain,
        provenance=dict(provenance or {}),
    )
    return model, scores


# ---- scoring -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Score:
    """One predictor on one set of cells."""

    predictor: str
    cells: int
    agreeing: int
    low: float
    high: float
    negative_precision: float
    negative_recall: float
    confusion: pd.DataFrame

    @property
    def agreement(self) -> float:
        return self.agreeing / self.cells if self.cells else math.nan


def score(name: str, measured: Sequence[str], predicted: Sequence[str]) -> Score:
    """Agreement (Wilson 95%), negative-transfer precision and recall, and the confusion matrix (rows:
    measured, columns: predicted)."""
    measured, predicted = np.asarray(measured, dtype=object), np.asarray(predicted, dtype=object)
    agreeing = int((measured == predicted).sum())
    low, high = wilson_interval(agreeing, len(measured))
    said, was = predicted == NEGATIVE_TRANSFER, measured == NEGATIVE_TRANSFER
    precision = float((said & was).sum() / said.sum()) if said.any() else math.nan
    recall = float((said & was).sum() / was.sum()) if was.any() else math.nan
    confusion = pd.crosstab(
        pd.Categorical(measured, categories=CLASSES), pd.Categorical(predicted, categories=PREDICTED_LABELS), dropna=False
    )
    confusion.index.name, confusion.columns.name = "measured", "predicted"
    return Score(name, len(measured), agreeing, low, high, precision, recall, confusion)


def baselines() -> dict[str, Callable[[pd.DataFrame], list[str]]]:
    """The baselines: always helps; helps iff ||u|| > 0, else negative transfer; the theory at unit constants."""
    return {
        "always helps": lambda cells: [TRANSFER_HELPS] * len(cells),
        "helps iff ||u|| > 0": lambda cells: [TRANSFER_HELPS if u > 0 else NEGATIVE_TRANSFER for u in cells["u_norm"]],
        "theory, unit constants": lambda cells: predicted_outcomes(cells, TheoryConstants()),
    }


@dataclass(frozen=True)
class Calibration:
    """The fitted constants and phase model, every cell with every predictor's label, and the scores."""

    constants: TheoryConstants
    boundaries: dict[str, BoundaryFit]
    outcome_agreeing: int
    phase: PhaseModel
    phase_cv: dict[str, float]
    cells: pd.DataFrame
    scores: dict[str, dict[str, Score]]

    def agreement(self) -> pd.DataFrame:
        """Per split and predictor: cells, agreeing, agreement, its Wilson interval, negative precision/recall."""
        return pd.DataFrame(
            [
                {
                    "split": split,
                    "predictor": s.predictor,
                    "cells": s.cells,
                    "agreeing": s.agreeing,
                    "agreement": s.agreement,
                    "wilson_low": s.low,
                    "wilson_high": s.high,
                    "negative_precision": s.negative_precision,
                    "negative_recall": s.negative_recall,
                }
                for split, by_name in self.scores.items()
                for s in by_name.values()
            ]
        )


PHASE, THEORY = "phase model", "theory, fitted constants"


def by_confidence(cells: pd.DataFrame) -> list[dict[str, float | int]]:
    """The phase model's agreement with the measured verdict in each band of its confidence (``CONFIDENCE_EDGES``):
    ``{"low", "high", "cells", "agreeing"}`` a band; ``cells`` as ``calibrate`` labels them."""
    band = np.array([confidence_band(c) for c in cells["phase_confidence"]], dtype=int)
    right = (cells[PHASE] == cells["measured"]).to_numpy()
    return [
        {"low": low, "high": high, "cells": int((band == i).sum()), "agreeing": int(right[band == i].sum())}
        for i, (low, high) in enumerate(zip(CONFIDENCE_EDGES[:-1], CONFIDENCE_EDGES[1:]))
    ]


def confidence_lines(result: Calibration) -> list[str]:
    """Per split: the phase model's agreement by its confidence, in bands and from each band's lower edge up (how
    far one prediction can be trusted, read from its confidence), with Wilson intervals."""
    lines = []
    for split, group in result.cells.groupby("split", sort=True):
        bands = by_confidence(group)
        lines.append(f"phase model by its confidence (largest class probability), {split} cells ({len(group)}):")
        for i, b in enumerate(bands):
            cells, agreeing = sum(r["cells"] for r in bands[i:]), sum(r["agreeing"] for r in bands[i:])
            if cells:
                in_band = f"{b['agreeing']}/{b['cells']} = {_rate(b['agreeing'], b['cells'])}" if b["cells"] else "no cell"
                lines.append(
                    f"  {confidence_band_label(i)}: {in_band}; from {b['low']:.1f} up: {cells} cells "
                    f"({cells / len(group):.0%}), {_rate(agreeing, cells)}"
                )
    return lines


def _rate(agreeing: int, cells: int) -> str:
    low, high = wilson_interval(agreeing, cells)
    return f"{agreeing / cells:.1%} [{low:.1%}, {high:.1%}]"


def calibrate(
    cells: pd.DataFrame,
    provenance: dict | None = None,
    candidates: Sequence[Candidate] = PHASE_CANDIDATES,
    frozen: PhaseModel | None = None,
    seeds: int | None = None,
    expected: dict[str, dict[int, float]] | None = None,
    expected_seeds: Sequence[int] = EXPECTED_SEEDS,
) -> Calibration:
    """Fit the constants and the phase model (chosen among ``candidates``) on the ``fit`` cells and score every
    predictor on both splits. With ``frozen`` (a model fitted and stored before), that model is scored as it is:
    no phase model is fitted, and the cross-validation is empty. ``seeds``: the verdict's n an ``n_aware`` model
    predicts for (a frozen one is switched to it)."""
    cells = add_thresholds(cells[cells["measured"].notna()].reset_index(drop=True))
    fit = cells[cells["split"] == FIT]
    if fit.empty:
        raise ReportError("no fit cell has a paired verdict: calibration needs fit cells with >= 2 seeds")
    constants, boundaries, agreeing = fit_constants(fit)
    if frozen is not None and seeds is not None and frozen.kind == "n_aware":
        frozen = frozen.with_seeds(seeds)
    phase, cv = (
        (frozen, {}) if frozen is not None else fit_phase_model(fit, provenance, candidates, seeds, expected, expected_seeds)
    )
    cells[THEORY] = predicted_outcomes(cells, constants)
    x = features_of(cells, phase.features)
    probabilities = phase.probabilities(x)
    cells[PHASE] = [phase.classes[i] for i in probabilities.argmax(axis=1)]
    cells["phase_confidence"] = probabilities.max(axis=1)
    cells["phase_gain"] = phase.predict_gain(x)
    for name, rule in baselines().items():
        cells[name] = rule(cells)
    predictors = [PHASE, THEORY, *baselines()]
    scores = {
        split: {p: score(p, group["measured"], group[p]) for p in predictors}
        for split, group in cells.groupby("split", sort=True)
    }
    return Calibration(constants, boundaries, agreeing, phase, cv, cells, scores)


def load_cells(
    fit: Sequence[str],
    held_out: Sequence[str],
    tracking_uri: str | Sequence[str],
    min_seeds: int = MIN_SEEDS,
    held_out_uri: str | None = None,
) -> tuple[pd.DataFrame, int]:
    """The cells of every experiment, one table, and how many were left out for having < ``min_seeds`` seeds.
    ``tracking_uri`` is one store or several (each experiment read from the one store that holds it,
    ``runs.experiment_stores``); held-out experiments are read from ``held_out_uri`` when given.
    Held-out runs must share no run seed with fit runs (no common random numbers across the split)."""
    overlap = set(fit) & set(held_out)
    if overlap:
        raise ReportError(
            f"experiment(s) {', '.join(sorted(overlap))} both fit and held out: a held-out cell must never be fitted"
        )
    uris = [tracking_uri] if isinstance(tracking_uri, str) else list(tracking_uri)
    stores = experiment_stores(uris, [*fit, *([] if held_out_uri else held_out)])
    stores.update({name: held_out_uri for name in held_out if held_out_uri})
    tables, seeds = [], {FIT: set(), HELD_OUT: set()}
    for split, names in ((FIT, fit), (HELD_OUT, held_out)):
        for name in names:
            runs = load_pipelines(stores[name], name)
            seeds[split] |= set(runs["params.seed"].astype(str)) if "params.seed" in runs else set()
            tables.append(cell_table(runs, name, split))
    shared = seeds[FIT] & seeds[HELD_OUT]
    if shared:
        raise ReportError(
            f"{len(shared)} run seeds (e.g. {min(shared, key=str)}) occur in both fit and held-out "
            "runs: held-out cells must not share data with fit cells (draw them with another design seed)"
        )
    cells = pd.concat(tables, ignore_index=True)
    enough = cells["n_seeds"] >= min_seeds
    return cells[enough].reset_index(drop=True), int((~enough).sum())


# ---- the noise ceiling ----------------------------------------------------------------------------------

CEILING_METHODS = ("bootstrap", "normal")


def replicate_verdicts(
    gains: np.ndarray, method: str, replicates: int, rng: np.random.Generator, seeds: int | None = None
) -> np.ndarray:
    """``replicates`` verdicts (+1 better, 0 no detectable difference, -1 worse) of the 95% paired t interval
    on replicates of ``seeds`` paired gains (default: as many as the cell has) of one cell: resampled with
    replacement from its gains (``bootstrap``) or drawn from a normal with the gains' mean and sd (``normal``).
    Same rule as ``ptlab.report.runs.verdict``."""
    from scipy import stats

    gains = np.asarray(gains, float)
    if len(gains) < 2:
        raise ValueError(f"a cell with {len(gains)} gains: the paired t interval needs >= 2")
    n = len(gains) if seeds is None else int(seeds)
    if n < 2:
        raise ValueError(f"seeds={n}: the paired t interval needs >= 2")
    if method == "bootstrap":
        draws = gains[rng.integers(0, len(gains), size=(replicates, n))]
    elif method == "normal":
        draws = rng.normal(gains.mean(), gains.std(ddof=1), size=(replicates, n))
    else:
        raise ValueError(f"method={method}: one of {', '.join(CEILING_METHODS)}")
    mean = draws.mean(axis=1)
    half = stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1) * draws.std(axis=1, ddof=1) / math.sqrt(n)
    return np.where(mean - half > 0, 1, np.where(mean + half < 0, -1, 0))


@dataclass(frozen=True)
class Ceiling:
    """The noise ceiling of a set of cells: the mean over cells of each cell's ``cell_ceilings`` and a
    bootstrap interval over cells."""

    method: str
    cells: int
    ceiling: float
    low: float
    high: float
    cell_ceilings: np.ndarray


def noise_ceiling(
    gains_by_cell: Sequence[np.ndarray],
    method: str = "bootstrap",
    replicates: int = 2000,
    seed: int = 0,
    resamples: int = 2000,
    seeds: int | None = None,
) -> Ceiling:
    """How often an oracle that knew each cell's mean gain (taken to be the observed one) could agree with
    the cell's verdict of ``seeds`` seeds (default: the cell's own count): per cell, the largest of the three
    verdicts' frequencies over ``replicates`` replicate verdicts (``replicate_verdicts``); their mean over cells,
    with a 95% percentile interval over ``resamples`` bootstrap resamples of the cells (seeded). Taking the
    observed mean and sd as the true ones biases it both ways (docs/theory.md section 11): a cell whose true mean
    sits at the verdict's boundary looks farther from it (optimistic), a cell with no true effect looks as if it
    had one (pessimistic); the more so the larger ``seeds`` is against the cell's own count."""
    if not len(gains_by_cell):
        raise ValueError("noise ceiling of no cells")
    rng = np.random.default_rng(seed)
    per_cell = np.array(
        [
            np.bincount(replicate_verdicts(g, method, replicates, rng, seeds) + 1, minlength=3).max() / replicates
            for g in gains_by_cell
        ]
    )
    means = per_cell[rng.integers(0, len(per_cell), size=(resamples, len(per_cell)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return Ceiling(method, len(per_cell), float(per_cell.mean()), float(low), float(high), per_cell)


def ceiling_lines(cells: pd.DataFrame, replicates: int = 2000, seed: int = 0, seeds: Sequence[int] = ()) -> list[str]:
    """``noise_ceiling`` of every split of ``cells`` by both methods at the cells' own seed count, and by the
    ``normal`` method at each of ``seeds``, as printable lines."""
    lines = []
    for split, group in cells.groupby("split", sort=True):
        for method, n in [*((m, None) for m in CEILING_METHODS), *(("normal", n) for n in seeds)]:
            c = noise_ceiling(list(group["gains"]), method, replicates, seed, seeds=n)
            at = "" if n is None else f" at {n} seeds"
            lines.append(
                f"noise ceiling{at}, {split} cells ({c.cells}), {method}: {c.ceiling:.1%} "
                f"[{c.low:.1%}, {c.high:.1%}] (an oracle knowing each cell's mean gain; {replicates} "
                "replicate verdicts a cell)"
            )
    return lines


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.0%}"


def agreement_lines(result: Calibration) -> list[str]:
    lines = []
    for split, by_name in result.scores.items():
        lines.append(f"{split} cells ({next(iter(by_name.values())).cells}): agreement with the measured verdict")
        for s in by_name.values():
            lines.append(
                f"  {s.predictor:<26} {s.agreeing:>4}/{s.cells:<4} = {s.agreement:6.1%} "
                f"[{s.low:.1%}, {s.high:.1%}]  negative precision {_percent(s.negative_precision)}, "
                f"recall {_percent(s.negative_recall)}"
            )
    return lines


def constants_yaml(result: Calibration, command: str, today: dt.date | None = None) -> str:
    """A ``conf/theory/*.yaml`` file holding the fitted constants and where they came from."""
    c = result.constants
    day = (today or dt.date.today()).isoformat()
    fit_cells = int((result.cells["split"] == FIT).sum())
    held = result.scores.get(HELD_OUT, {}).get(THEORY)
    held_text = (
        (f"held-out agreement {held.agreeing}/{held.cells} = {held.agreement:.1%} (Wilson 95% [{held.low:.1%}, {held.high:.1%}])")
        if held
        else "no held-out cells"
    )
    fits = "; ".join(
        f"{key} {b.agreeing}/{b.cells} cells (any value in [{b.c_low:.4g}, {b.c_high:.4g}))"
        for key, b in result.boundaries.items()
    )
    source = f"fitted {day} by `{command}` on {fit_cells} random-design cells; {held_text}"
    lines = [
        "# Theory constants fitted to random-design runs (docs/theory.md).",
        f"# Refit: {command}",
        f"# Regime boundaries agree with the fit cells: {fits}.",
        f"# c_gamma, c4 and c_ratio: {result.outcome_agreeing}/{fit_cells} fit cells agree on the outcome.",
        *(f"# {line}" for line in agreement_lines(result)),
        *(f"{key}: {getattr(c, key):.6g}" for key in ("c1", "c3", "c1_prime", "c3_prime", "c4", "c_gamma", "c_ratio")),
        f"source: {json.dumps(source)}",
    ]
    return "\n".join(lines) + "\n"


def importance_lines(model: PhaseModel) -> list[str]:
    """What carries the signal: the logistic coefficients per class (standardised features) or the tree's
    importances."""
    if model.kind == "tree":
        ranked = sorted(model.params["importances"].items(), key=lambda kv: -kv[1])
        return [f"  {name:<32} importance {value:.3f}" for name, value in ranked]
    if model.kind == "n_aware":
        p = model.params
        coef = np.asarray(p["mu"]["coef"])[None, :] if p["mean_from"] == "regression" else np.asarray(p["logistic"]["coef"])
        coef = np.vstack([coef, p["log_sigma"]["coef"]])
        classes = [*(["mu"] if p["mean_from"] == "regression" else model.classes), "log_sigma"]
    else:
        coef, classes = np.asarray(model.params["coef"]), model.classes
    names = [*model.features, *(f"{model.features[i]}*{model.features[j]}" for i, j in model.params.get("pairs", []))]
    order = np.argsort(-np.abs(coef).max(axis=0))
    header = "  " + " " * 32 + "".join(f"{c:>20}" for c in classes)
    return [header, *(f"  {names[i]:<32}" + "".join(f"{v:>20.3f}" for v in coef[:, i]) for i in order)]


def report_text(result: Calibration, dropped: int = 0) -> str:
    """The fitted constants, the phase model with its cross-validation and coefficients, and every
    predictor's agreement, as printable lines."""
    c = result.constants
    lines = [
        f"{key} = {getattr(c, key):.4g} ({'transfer' if key in ('c1', 'c3') else 'scratch'} "
        f"{'near' if key.startswith('c1') else 'sub'}-optimal boundary: {b.agreeing}/{b.cells} fit cells agree)"
        for key, b in result.boundaries.items()
    ]
    fit_cells = int((result.cells["split"] == FIT).sum())
    lines.append(
        f"c_gamma = {c.c_gamma:.4g}, c4 = {c.c4:.4g}, c_ratio = {c.c_ratio:.4g} (Proposition 4.4: "
        f"{result.outcome_agreeing}/{fit_cells} fit cells agree on the outcome)"
    )
    if dropped:
        lines.append(f"left out: {dropped} cells with fewer than {MIN_SEEDS} seeds")
    lines.append(
        f"phase model: {result.phase.name}; 5-fold CV agreement on the fit cells: "
        + ", ".join(f"{k} {v:.1%}" for k, v in result.phase_cv.items())
    )
    lines += importance_lines(result.phase)
    if result.phase.kind == "n_aware":
        p = result.phase.params
        lines.append(
            f"n-aware model: predicts the verdict of {p['seeds']} seeds (calibration: {p['calibration_seeds']})"
            + (f"; tau {p['tau']:.3f} points, mu CV RMSE {p['cv_rmse']:.2f} points" if p["mean_from"] == "regression" else "")
        )
    if "cv_rmse" in result.phase.gain:
        lines.append(
            f"gain model: CV RMSE {result.phase.gain['cv_rmse']:.2f} points, 95% interval "
            f"+-{result.phase.gain['interval_half_width']:.2f} points"
        )
    lines += agreement_lines(result)
    lines += confidence_lines(result)
    for split, by_name in result.scores.items():
        for name in (PHASE, THEORY):
            lines.append(f"confusion matrix, {name}, {split} (rows measured, columns predicted):")
            lines += ["  " + line for line in by_name[name].confusion.to_string().splitlines()]
    return "\n".join(lines)


def write_outputs(result: Calibration, out_dir: Path, text: str) -> list[Path]:
    """``calibration_cells.csv`` (every cell, its split, measurement and every predictor's label),
    ``calibration_agreement.csv`` and ``calibration.txt`` (``report_text``)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cells, agreement, report = (
        out_dir / "calibration_cells.csv",
        out_dir / "calibration_agreement.csv",
        out_dir / "calibration.txt",
    )
    result.cells.drop(columns=["gains"], errors="ignore").to_csv(cells, index=False)
    result.agreement().to_csv(agreement, index=False)
    report.write_text(text + "\n")
    return [cells, agreement, report]


# ---- fit cells near the current model's boundary ---------------------------------------------------------

DESIGN_KEYS = {
    "d": "task.d",
    "n1": "task.n1",
    "n2": "task.n2",
    "u_norm": "task.u_norm",
    "v_norm": "task.v_norm",
    "sigma_p1": "noise.sigma_p1",
    "sigma_p2": "noise.sigma_p2",
    "alpha": "transfer.alpha",
}
"""The override of each theory input in a cells file (``ptlab.design``)."""


def cell_setting(cell: Sequence[str]) -> Setting:
    """The theory's ``Setting`` of one cell of a design (its override list); every input must be drawn or fixed
    by the cell."""
    values = dict(o.split("=", 1) for o in cell if "=" in o)
    missing = [key for key in DESIGN_KEYS.values() if key not in values]
    if missing:
        raise ReportError(f"cell {' '.join(cell)}: lacks {', '.join(missing)}: the filter needs every theory input")
    v = {name: float(values[key]) for name, key in DESIGN_KEYS.items()}
    floats = (v[k] for k in ("u_norm", "v_norm", "sigma_p1", "sigma_p2", "alpha"))
    return Setting(int(v["d"]), int(v["n1"]), int(v["n2"]), *floats)


def near_boundary(design: Sequence[Sequence[str]], model: PhaseModel, max_confidence: float) -> list[list[str]]:
    """The cells of a random design where ``model`` is unsure: its largest class probability is below
    ``max_confidence``, in the design's order, each with its own run seeds (an active-learning fit set: the
    cells are still drawn at random over the box, then kept by the model's confidence; never held out)."""
    if not 0 < max_confidence <= 1:
        raise ReportError(f"max_confidence={max_confidence}: a probability in (0, 1]")
    rows = [phase_features(cell_setting(cell)) for cell in design]
    if not rows:
        return []
    confidence = model.probabilities(feature_matrix(rows, model.features)).max(axis=1)
    return [list(cell) for cell, p in zip(design, confidence) if p < max_confidence]


# ---- class offsets of a frozen logistic model --------------------------------------------------------------

OFFSET_LIMIT, OFFSET_STEP = 1.0, 0.05
"""The grid of ``fit_offsets``: each class's offset in ``[-OFFSET_LIMIT, OFFSET_LIMIT]`` and no two offsets more
than ``OFFSET_LIMIT`` apart, in steps of ``OFFSET_STEP``."""


def _offset_grid(classes: int, reference: int, limit: float = OFFSET_LIMIT, step: float = OFFSET_STEP) -> np.ndarray:
    """Every offset vector of the grid (``reference``'s offset 0), ordered by size (the smallest first)."""
    import itertools

    values = np.round(np.arange(-limit, limit + step / 2, step), 10)
    free = [i for i in range(classes) if i != reference]
    grid = []
    for combo in itertools.product(values, repeat=len(free)):
        offsets = np.zeros(classes)
        offsets[free] = combo
        if offsets.max() - offsets.min() <= limit + 1e-9:
            grid.append(offsets)
    return np.array(sorted(grid, key=lambda o: (np.abs(o).max(), float((o**2).sum()), tuple(o))))


def offset_agreement(log_p: np.ndarray, labels: np.ndarray, classes: Sequence[str], grid: np.ndarray) -> np.ndarray:
    """How many cells each offset vector of ``grid`` gets right: the predicted class is the argmax of the log
    probabilities plus the offsets."""
    names = np.asarray(classes, dtype=object)
    predicted = names[(log_p[None, :, :] + grid[:, None, :]).argmax(axis=2)]
    return (predicted == np.asarray(labels, dtype=object)[None, :]).sum(axis=1)


def fit_offsets(
    model: PhaseModel, x: np.ndarray, labels: Sequence[str], reference: str = NO_DIFFERENCE
) -> tuple[np.ndarray, int]:
    """Offsets added to a frozen logistic model's class scores (``reference``'s kept at 0) that agree best with
    ``labels`` on the cells ``x``; ties go to the smallest offsets. The grid bounds every difference of two
    offsets by ``OFFSET_LIMIT`` (1.0): a cell whose largest class probability is at least 0.75 has a log-odds
    margin of at least log 3 = 1.1 over the others, so no such cell changes its predicted class, only cells
    the model is unsure about do."""
    if model.kind != "logistic":
        raise ValueError(f"phase model kind={model.kind}: offsets need a logistic model")
    grid = _offset_grid(len(model.classes), list(model.classes).index(reference))
    log_p = np.log(np.clip(model.probabilities(x), 1e-300, None))
    scores = offset_agreement(log_p, np.asarray(labels, dtype=object), model.classes, grid)
    best = int(np.argmax(scores))  # the first maximum: the smallest offsets among the best
    return grid[best], int(scores[best])


def cross_validated_offsets(
    model: PhaseModel, x: np.ndarray, labels: Sequence[str], repeats: int = CV_REPEATS
) -> tuple[float, float]:
    """The mean agreement of ``fit_offsets`` in ``repeats`` stratified 5-fold splits (seeds 0, 1, ...; offsets
    fitted on four folds, scored on the fifth) and, on the same cells, the frozen model's own agreement."""
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels, dtype=object).astype(str)
    plain = float(np.mean(np.asarray(model.predict_outcomes(x), dtype=object) == labels))
    folds = int(min(CV_FOLDS, pd.Series(labels).value_counts().min()))
    if folds < 2:
        return math.nan, plain
    agreeing = []
    for seed in range(repeats):
        right = 0
        for train, test in StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed).split(x, labels):
            offsets, _ = fit_offsets(model, x[train], labels[train])
            right += int((np.asarray(with_offsets(model, offsets).predict_outcomes(x[test]), dtype=object) == labels[test]).sum())
        agreeing.append(right / len(labels))
    return float(np.mean(agreeing)), plain


def with_offsets(model: PhaseModel, offsets: np.ndarray, provenance: dict | None = None) -> PhaseModel:
    """``model`` with ``offsets`` added to its class intercepts (everything else unchanged)."""
    if not np.any(offsets):
        return model if provenance is None else replace(model, provenance=provenance)
    params = {**model.params, "intercept": np.round(np.asarray(model.params["intercept"], float) + offsets, 8).tolist()}
    terms = ", ".join(f"{c} {o:+.2f}" for c, o in zip(model.classes, offsets) if o)
    name = model.name.split(" + class offsets")[0] + f" + class offsets ({terms})"
    return replace(model, name=name, params=params, provenance=dict(model.provenance if provenance is None else provenance))

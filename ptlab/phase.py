"""The fitted phase model: the measured outcome of transfer against scratch predicted from the theory's
dimensionless quantities (docs/theory.md).

``features`` turns a setting's theory quantities into those of ``FEATURES`` (logarithms base 10, clipped
to ``[-CLIP, CLIP]`` so that ``u = 0``'s infinite ratios stay finite); ``ptlab.theory.phase_features``
does it for a ``Setting`` (``ptlab.theory`` imports this module, not the reverse). A ``PhaseModel`` holds
either a multinomial logistic regression (standardised features, one linear score per class, softmax)
(optionally over the features and their pairwise products, ``params.pairs``) or a shallow decision
tree, plus a linear model of the paired gain in points with an interval from its
cross-validated residuals; ``conf/phase_model.yaml`` stores one with its provenance (written by
``python -m ptlab.report calibrate --write-phase``). Evaluating a model needs numpy and PyYAML only: no
torch, sklearn or MLflow, so ``python -m ptlab.predict`` answers in well under a second.

The ``n_aware`` kind (docs/theory.md section 10) predicts the verdict of ``n`` seeds rather than that of the
calibration's seed count: two ridge regressions over the features and their pairwise products, of the cell's mean
paired gain ``mu(x)`` and of the log sd of its paired gains ``log sigma(x)`` (points), and ``tau``, the sd of the
true mean gain around ``mu(x)`` (the cross-validated residual variance less the mean sampling variance). The mean
of ``n`` gains is then ``N(mu, tau^2 + sigma^2 / n)``, and the verdict is ``transfer_helps`` when it exceeds
``t_{0.975, n-1} sigma / sqrt(n)``, ``negative_transfer`` when it is below minus that (``verdict_probabilities``).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

FEATURES = (
    "log_d_over_threshold",
    "log_d_over_scratch_threshold",
    "log_gamma",
    "universal_fraction",
    "log_source_strength",
    "log_negative_transfer_ratio",
    "alpha",
    "log_n1_over_n2",
    "log_condition_4_1_ratio",
)
"""The phase model's inputs: ``log10`` of d / D*, d / (N2 S2^4 / s2^4), Gamma, alpha N1 s2^2 / (N2 s1^2) and
the negative-transfer ratio; ``U^2 / S2^2`` (the share of the target signal that is universal, in [0, 1]);
alpha; ``log10 N1 / N2``; ``log10`` of Condition 4.1's ratio."""
EXTRA_FEATURES = ("log_d", "log_n2", "log_threshold_term", "log_scratch_threshold")
"""Further inputs a model may use: ``log10`` of d, N2, D* and the scratch threshold N2 S2^4 / s2^4."""
ALL_FEATURES = (*FEATURES, *EXTRA_FEATURES)
CLIP = 6.0
PHASE_MODEL_FILE = "phase_model.yaml"
KINDS = ("logistic", "tree", "n_aware")
CONFIDENCE_EDGES = (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
"""The bands of the model's confidence (its largest class probability: [0, 0.5), [0.5, 0.6), ..., [0.9, 1]) by
which its held-out agreement is recorded (``provenance.held_out.by_confidence``) and told beside a prediction."""
N_AWARE_CLASSES = ("negative_transfer", "no_difference", "transfer_helps")
"""The classes of an ``n_aware`` model, in the order of its probabilities (those of ``ptlab.theory``)."""


def _log(value: float) -> float:
    if math.isnan(value):
        return 0.0
    if value <= 0:
        return -CLIP
    return float(min(max(math.log10(value), -CLIP), CLIP)) if math.isfinite(value) else CLIP


def features(theory: Mapping[str, Any], alpha: float, n1: int, n2: int) -> dict[str, float]:
    """The ``ALL_FEATURES`` of one setting from its theory quantities (``TheoryPrediction.as_dict()``: they do
    not depend on the theory's constants) and alpha, N1, N2 (module docstring)."""
    fraction = 1.0 / theory["signal_ratio"] if theory["signal_ratio"] else math.inf
    return {
        "log_d_over_threshold": _log(theory["d_over_threshold"]),
        "log_d_over_scratch_threshold": _log(theory["d_over_scratch_threshold"]),
        "log_gamma": _log(theory["gamma"]),
        "universal_fraction": 0.0 if math.isnan(fraction) or math.isinf(fraction) else float(fraction),
        "log_source_strength": _log(theory["source_strength"]),
        "log_negative_transfer_ratio": _log(theory["negative_transfer_ratio"]),
        "alpha": float(alpha),
        "log_n1_over_n2": _log(n1 / n2),
        "log_condition_4_1_ratio": _log(theory["condition_4_1_ratio"]),
        "log_d": _log(theory["d_over_scratch_threshold"] * theory["scratch_threshold"]),
        "log_n2": _log(n2),
        "log_threshold_term": _log(theory["threshold_term"]),
        "log_scratch_threshold": _log(theory["scratch_threshold"]),
    }


def feature_matrix(rows: Sequence[Mapping[str, float]], names: Sequence[str] = FEATURES) -> np.ndarray:
    """One row per ``features`` mapping, columns in the order of ``names``."""
    return np.array([[row[n] for n in names] for row in rows], dtype=float).reshape(len(rows), len(names))


def all_pairs(count: int) -> list[list[int]]:
    """Every pair ``[i, j]``, ``i < j``, of ``count`` features (``expand_pairs``)."""
    return [[i, j] for i in range(count) for j in range(i + 1, count)]


def expand_pairs(x: np.ndarray, pairs: Sequence[Sequence[int]]) -> np.ndarray:
    """``x`` with one column appended per pair ``[i, j]``: the product of columns i and j (raw features)."""
    x = np.atleast_2d(np.asarray(x, float))
    if not len(pairs):
        return x
    return np.hstack([x, np.column_stack([x[:, int(i)] * x[:, int(j)] for i, j in pairs])])


def confidence_band(confidence: float) -> int:
    """The index of the ``CONFIDENCE_EDGES`` band holding ``confidence`` (the last band includes 1)."""
    return min(int(np.searchsorted(CONFIDENCE_EDGES, confidence, side="right")) - 1, len(CONFIDENCE_EDGES) - 2)


def confidence_band_label(band: int) -> str:
    """``[low, high)`` of a ``CONFIDENCE_EDGES`` band (``]`` for the last, which includes 1)."""
    low, high = CONFIDENCE_EDGES[band], CONFIDENCE_EDGES[band + 1]
    return f"[{low:.1f}, {high:.1f}{']' if band == len(CONFIDENCE_EDGES) - 2 else ')'}"


def _normal_cdf(z: np.ndarray) -> np.ndarray:
    return 0.5 * np.vectorize(math.erfc)(-np.asarray(z, float) / math.sqrt(2.0))


def t_quantile(seeds: int, confidence: float = 0.95) -> float:
    """``t_{(1 + confidence) / 2, seeds - 1}``: the critical value of the paired t interval of ``seeds`` gains."""
    if int(seeds) < 2:
        raise ValueError(f"seeds={seeds}: the paired t interval needs >= 2 seeds")
    from scipy.stats import t

    return float(t.ppf(0.5 + confidence / 2, int(seeds) - 1))


def verdict_probabilities(mu: np.ndarray, sigma: np.ndarray, tau: np.ndarray | float, seeds: int, t_crit: float) -> np.ndarray:
    """Probabilities of the verdicts negative / no difference / helps of ``seeds`` paired gains whose mean is
    ``N(mu, tau^2 + sigma^2 / seeds)``: helps when the mean exceeds ``t_crit sigma / sqrt(seeds)`` (the interval's
    half width, with the sample sd taken to be ``sigma``), negative when it is below minus that."""
    mu, sigma, tau = np.asarray(mu, float), np.asarray(sigma, float), np.asarray(tau, float)
    spread = np.sqrt(tau**2 + sigma**2 / seeds)
    half = t_crit * sigma / math.sqrt(seeds)
    helps = _normal_cdf((mu - half) / spread)
    negative = _normal_cdf((-mu - half) / spread)
    return np.column_stack([negative, np.clip(1.0 - helps - negative, 0.0, 1.0), helps])


def _normal_quantile(p: np.ndarray) -> np.ndarray:
    from statistics import NormalDist

    return np.vectorize(NormalDist().inv_cdf, otypes=[float])(np.clip(np.asarray(p, float), 1e-12, 1 - 1e-12))


def n_aware_moments(params: Mapping[str, Any], x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``mu(x)``, ``sigma(x)`` and ``tau(x)`` (points) of an ``n_aware`` model's ``params`` for a feature matrix
    ``x`` (module docstring). ``mean_from: regression``: ``mu`` a ridge regression, ``tau`` one constant.
    ``mean_from: logistic``: ``mu`` and ``tau`` are those for which the normal model gives the pairwise logistic's
    probabilities of helps and negative at the calibration's seed count ``n0``: with ``a = Phi^-1(p_helps)``,
    ``b = Phi^-1(p_negative)`` and ``h0 = t_{0.975, n0-1} sigma / sqrt(n0)``, the sd of the n0-seed mean is
    ``-2 h0 / (a + b)``, ``mu`` is that sd times ``(a - b) / 2``, and ``tau^2`` is that sd squared less
    ``sigma^2 / n0`` (floored at 0)."""
    expanded = expand_pairs(np.atleast_2d(np.asarray(x, float)), params.get("pairs", []))
    z = (expanded - np.asarray(params["mean"], float)) / np.asarray(params["scale"], float)
    sigma = np.exp(z @ np.asarray(params["log_sigma"]["coef"], float) + float(params["log_sigma"]["intercept"]))
    if params.get("mean_from", "regression") == "regression":
        mu = z @ np.asarray(params["mu"]["coef"], float) + float(params["mu"]["intercept"])
        return mu, sigma, np.full(len(z), float(params["tau"]))
    logistic = params["logistic"]
    p = _softmax(z @ np.asarray(logistic["coef"], float).T + np.asarray(logistic["intercept"], float))
    a, b = _normal_quantile(p[:, 2]), _normal_quantile(p[:, 0])
    n0 = int(params["calibration_seeds"])
    spread = -2 * float(params["calibration_t_crit"]) * sigma / math.sqrt(n0) / (a + b)
    return spread * (a - b) / 2, sigma, np.sqrt(np.maximum(spread**2 - sigma**2 / n0, 0.0))


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


@dataclass(frozen=True)
class PhaseModel:
    """A fitted phase model (module docstring); ``provenance`` says how it was fitted and how it scored."""

    name: str
    kind: str
    features: tuple[str, ...]
    classes: tuple[str, ...]
    params: dict[str, Any]
    gain: dict[str, Any]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"phase model kind={self.kind}: one of {', '.join(KINDS)}")
        unknown = set(self.features) - set(ALL_FEATURES)
        if unknown:
            raise ValueError(f"phase model features {sorted(unknown)}: known are {', '.join(ALL_FEATURES)}")
        pairs = self.params.get("pairs", []) if self.kind in ("logistic", "n_aware") else []
        if any(len(p) != 2 or not all(0 <= int(i) < len(self.features) for i in p) for p in pairs):
            raise ValueError(f"phase model pairs {pairs}: index pairs into its {len(self.features)} features")
        if self.kind == "n_aware":
            source = self.params.get("mean_from", "regression")
            own = ("mu", "tau") if source == "regression" else ("logistic", "calibration_seeds", "calibration_t_crit")
            needed = ("mean", "scale", "log_sigma", "seeds", "t_crit", *own)
            missing = [k for k in needed if k not in self.params]
            if source not in ("regression", "logistic") or missing or tuple(self.classes) != N_AWARE_CLASSES:
                raise ValueError(
                    f"n_aware phase model with mean_from={source}, lacking {missing}, classes {list(self.classes)}: "
                    f"mean_from regression or logistic, needs {', '.join(needed)} and classes {list(N_AWARE_CLASSES)}"
                )
            if int(self.params["seeds"]) < 2:
                raise ValueError(f"n_aware phase model seeds={self.params['seeds']}: >= 2")

    @property
    def seeds(self) -> int | None:
        """The number of seeds whose verdict an ``n_aware`` model predicts (None for the other kinds)."""
        return int(self.params["seeds"]) if self.kind == "n_aware" else None

    def with_seeds(self, seeds: int) -> PhaseModel:
        """An ``n_aware`` model predicting the verdict of ``seeds`` seeds (everything else unchanged)."""
        if self.kind != "n_aware":
            raise ValueError(f"phase model kind={self.kind}: only an n_aware model predicts for a chosen seed count")
        t_crit = t_quantile(int(seeds), float(self.params.get("confidence", 0.95)))
        params = {**self.params, "seeds": int(seeds), "t_crit": t_crit}
        return replace(self, params=params)

    def logistic_part(self) -> PhaseModel:
        """The pairwise logistic inside a logistic-derived ``n_aware`` model, as a ``logistic`` model (its class
        probabilities at the calibration's seed count; no gain model)."""
        if self.kind != "n_aware" or self.params.get("mean_from") != "logistic":
            raise ValueError(f"phase model kind={self.kind}: only a logistic-derived n_aware model holds a logistic")
        keys = ("pairs", "mean", "scale", "C")
        params = {**{k: self.params[k] for k in keys if k in self.params}, **self.params["logistic"]}
        return PhaseModel(f"{self.name}: its logistic", "logistic", self.features, self.classes, params, {}, self.provenance)

    def moments(self, x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """An ``n_aware`` model's ``mu(x)``, ``sigma(x)`` and ``tau(x)`` in points (``n_aware_moments``)."""
        return n_aware_moments(self.params, x)

    def _standard(self, x: np.ndarray, part: Mapping[str, Any]) -> np.ndarray:
        return (x - np.asarray(part["mean"], float)) / np.asarray(part["scale"], float)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (columns in ``classes`` order) for a feature matrix ``x``."""
        x = np.atleast_2d(np.asarray(x, float))
        if self.kind == "n_aware":
            mu, sigma, tau = self.moments(x)
            return verdict_probabilities(mu, sigma, tau, int(self.params["seeds"]), float(self.params["t_crit"]))
        if self.kind == "logistic":
            x = expand_pairs(x, self.params.get("pairs", []))
            scores = self._standard(x, self.params) @ np.asarray(self.params["coef"], float).T
            return _softmax(scores + np.asarray(self.params["intercept"], float))
        nodes = self.params
        out = np.empty((len(x), len(self.classes)))
        for i, row in enumerate(x):
            node = 0
            while nodes["left"][node] >= 0:
                go_left = row[nodes["feature"][node]] <= nodes["threshold"][node]
                node = nodes["left"][node] if go_left else nodes["right"][node]
            value = np.asarray(nodes["value"][node], float)
            out[i] = value / value.sum()
        return out

    def predict_outcomes(self, x: np.ndarray) -> list[str]:
        return [self.classes[i] for i in self.probabilities(x).argmax(axis=1)]

    def predict_gain(self, x: np.ndarray) -> np.ndarray:
        """The predicted paired gain (transfer - scratch) in accuracy points."""
        x = np.atleast_2d(np.asarray(x, float))
        if self.kind == "n_aware" and "coef" not in self.gain:  # a file without a gain model: the verdict's mu(x)
            return self.moments(x)[0]
        return self._standard(x, self.gain) @ np.asarray(self.gain["coef"], float) + float(self.gain["intercept"])

    def predict(self, row: Mapping[str, float]) -> dict[str, Any]:
        """The entry a run logs as ``prediction`` for one ``features`` mapping: outcome, class probabilities,
        the gain in points with its 95% interval, the model's name and its held-out agreement, overall and on the
        held-out cells of this prediction's confidence band (``CONFIDENCE_EDGES``; None where not recorded)."""
        x = feature_matrix([row], self.features)
        probabilities = self.probabilities(x)[0]
        gain = float(self.predict_gain(x)[0])
        if "interval_half_width" not in self.gain:  # an n_aware file without a gain model: 1.96 sd of N(mu, tau^2 + sigma^2 / n)
            _, sigma, tau = (float(v[0]) for v in self.moments(x))
            half = 1.959964 * math.sqrt(tau**2 + sigma**2 / int(self.params["seeds"]))
        else:
            half = float(self.gain["interval_half_width"])
        held = self.provenance.get("held_out", {})
        confidence = float(probabilities.max())
        bands = held.get("by_confidence") or []
        band = bands[confidence_band(confidence)] if len(bands) == len(CONFIDENCE_EDGES) - 1 else {}
        return {
            "outcome": self.classes[int(probabilities.argmax())],
            **{f"p_{c}": round(float(p), 6) for c, p in zip(self.classes, probabilities)},
            "gain": round(gain, 4),
            "gain_low": round(gain - half, 4),
            "gain_high": round(gain + half, 4),
            "model": self.name,
            **({"seeds": self.seeds} if self.kind == "n_aware" else {}),
            "held_out_agreement": float(held["agreement"]) if "agreement" in held else None,
            "confidence": round(confidence, 6),
            "held_out_agreement_at_confidence": band["agreeing"] / band["cells"] if band.get("cells") else None,
            "held_out_cells_at_confidence": int(band["cells"]) if band else None,
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "features": list(self.features),
            "classes": list(self.classes),
            "params": self.params,
            "gain": self.gain,
            "provenance": self.provenance,
        }


def from_dict(raw: Mapping[str, Any]) -> PhaseModel:
    return PhaseModel(
        name=str(raw["name"]),
        kind=str(raw["kind"]),
        features=tuple(raw["features"]),
        classes=tuple(raw["classes"]),
        params=dict(raw["params"]),
        gain=dict(raw["gain"]),
        provenance=dict(raw.get("provenance") or {}),
    )


def save(model: PhaseModel, path: str | Path, header: str = "") -> None:
    """Write ``model`` as YAML (``header``: comment lines put on top)."""
    import yaml

    text = yaml.safe_dump(model.as_dict(), sort_keys=False, default_flow_style=None, width=120)
    Path(path).write_text(header + text)


@functools.lru_cache(maxsize=8)
def _load_cached(path: str, mtime: float) -> PhaseModel:
    import yaml

    return from_dict(yaml.safe_load(Path(path).read_text()))


def load(path: str | Path) -> PhaseModel:
    """The phase model of a YAML file (cached while the file is unchanged; keyed by its absolute path, which unlike
    ``Path.resolve`` needs no system call per path component: a grid asks once a setting)."""
    file = Path(path)
    return _load_cached(os.path.abspath(file), file.stat().st_mtime)


def resolve_path(path: str | Path = PHASE_MODEL_FILE) -> Path:
    """``path`` itself when absolute, else relative to the config folder ptlab reads (``ptlab.paths``)."""
    from ptlab.paths import config_dir

    file = Path(path)
    return file if file.is_absolute() else Path(config_dir()) / file


def phase_prediction(row: Mapping[str, float], path: str | Path | None = None) -> dict[str, Any] | None:
    """``PhaseModel.predict`` of the model at ``path`` (default ``conf/phase_model.yaml``); None when there is none."""
    file = Path(path) if path is not None else resolve_path()
    if not file.is_file():
        return None
    return load(file).predict(row)

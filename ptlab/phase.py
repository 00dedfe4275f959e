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
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
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
KINDS = ("logistic", "tree")


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
        pairs = self.params.get("pairs", []) if self.kind == "logistic" else []
        if any(len(p) != 2 or not all(0 <= int(i) < len(self.features) for i in p) for p in pairs):
            raise ValueError(f"phase model pairs {pairs}: index pairs into its {len(self.features)} features")

    def _standard(self, x: np.ndarray, part: Mapping[str, Any]) -> np.ndarray:
        return (x - np.asarray(part["mean"], float)) / np.asarray(part["scale"], float)

    def probabilities(self, x: np.ndarray) -> np.ndarray:
        """Class probabilities (columns in ``classes`` order) for a feature matrix ``x``."""
        x = np.atleast_2d(np.asarray(x, float))
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
        return self._standard(x, self.gain) @ np.asarray(self.gain["coef"], float) + float(self.gain["intercept"])

    def predict(self, row: Mapping[str, float]) -> dict[str, Any]:
        """The entry a run logs as ``prediction`` for one ``features`` mapping: outcome, class probabilities,
        the gain in points with its 95% interval, the model's name and its held-out agreement."""
        x = feature_matrix([row], self.features)
        probabilities = self.probabilities(x)[0]
        gain = float(self.predict_gain(x)[0])
        half = float(self.gain["interval_half_width"])
        held = self.provenance.get("held_out", {})
        return {
            "outcome": self.classes[int(probabilities.argmax())],
            **{f"p_{c}": round(float(p), 6) for c, p in zip(self.classes, probabilities)},
            "gain": round(gain, 4),
            "gain_low": round(gain - half, 4),
            "gain_high": round(gain + half, 4),
            "model": self.name,
            "held_out_agreement": float(held["agreement"]) if "agreement" in held else None,
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

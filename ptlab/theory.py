"""What the paper's theorems predict for a synthetic config (docs/design.md section 2).

Notation: ``n = max(N1, N2)``, ``U = ||u||``, ``S2 = ||u + v2|| = sqrt(U^2 + ||v2||^2)`` (u and v2 are
orthogonal), ``s1 = sigma_p1``, ``s2 = sigma_p2``.

- Transfer threshold term (Theorem 4.2):
  ``D* = (alpha^2 N1^2 U^4 / s1^4 + N2^2 S2^4 / s2^4) / (alpha^2 s2^2 N1 / s1^2 + N2)``;
  ``d <= C1 D*``: near Bayes-optimal test error with transfer, ``d >= C3 D*``: error >= 0.1.
- Scratch (Theorem 4.3): near-optimal if ``N2 S2^4 >= C1' s2^4 d``, sub-optimal if ``<= C3' s2^4 d``;
  i.e. the scratch threshold is ``N2 S2^4 / s2^4`` in units of d.
- ``Gamma = alpha^2 N1 U^4 / (s1^2 s2^2 d)`` (Proposition 4.4): with scratch not near-optimal, ``Gamma >= C_gamma``
  means transfer lifts the error to near-optimal.
- Negative transfer (Proposition 4.4): ``S2^2 / U^2 >= C_ratio alpha N1 s2^2 / (N2 s1^2)`` and
  ``alpha N1 s2^2 / (N2 s1^2) >= C4`` (a constant on each inequality of the paper's chain).
- Condition 4.1 (the theorems' assumptions): ``d >= max(n^2, n S^2 / s^2)`` up to constants and logs,
  for both tasks (``S = ||u + v||``, the v's have one norm); shown beside the label, never used by it.

The outcome (``predict_outcome``) is derived only where the statements determine it, in this order:
the negative-transfer chain (negative_transfer); one model near-optimal and the other sub-optimal
(Theorems 4.2 and 4.3: transfer_helps or negative_transfer); Proposition 4.4's Gamma rule where scratch
is not near-optimal and Theorem 4.2 does not call transfer sub-optimal (transfer_helps); both
near-optimal, i.e. both at the Bayes error (no_difference); anything else is ``undetermined``.

The constants are unknown; they are parameters (``conf/theory``: the paper's 1s, or values fitted by
``python -m ptlab.report calibrate``). Edge cases never raise: ``alpha = 0``
or ``u = 0`` make the terms they multiply exactly 0 (so ``D*`` with ``alpha = 0`` is the scratch
threshold); a zero noise level is read as the limit ``s -> 0``: ``D*`` is ``inf`` for ``s1 = 0`` with
``alpha U > 0`` and tends to 0 for ``s1 = 0`` with ``u = 0``; a ratio that is ``0 / 0`` in the limit too
(``S2 = 0`` with ``s2 = 0``: no target signal and no target noise; the negative-transfer ratio with
``u = 0`` and ``s1 = 0``) is ``nan``. MLflow stores an infinite metric as the largest float.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields, replace
from typing import TYPE_CHECKING, Any

from ptlab.config import TheorySchema

if TYPE_CHECKING:
    from ptlab.spec import PipelineSpec

NEAR_OPTIMAL, SUB_OPTIMAL, UNDETERMINED = "near_optimal", "sub_optimal", "undetermined"
TRANSFER_HELPS, NO_DIFFERENCE, NEGATIVE_TRANSFER = "transfer_helps", "no_difference", "negative_transfer"
OUTCOMES = (TRANSFER_HELPS, NO_DIFFERENCE, NEGATIVE_TRANSFER, UNDETERMINED)


def divide(numerator: float, denominator: float) -> float:
    """``numerator / denominator`` with IEEE limits: ``x / 0 = +-inf`` for ``x != 0``, ``0 / 0 = nan``."""
    if denominator != 0:
        return numerator / denominator
    if numerator == 0 or math.isnan(numerator):
        return math.nan
    return math.copysign(math.inf, numerator)


def _product(*factors: float) -> float:
    """A product that is exactly 0 when any factor is 0 (``0 * inf = 0`` here, not nan)."""
    return 0.0 if any(f == 0 for f in factors) else math.prod(factors)


def target_signal_norm(u_norm: float, v_norm: float) -> float:
    """``S2 = ||u + v2|| = sqrt(||u||^2 + ||v2||^2)`` (u and v2 are orthogonal)."""
    return math.hypot(u_norm, v_norm)


def threshold_term(alpha: float, n1: int, n2: int, u_norm: float, s2_norm: float, sigma_p1: float, sigma_p2: float) -> float:
    """The transfer threshold term ``D*`` of Theorem 4.2 (``s2_norm`` is ``S2 = ||u + v2||``)."""
    source_signal = _product(alpha**2, n1**2, u_norm**4, divide(1.0, sigma_p1**4))
    target_signal = n2**2 * divide(s2_norm**4, sigma_p2**4)
    source_noise = _product(alpha**2, n1, sigma_p2**2, divide(1.0, sigma_p1**2))
    if math.isinf(source_signal) and math.isinf(source_noise):
        # s1 -> 0 with alpha U > 0: the numerator grows as s1^-4, the denominator as s1^-2.
        return math.inf
    return divide(source_signal + target_signal, source_noise + n2)


def scratch_threshold(n2: int, s2_norm: float, sigma_p2: float) -> float:
    """``N2 S2^4 / s2^4``: Theorem 4.3 puts scratch near-optimal for ``d <= that / C1'``."""
    return n2 * divide(s2_norm**4, sigma_p2**4)


def gamma(alpha: float, n1: int, u_norm: float, sigma_p1: float, sigma_p2: float, d: int) -> float:
    """``Gamma = alpha^2 N1 U^4 / (s1^2 s2^2 d)`` of Proposition 4.4 (0 when alpha or u is 0)."""
    return _product(alpha**2, n1, u_norm**4, divide(1.0, sigma_p1**2 * sigma_p2**2 * d))


def signal_ratio(u_norm: float, s2_norm: float) -> float:
    """``S2^2 / U^2``: how little of the target signal is universal (inf when u = 0)."""
    return divide(s2_norm**2, u_norm**2)


def source_strength(alpha: float, n1: int, n2: int, sigma_p1: float, sigma_p2: float) -> float:
    """``alpha N1 s2^2 / (N2 s1^2)``: how much the transferred filters weigh against the target data."""
    return _product(alpha, n1, sigma_p2**2, divide(1.0, n2 * sigma_p1**2))


def negative_transfer_ratio(
    alpha: float, n1: int, n2: int, u_norm: float, s2_norm: float, sigma_p1: float, sigma_p2: float
) -> float:
    """``(S2^2 / U^2) / (alpha N1 s2^2 / (N2 s1^2))``: >= 1 is the first inequality of the negative
    transfer condition (inf when u = 0 or alpha = 0)."""
    return divide(signal_ratio(u_norm, s2_norm), source_strength(alpha, n1, n2, sigma_p1, sigma_p2))


def regime(d: float, threshold: float, c_near: float = 1.0, c_sub: float = 1.0) -> str:
    """``near_optimal`` if ``d <= c_near * threshold``, ``sub_optimal`` if ``d >= c_sub * threshold``
    (near wins a tie), ``undetermined`` between the two or when the threshold is nan."""
    if math.isnan(threshold):
        return UNDETERMINED
    if d <= _product(c_near, threshold):
        return NEAR_OPTIMAL
    if d >= _product(c_sub, threshold):
        return SUB_OPTIMAL
    return UNDETERMINED


TheoryConstants = TheorySchema
"""The unknown constants of Theorems 4.2, 4.3 and Proposition 4.4 (the config schema; ``conf/theory/``
holds the paper's uncalibrated 1s and the values fitted by ``python -m ptlab.report calibrate``)."""
CONSTANT_KEYS = ("c1", "c3", "c1_prime", "c3_prime", "c4", "c_gamma", "c_ratio")

RULE_CHAIN, RULE_REGIMES, RULE_GAMMA, RULE_BOTH_NEAR, RULE_NONE = (
    "negative_transfer_chain",
    "regimes",
    "gamma",
    "both_near_optimal",
    "none",
)
"""Which statement set the outcome (``TheoryPrediction.rule``)."""


@dataclass(frozen=True)
class Setting:
    """The inputs of the theory for one synthetic config (alpha is 0 without transfer)."""

    d: int
    n1: int
    n2: int
    u_norm: float
    v_norm: float
    sigma_p1: float
    sigma_p2: float
    alpha: float


def condition_4_1_ratio(setting: Setting) -> float:
    """``d / max(n^2, n S1^2 / s1^2, n S2^2 / s2^2)``: Condition 4.1 asks for >= 1 (up to constants and
    logarithms); ``S1 = S2`` here as both tasks' v has the norm ``v_norm``."""
    n = max(setting.n1, setting.n2)
    s = target_signal_norm(setting.u_norm, setting.v_norm)
    need = max(n**2, n * divide(s**2, setting.sigma_p1**2), n * divide(s**2, setting.sigma_p2**2))
    return divide(setting.d, need)


@dataclass(frozen=True)
class TheoryPrediction:
    """Every theory quantity of one config and the predicted outcome of transfer against scratch.

    ``prediction`` is the fitted phase model's (``ptlab.phase``), carried beside the theory; it is not
    one of the theory's fields (``as_dict``, ``metrics`` and ``labels`` leave it out)."""

    n: int
    threshold_term: float
    d_over_threshold: float
    scratch_threshold: float
    d_over_scratch_threshold: float
    gamma: float
    signal_ratio: float
    source_strength: float
    negative_transfer_ratio: float
    condition_4_1_ratio: float
    condition_4_1: bool
    transfer_regime: str
    scratch_regime: str
    negative_transfer_condition: bool
    rule: str
    predicted: str
    prediction: dict[str, Any] | None = field(default=None, compare=False)

    def as_dict(self) -> dict[str, Any]:
        """The theory's fields (scalars), without ``prediction``: a shallow read, not ``asdict``'s deep copy of the
        prediction it then drops (a grid of 100,000 cells reads it three times a cell)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "prediction"}

    def metrics(self) -> dict[str, float]:
        """The numeric fields (booleans as 0/1), for MLflow metrics."""
        return {k: float(v) for k, v in self.as_dict().items() if not isinstance(v, str)}

    def labels(self) -> dict[str, str]:
        """The categorical fields, for MLflow params."""
        return {k: v for k, v in self.as_dict().items() if isinstance(v, str)}


def outcome_and_rule(
    transfer_regime: str, scratch_regime: str, negative_condition: bool, gamma_large: bool = False
) -> tuple[str, str]:
    """The outcome and the statement that sets it (module docstring: the order of the rules)."""
    if negative_condition:
        return NEGATIVE_TRANSFER, RULE_CHAIN
    if {transfer_regime, scratch_regime} == {NEAR_OPTIMAL, SUB_OPTIMAL}:
        return (TRANSFER_HELPS if transfer_regime == NEAR_OPTIMAL else NEGATIVE_TRANSFER), RULE_REGIMES
    if gamma_large and scratch_regime != NEAR_OPTIMAL and transfer_regime != SUB_OPTIMAL:
        return TRANSFER_HELPS, RULE_GAMMA
    if transfer_regime == scratch_regime == NEAR_OPTIMAL:
        return NO_DIFFERENCE, RULE_BOTH_NEAR
    return UNDETERMINED, RULE_NONE


def predict_outcome(transfer_regime: str, scratch_regime: str, negative_condition: bool, gamma_large: bool = False) -> str:
    """Transfer helps / no difference / negative transfer / undetermined (``outcome_and_rule``)."""
    return outcome_and_rule(transfer_regime, scratch_regime, negative_condition, gamma_large)[0]


def predict(
    d: int,
    n1: int,
    n2: int,
    u_norm: float,
    v_norm: float,
    sigma_p1: float,
    sigma_p2: float,
    alpha: float,
    constants: TheoryConstants = TheoryConstants(),
) -> TheoryPrediction:
    """All theory quantities for one synthetic setting."""
    s2_norm = target_signal_norm(u_norm, v_norm)
    d_star = threshold_term(alpha, n1, n2, u_norm, s2_norm, sigma_p1, sigma_p2)
    scratch = scratch_threshold(n2, s2_norm, sigma_p2)
    strength = source_strength(alpha, n1, n2, sigma_p1, sigma_p2)
    ratio = negative_transfer_ratio(alpha, n1, n2, u_norm, s2_norm, sigma_p1, sigma_p2)
    negative = ratio >= constants.c_ratio and strength >= constants.c4
    transfer_regime = regime(d, d_star, constants.c1, constants.c3)
    scratch_regime = regime(d, scratch, constants.c1_prime, constants.c3_prime)
    big_gamma = gamma(alpha, n1, u_norm, sigma_p1, sigma_p2, d)
    outcome, rule = outcome_and_rule(transfer_regime, scratch_regime, negative, big_gamma >= constants.c_gamma)
    condition = condition_4_1_ratio(Setting(d, n1, n2, u_norm, v_norm, sigma_p1, sigma_p2, alpha))
    return TheoryPrediction(
        n=max(n1, n2),
        threshold_term=d_star,
        d_over_threshold=divide(d, d_star),
        scratch_threshold=scratch,
        d_over_scratch_threshold=divide(d, scratch),
        gamma=big_gamma,
        signal_ratio=signal_ratio(u_norm, s2_norm),
        source_strength=strength,
        negative_transfer_ratio=ratio,
        condition_4_1_ratio=condition,
        condition_4_1=bool(condition >= 1),
        transfer_regime=transfer_regime,
        scratch_regime=scratch_regime,
        negative_transfer_condition=negative,
        rule=rule,
        predicted=outcome,
    )


def predict_setting(setting: Setting, constants: TheoryConstants = TheoryConstants()) -> TheoryPrediction:
    """``predict`` for a ``Setting``."""
    return predict(**asdict(setting), constants=constants)


def setting_of(spec: PipelineSpec) -> Setting:
    """The theory's inputs of a pipeline spec (``task``, ``noise``, ``transfer``); without transfer
    (``transfer.kind: none``) alpha is 0, so the transfer model is the scratch model."""
    task, noise, transfer = spec.task, spec.noise, spec.transfer
    alpha = transfer.alpha if transfer.kind != "none" else 0.0
    return Setting(
        d=int(task.d),
        n1=int(task.n1),
        n2=int(task.n2),
        u_norm=float(task.u_norm),
        v_norm=float(task.v_norm),
        sigma_p1=float(noise.sigma_p1),
        sigma_p2=float(noise.sigma_p2),
        alpha=float(alpha),
    )


def constants_of(theory: TheorySchema) -> TheoryConstants:
    """The theory constants of the ``theory`` group."""
    return TheoryConstants(**{k: float(getattr(theory, k)) for k in CONSTANT_KEYS})


def predict_from_spec(spec: PipelineSpec) -> TheoryPrediction:
    """``predict`` for a pipeline spec, with the prediction of the phase model named by ``theory.phase_model``
    attached (``prediction``; None when that is "" or names no file)."""
    from ptlab.phase import features, phase_prediction, resolve_path

    setting = setting_of(spec)
    theory = predict_setting(setting, constants_of(spec.theory))
    path = spec.theory.phase_model
    if not path:
        return theory
    row = features(theory.as_dict(), setting.alpha, setting.n1, setting.n2)
    return replace(theory, prediction=phase_prediction(row, resolve_path(path)))


def phase_features(setting: Setting) -> dict[str, float]:
    """The phase model's inputs (``ptlab.phase.FEATURES``) for one setting."""
    from ptlab.phase import features

    return features(predict_setting(setting).as_dict(), setting.alpha, setting.n1, setting.n2)

"""Transferability scores, computed before downstream training: LogME and LEEP (docs/design.md section 9).

- **LogME** (You et al. 2021, "LogME: Practical Assessment of Pre-trained Models for Transfer Learning"): for
  features ``F`` (n, D) and each class ``c`` the one-vs-rest target ``y_c = 1[y == c]``, the log evidence of the
  Bayesian linear model ``y_c = F m + eps`` with prior ``m ~ N(0, alpha^-1 I)`` and noise ``eps ~ N(0, beta^-1 I)``,
  maximised over ``alpha, beta`` by the paper's fixed-point iteration on the SVD of ``F``, divided by ``n``, averaged
  over the classes. Higher is better; the value is comparable only between features of the same data.
- **LEEP** (Nguyen et al. 2020, "LEEP: A New Measure to Evaluate Transferability of Learned Representations"): from
  the source model's softmax ``theta_i`` over its own (source) labels ``z`` on the target inputs, the empirical joint
  ``P(y, z) = (1/n) sum_i theta_i(z) 1[y_i = y]``, the conditional ``P(y | z) = P(y, z) / P(z)``, and the mean
  log-likelihood of the "expected empirical predictor" ``(1/n) sum_i log sum_z P(y_i | z) theta_i(z)``. At most 0;
  ``-log C`` for uninformative predictions on C balanced classes.

The scores are pure functions of arrays (numpy or torch in, float out; float64 inside). The feature helpers below
run a model in eval mode on the task-2 training inputs without gradients: ``penultimate_features`` reads the input
of the classifier head (any model whose last ``nn.Linear`` is its head: torchvision's ``fc``/``classifier``, timm's
``head`` via ``get_classifier``), ``class_probabilities`` the softmax of its logits.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptlab.seeding import derive_seed

MAX_ITERATIONS = 100
"""Fixed-point iterations of LogME at most (it converges in a handful: You et al. report fewer than 3 on average)."""
TOLERANCE = 1e-6
"""Relative change of ``alpha / beta`` below which the iteration stops."""


def _as_numpy(values: Any, name: str, ndim: int) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
    if array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    return array


def _labels(labels: Any, n: int) -> tuple[np.ndarray, int]:
    """``labels`` as indices 0..C-1 (sorted distinct values) and C; at least two classes, one label per sample."""
    raw = _as_numpy(labels, "labels", 1)
    if len(raw) != n:
        raise ValueError(f"labels has {len(raw)} entries but there are {n} samples")
    classes, index = np.unique(raw, return_inverse=True)
    if len(classes) < 2:
        raise ValueError(f"labels must hold at least 2 classes, got {len(classes)}")
    return index, len(classes)


def _features(features: Any) -> np.ndarray:
    array = _as_numpy(features, "features", 2).astype(np.float64)
    if len(array) < 2:
        raise ValueError(f"features must hold at least 2 samples, got {len(array)}")
    if not np.isfinite(array).all():
        raise ValueError("features must be finite")
    return array


def log_evidence(features: Any, targets: Any, alpha: float, beta: float) -> float:
    """``log p(y | F, alpha, beta)`` of the Bayesian linear model (LogME's eq. 2), not divided by n:
    ``n/2 log beta + D/2 log alpha - n/2 log 2pi - beta/2 ||F m - y||^2 - alpha/2 m'm - 1/2 log det A`` with
    ``A = alpha I + beta F'F`` and the posterior mean ``m = beta A^-1 F'y``."""
    f = _features(features)
    y = _as_numpy(targets, "targets", 1).astype(np.float64)
    if len(y) != len(f):
        raise ValueError(f"targets has {len(y)} entries but features has {len(f)} samples")
    if alpha <= 0 or beta <= 0:
        raise ValueError(f"alpha and beta must be > 0, got {alpha}, {beta}")
    u, sigma, vt = np.linalg.svd(f, full_matrices=False)
    return _evidence(f, y, u, sigma, vt, alpha, beta)[0]


def _evidence(
    f: np.ndarray, y: np.ndarray, u: np.ndarray, sigma: np.ndarray, vt: np.ndarray, alpha: float, beta: float
) -> tuple[float, float]:
    """The log evidence and ``gamma`` (the effective number of parameters) at ``alpha, beta``; the thin SVD
    ``F = U diag(sigma) V'`` gives ``A``'s eigenvalues ``alpha + beta sigma^2`` (and ``alpha`` for the D - rank
    directions that ``F`` does not span)."""
    n, d = f.shape
    s = sigma**2
    m = vt.T @ (beta * sigma / (alpha + beta * s) * (u.T @ y))
    residual = float(np.sum((f @ m - y) ** 2))
    log_det = float(np.sum(np.log(alpha + beta * s))) + (d - len(s)) * np.log(alpha)
    evidence = (
        n / 2 * np.log(beta)
        + d / 2 * np.log(alpha)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * residual
        - alpha / 2 * float(m @ m)
        - log_det / 2
    )
    return float(evidence), float(np.sum(beta * s / (alpha + beta * s)))


def maximise_evidence(features: Any, targets: Any) -> tuple[float, float, float]:
    """LogME's fixed point for one target: from ``alpha = beta = 1`` iterate ``gamma = sum beta s/(alpha + beta s)``,
    ``alpha = gamma / m'm``, ``beta = (n - gamma) / ||F m - y||^2`` (``m`` the posterior mean at the current
    ``alpha, beta``) until ``alpha / beta`` moves by less than ``TOLERANCE`` relatively; returns ``(evidence / n,
    alpha, beta)`` at the fixed point."""
    f = _features(features)
    y = _as_numpy(targets, "targets", 1).astype(np.float64)
    if len(y) != len(f):
        raise ValueError(f"targets has {len(y)} entries but features has {len(f)} samples")
    u, sigma, vt = np.linalg.svd(f, full_matrices=False)
    return _maximise(f, y, u, sigma, vt)


def _maximise(
    f: np.ndarray,
    y: np.ndarray,
    u: np.ndarray,
    sigma: np.ndarray,
    vt: np.ndarray,
) -> tuple[float, float, float]:
    n = len(f)
    s = sigma**2
    projected = u.T @ y
    alpha, beta = 1.0, 1.0
    for _ in range(MAX_ITERATIONS):
        m = vt.T @ (beta * sigma / (alpha + beta * s) * projected)
        gamma = float(np.sum(beta * s / (alpha + beta * s)))
        # a target that F fits exactly (or a zero target) has no finite optimum: keep the last finite pair
        norm, residual = float(m @ m), float(np.sum((f @ m - y) ** 2))
        if norm <= 0 or residual <= 0:
            break
        new_alpha, new_beta = gamma / norm, (n - gamma) / residual
        if not (0 < new_alpha < math.inf and 0 < new_beta < math.inf):
            break  # features so large (or so degenerate) that every sample is fitted: no finite optimum either
        done = abs(new_alpha / new_beta - alpha / beta) <= TOLERANCE * alpha / beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    return _evidence(f, y, u, sigma, vt, alpha, beta)[0] / n, alpha, beta


def logme(features: Any, labels: Any) -> float:
    """LogME of ``features`` (n, D) for class ``labels`` (n,): the mean over classes of the maximised log evidence
    per sample of the one-vs-rest target (You et al. 2021, Algorithm 1). Features are used as given (no centring,
    no bias column), as in the paper."""
    f = _features(features)
    index, classes = _labels(labels, len(f))
    u, sigma, vt = np.linalg.svd(f, full_matrices=False)
    scores = [_maximise(f, (index == c).astype(np.float64), u, sigma, vt)[0] for c in range(classes)]
    return float(np.mean(scores))


def leep(source_probabilities: Any, labels: Any) -> float:
    """LEEP of a source model whose softmax over its Z source labels on the n target inputs is
    ``source_probabilities`` (n, Z), for target ``labels`` (n,) (Nguyen et al. 2020, eq. 2): the source model's
    outputs themselves, not features of the downstream model, as the paper defines it."""
    theta = _as_numpy(source_probabilities, "source_probabilities", 2).astype(np.float64)
    index, classes = _labels(labels, len(theta))
    if not np.isfinite(theta).all() or (theta < 0).any() or not np.allclose(theta.sum(axis=1), 1.0, atol=1e-4):
        raise ValueError("source_probabilities must be finite, >= 0, and sum to 1 in each row")
    n = len(theta)
    joint = np.zeros((classes, theta.shape[1]))
    np.add.at(joint, index, theta / n)
    marginal = joint.sum(axis=0)
    conditional = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)
    expected = np.sum(theta * conditional[index], axis=1)
    return float(np.mean(np.log(expected)))


def scored(score: Callable[[Any, Any], float], values: Tensor, labels: Any) -> float:
    """``score(values, labels)``, or NaN where no score is defined: ``values`` not finite (a diverged model's
    features; the pipeline reports the divergence itself) or ``labels`` of one class (a small task-2 sample, with
    label noise, may draw one: LogME's one-vs-rest targets and LEEP need two). A summary writes the NaN as ``null``;
    the run goes on."""
    if not bool(torch.isfinite(values).all()) or len(np.unique(_as_numpy(labels, "labels", 1))) < 2:
        return float("nan")
    return score(values, labels)


def score_subset(n: int, max_samples: int, seed: int) -> Tensor:
    """The sorted indices of at most ``max_samples`` of ``n`` samples, drawn from the ``"transferability"`` stream of
    ``seed`` (all of them when ``n <= max_samples``): the same subset for every model a pipeline scores."""
    if n <= max_samples:
        return torch.arange(n)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(derive_seed(seed, "transferability")))
    return order[:max_samples].sort().values


def classifier_head(model: nn.Module) -> nn.Linear:
    """The classifier head of ``model``: timm's ``get_classifier()`` when it is an ``nn.Linear``, else the last
    ``nn.Linear`` the model registers (torchvision's ``fc`` and ``classifier``); a model without one is rejected."""
    getter = getattr(model, "get_classifier", None)
    head = getter() if callable(getter) else None
    if isinstance(head, nn.Linear):
        return head
    linears = [module for module in model.modules() if isinstance(module, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear classifier head to read features from")
    return linears[-1]


def _batched(
    model: nn.Module,
    x: Tensor,
    batch_size: int,
    input_size: int | None,
    device: torch.device | str,
    read: Callable[[Tensor], Tensor],
) -> Tensor:
    """``read(batch)`` over ``x`` in eval mode without gradients, resized to ``input_size`` as ``ImageClassifier``
    does; the model's train/eval mode and device are restored."""
    was_training = model.training
    home = next(model.parameters()).device
    model.eval().to(device)
    out = []
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                batch = x[start : start + batch_size].to(device)
                if input_size and batch.shape[-1] != input_size:
                    batch = F.interpolate(batch, size=(input_size, input_size), mode="bilinear", align_corners=False)
                out.append(read(batch).float().cpu())
    finally:
        model.train(was_training).to(home)
    return torch.cat(out)


def penultimate_features(
    model: nn.Module, x: Tensor, batch_size: int = 256, input_size: int | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """The input of ``classifier_head(model)`` for every input in ``x`` (N, D): what LogME scores."""
    head = classifier_head(model)
    seen: list[Tensor] = []
    hook = head.register_forward_hook(lambda _module, inputs, _output: seen.append(inputs[0].flatten(1)))

    def read(batch: Tensor) -> Tensor:
        seen.clear()
        model(batch)
        return seen[-1]

    try:
        return _batched(model, x, batch_size, input_size, device, read)
    finally:
        hook.remove()


def class_probabilities(
    model: nn.Module, x: Tensor, batch_size: int = 256, input_size: int | None = None, device: torch.device | str = "cpu"
) -> Tensor:
    """The softmax of ``model``'s logits for every input in ``x`` (N, classes): what LEEP reads."""
    return _batched(model, x, batch_size, input_size, device, lambda batch: model(batch).float().softmax(dim=-1))

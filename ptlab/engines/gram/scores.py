"""Transferability scores of a gram-engine cell, exact from the responses it holds at the downstream stage's start.

The two-layer CNN's hidden activations on a task-2 training sample are ``red_p sigma(<w, x_p> + b)`` over its two
patches: its noise patch ``xi_i`` (response ``<w, xi_i>``, column ``3 + i`` of the stage-start responses) and its
signal patch ``c_i s`` with ``c_i`` the clean label and ``s = u + v2`` (response ``c_i <w, s>``, ``<w, s>`` from the
responses along the unit directions). So the features LogME reads and the upstream margin LEEP reads come out of
the responses exactly, as ``ptlab.pipeline.transferability`` computes them in d-space (a test checks both agree).

A batched sweep scores a whole step block at once (``block_scores``): the features of every cell in one tensor
program, LogME's SVDs and fixed-point iterations as stacked numpy operations (each cell iterates until its own
stop, as ``ptlab.transfer.transferability.logme``), LEEP likewise: the same operations on each cell's numbers, so
the scores equal the cell-by-cell functions' (a test compares them bitwise); the per-cell path costs ~1 ms a cell
in Python overhead, more than a kou2023 cell's training.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from ptlab.models.two_layer_cnn import ModelForm
from ptlab.transfer.transferability import MAX_ITERATIONS, TOLERANCE, leep, logme, score_subset, scored


def hidden_from_responses(start: Tensor, signal: Tensor, clean: Tensor, form: ModelForm, bias: Tensor | None = None) -> Tensor:
    """The hidden activations (N, 2m) from the stage-start responses ``start`` (2m, 3 + N) along [b_u, b_v1, b_v2,
    xi_1..xi_N], the task signal's coefficients ``signal`` (3,) along the unit directions and the clean labels."""
    along_signal = start[:, :3] @ signal  # <w, s>, (2m,)
    noise = start[:, 3:].T  # <w, xi_i>, (N, 2m)
    signal_patch = clean[:, None].to(start.dtype) * along_signal[None, :]
    shift = 0 if bias is None else bias[None, :]
    sigma = form.sigma
    return form.patch_factor * (sigma(noise + shift) + sigma(signal_patch + shift))


def margin_from_hidden(hidden: Tensor, form: ModelForm) -> Tensor:
    """The margin ``F_{+1} - F_{-1}`` (..., N) from the hidden activations (..., N, 2m)."""
    width = hidden.shape[-1] // 2
    return (hidden[..., :width].sum(-1) - hidden[..., width:].sum(-1)) / form.filter_divisor(width)


EXACT_ACTIVATIONS = ("relu", "leaky_relu")
"""Activations made of exactly rounded operations only, whose batched features equal the cell-by-cell ones bitwise
(a transcendental such as ``relu_q``'s power is rounded differently by torch's vectorised loop and its scalar tail,
so the position of an element in the call matters)."""


def batch_hidden(start: Tensor, signal: Tensor, clean: Tensor, form: ModelForm, bias: Tensor | None = None) -> Tensor:
    """``hidden_from_responses`` of B cells (``start`` (B, 2m, 3 + N), ``signal`` (B, 3), ``clean`` (B, N), ``bias``
    (B, 2m)): (B, N, 2m), each cell's in the memory layout ``hidden_from_responses`` gives it (the layout decides the
    order of later sums)."""
    along_signal = (start[..., :3] @ signal[..., None])[..., 0]  # <w, s>, (B, 2m)
    noise = start[..., 3:].transpose(-1, -2)  # <w, xi_i>, (B, N, 2m)
    signal_patch = clean[..., None].to(start.dtype) * along_signal[..., None, :]
    shift = 0 if bias is None else bias[..., None, :]
    sigma = form.sigma
    return form.patch_factor * (sigma(noise + shift) + sigma(signal_patch + shift))


def _vector_products(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """``a[i] @ b[i]`` for stacked matrices (B, p, q) and vectors (B, q): numpy's matmul of each pair, as ``a @ b``."""
    return np.matmul(a, b[..., None])[..., 0]


def _batch_evidence(
    f: np.ndarray, y: np.ndarray, u: np.ndarray, sigma: np.ndarray, vt: np.ndarray, alpha: np.ndarray, beta: np.ndarray
) -> np.ndarray:
    """``transferability._evidence`` of each cell (log evidence at its ``alpha, beta``), the same operations stacked."""
    n, d = f.shape[-2:]
    s = sigma**2
    a, b = alpha[:, None], beta[:, None]
    m = _vector_products(vt.transpose(0, 2, 1), b * sigma / (a + b * s) * _vector_products(u.transpose(0, 2, 1), y))
    residual = np.sum((_vector_products(f, m) - y) ** 2, axis=-1)
    log_det = np.sum(np.log(a + b * s), axis=-1) + (d - s.shape[-1]) * np.log(alpha)
    norm = np.matmul(m[:, None, :], m[:, :, None])[:, 0, 0]
    return (
        n / 2 * np.log(beta)
        + d / 2 * np.log(alpha)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * residual
        - alpha / 2 * norm
        - log_det / 2
    )


def _batch_maximise(f: np.ndarray, y: np.ndarray, u: np.ndarray, sigma: np.ndarray, vt: np.ndarray) -> np.ndarray:
    """``transferability._maximise`` of each cell (the per-sample log evidence at its fixed point): every cell
    iterates until its own stop, with the same operations on its numbers."""
    cells, n = f.shape[:2]
    s = sigma**2
    projected = _vector_products(u.transpose(0, 2, 1), y)
    alpha, beta = np.ones(cells), np.ones(cells)
    active = np.arange(cells)
    with np.errstate(divide="ignore", invalid="ignore"):
        for _ in range(MAX_ITERATIONS):
            if not len(active):
                break
            a, b = alpha[active, None], beta[active, None]
            ss, sg = s[active], sigma[active]
            m = _vector_products(vt[active].transpose(0, 2, 1), b * sg / (a + b * ss) * projected[active])
            gamma = np.sum(b * ss / (a + b * ss), axis=-1)
            norm = np.matmul(m[:, None, :], m[:, :, None])[:, 0, 0]
            residual = np.sum((_vector_products(f[active], m) - y[active]) ** 2, axis=-1)
            # a target that F fits exactly (or a zero target) has no finite optimum: keep the last finite pair
            stop = (norm <= 0) | (residual <= 0)
            new_alpha, new_beta = gamma / norm, (n - gamma) / residual
            a, b = a[:, 0], b[:, 0]
            done = np.abs(new_alpha / new_beta - a / b) <= TOLERANCE * a / b
            moved = active[~stop]
            alpha[moved], beta[moved] = new_alpha[~stop], new_beta[~stop]
            active = active[~(stop | done)]
    return _batch_evidence(f, y, u, sigma, vt, alpha, beta) / n


def batch_logme(features: np.ndarray, index: np.ndarray, classes: int) -> np.ndarray:
    """``logme`` of each cell's features (B, n, D) (float64) for its class indices (B, n) in ``0..classes - 1``."""
    u, sigma, vt = np.linalg.svd(features, full_matrices=False)
    scores = [_batch_maximise(features, (index == c).astype(np.float64), u, sigma, vt) for c in range(classes)]
    return np.mean(np.stack(scores), axis=0)


def batch_leep(theta: np.ndarray, index: np.ndarray, classes: int) -> np.ndarray:
    """``leep`` of each cell's source probabilities (B, n, Z) (float64) for its class indices (B, n); the joint
    accumulated in sample order with ``np.add.at``, as ``leep`` does."""
    cells, n, z = theta.shape
    joint = np.zeros((cells, classes, z))
    np.add.at(joint, (np.arange(cells)[:, None], index), theta / n)
    marginal = joint.sum(axis=1, keepdims=True)
    conditional = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)
    expected = np.sum(theta * conditional[np.arange(cells)[:, None], index], axis=-1)
    return np.mean(np.log(expected), axis=-1)


def _class_indices(labels: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """Each row's labels as indices into the classes of all rows, the class count, and which rows hold every class
    (for those, the indices are what ``np.unique(row, return_inverse=True)`` gives, as ``logme`` and ``leep`` read)."""
    classes = np.unique(labels)
    index = np.searchsorted(classes, labels)
    complete = np.ones(len(labels), dtype=bool)
    for c in range(len(classes)):
        complete &= (index == c).any(axis=-1)
    return index, len(classes), complete


def block_scores(
    seeds: Sequence[int],
    max_samples: Sequence[int],
    signal: Tensor,
    clean: Tensor,
    y: Tensor,
    form: ModelForm,
    scratch: Tensor,
    scratch_bias: Tensor | None = None,
    transfer: Tensor | None = None,
    transfer_bias: Tensor | None = None,
    upstream: Tensor | None = None,
    upstream_bias: Tensor | None = None,
    upstream_form: ModelForm | None = None,
) -> list[dict[str, float]]:
    """``cell_scores`` of B cells at once: the same arguments stacked along a first dimension (``signal`` (B, 3),
    ``clean`` and ``y`` (B, N), responses (B, 2m, 3 + N), biases (B, 2m)), ``seeds`` and ``max_samples`` per cell.
    Cells are scored together where their subsets have one size and their labels every class; the rest (a subset
    with one class: NaN, as alone) cell by cell, and every cell by ``cell_scores`` where an activation is not in
    ``EXACT_ACTIVATIONS``."""
    forms = [form, upstream_form or form] if transfer is not None and upstream is not None else [form]
    if any(f.activation not in EXACT_ACTIVATIONS for f in forms):
        return [
            cell_scores(
                int(seed),
                int(k),
                signal[b],
                clean[b],
                y[b],
                form,
                scratch[b],
                *(None if v is None else v[b] for v in (scratch_bias, transfer, transfer_bias, upstream, upstream_bias)),
                upstream_form=upstream_form,
            )
            for b, (seed, k) in enumerate(zip(seeds, max_samples))
        ]
    keeps = [score_subset(y.shape[-1], int(k), int(seed)) for seed, k in zip(seeds, max_samples)]
    out: list[dict[str, float]] = [{} for _ in keeps]
    by_size: dict[int, list[int]] = {}
    for position, keep in enumerate(keeps):
        by_size.setdefault(len(keep), []).append(position)
    for size, positions in by_size.items():
        rows = torch.tensor(positions)
        keep = torch.stack([keeps[p] for p in positions])  # (b, k)
        columns = torch.cat([torch.arange(3).expand(len(positions), 3), 3 + keep], dim=1)
        kept_clean, labels = clean[rows].gather(1, keep), y[rows].gather(1, keep).numpy()

        def hidden(start: Tensor, bias: Tensor | None, model_form: ModelForm) -> Tensor:
            picked = start[rows].gather(2, columns[:, None, :].expand(-1, start.shape[1], -1))  # noqa: B023 (used at once)
            return batch_hidden(picked, signal[rows], kept_clean, model_form, None if bias is None else bias[rows])  # noqa: B023

        features: dict[str, Tensor] = {}
        if transfer is not None and upstream is not None:
            features["logme"] = hidden(transfer, transfer_bias, form)
            margin = margin_from_hidden(hidden(upstream, upstream_bias, upstream_form or form), upstream_form or form)
            # the sigmoid cell by cell: torch rounds it differently in its vectorised loop and its scalar tail
            features["leep"] = torch.stack([torch.stack([torch.sigmoid(-row), torch.sigmoid(row)], dim=1) for row in margin])
        features["logme_scratch"] = hidden(scratch, scratch_bias, form)
        for name, values in features.items():
            for position, score in zip(positions, _named_scores(name, values, labels)):
                out[position][name] = score
        for position in positions:
            out[position]["samples"] = size
    return out


def _named_scores(name: str, values: Tensor, labels: np.ndarray) -> list[float]:
    """Score ``name`` (logme, leep or logme_scratch) of each cell's ``values`` (B, n, ...) for its ``labels`` (B, n):
    batched where the values are finite (and probabilities, for LEEP) and the labels hold every class, else as
    ``scored`` gives it alone (NaN for a diverged model or labels of one class)."""
    index, classes, complete = _class_indices(labels)
    finite = torch.isfinite(values).flatten(1).all(1).numpy()
    array = values.detach().cpu().numpy().astype(np.float64)
    batched = finite & complete
    if name == "leep":
        batched &= (array >= 0).all(axis=(1, 2)) & np.isclose(array.sum(axis=-1), 1.0, atol=1e-4).all(axis=-1)
    together = np.flatnonzero(batched)
    scores = np.full(len(values), np.nan)
    if len(together):
        scores[together] = (batch_leep if name == "leep" else batch_logme)(array[together], index[together], classes)
    return [
        float(scores[b]) if batched[b] else scored(leep if name == "leep" else logme, values[b], labels[b])
        for b in range(len(values))
    ]


def cell_scores(
    seed: int,
    max_samples: int,
    signal: Tensor,
    clean: Tensor,
    y: Tensor,
    form: ModelForm,
    scratch: Tensor,
    scratch_bias: Tensor | None = None,
    transfer: Tensor | None = None,
    transfer_bias: Tensor | None = None,
    upstream: Tensor | None = None,
    upstream_bias: Tensor | None = None,
    upstream_form: ModelForm | None = None,
) -> dict[str, float]:
    """``logme`` (transfer stage start), ``leep`` (the trained upstream model's 2-class softmax, ``sigmoid`` of its
    margin) and ``logme_scratch`` (scratch stage start) on the seeded subset of at most ``max_samples`` task-2
    training samples, and ``samples``; ``transfer`` and ``upstream`` (responses as ``scratch``'s) ``None`` without
    transfer. A diverged upstream gives NaN scores (``scored``); the cell reports its divergence."""
    keep = score_subset(len(y), max_samples, seed)
    clean, y = clean[keep], y[keep]

    def hidden(start: Tensor, bias: Tensor | None, model_form: ModelForm) -> Tensor:
        return hidden_from_responses(start[:, torch.cat([torch.arange(3), 3 + keep])], signal, clean, model_form, bias)

    scores: dict[str, float] = {}
    if transfer is not None and upstream is not None:
        scores["logme"] = scored(logme, hidden(transfer, transfer_bias, form), y)
        margin = margin_from_hidden(hidden(upstream, upstream_bias, upstream_form or form), upstream_form or form)
        scores["leep"] = scored(leep, torch.stack([torch.sigmoid(-margin), torch.sigmoid(margin)], dim=1), y)
    scores["logme_scratch"] = scored(logme, hidden(scratch, scratch_bias, form), y)
    return {**scores, "samples": len(keep)}

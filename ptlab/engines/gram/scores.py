"""Transferability scores of a gram-engine cell, exact from the responses it holds at the downstream stage's start.

The two-layer CNN's hidden activations on a task-2 training sample are ``red_p sigma(<w, x_p> + b)`` over its two
patches: its noise patch ``xi_i`` (response ``<w, xi_i>``, column ``3 + i`` of the stage-start responses) and its
signal patch ``c_i s`` with ``c_i`` the clean label and ``s = u + v2`` (response ``c_i <w, s>``, ``<w, s>`` from the
responses along the unit directions). So the features LogME reads and the upstream margin LEEP reads come out of
the responses exactly, as ``ptlab.pipeline.transferability`` computes them in d-space (a test checks both agree).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ptlab.models.two_layer_cnn import ModelForm
from ptlab.transfer.transferability import leep, logme, score_subset, scored


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
    """The margin ``F_{+1} - F_{-1}`` (N,) from the hidden activations (N, 2m)."""
    width = hidden.shape[1] // 2
    return (hidden[:, :width].sum(1) - hidden[:, width:].sum(1)) / form.filter_divisor(width)


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

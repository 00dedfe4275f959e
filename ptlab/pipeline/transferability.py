"""Transferability scores of a pipeline, computed after the transfer and before downstream training
(``transferability.enabled``; docs/design.md section 9).

On at most ``transferability.max_samples`` task-2 training samples (a seeded subset, the same for every stage):

- ``logme``: LogME of the transferred-but-untrained downstream model's penultimate features (image models: the input
  of the classifier head; the two-layer CNN: its 2m hidden activations reduced over the two patches);
- ``logme_scratch``: the same of the fresh downstream model without transfer (the scratch stage's init), the
  reference that gives ``logme`` its meaning;
- ``leep``: LEEP of the upstream (source) model's softmax over its task-1 classes on the task-2 inputs (the paper's
  definition; the two-layer CNN's two scores ``F_{+1}, F_{-1}`` as a 2-class softmax, i.e. ``sigmoid`` of the margin).

The transfer is applied to a copy of the downstream model (the stage then applies it again, identically, to the
model it trains). Scores are logged as ``transferability/<name>`` metrics on the parent run and returned for
``summary.json``'s ``transferability`` entry.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ptlab.tracking.base import Tracker
from ptlab.transfer.apply import Transfer
from ptlab.transfer.transferability import (
    class_probabilities,
    leep,
    logme,
    penultimate_features,
    score_subset,
    scored,
)

if TYPE_CHECKING:
    from ptlab.spec import PipelineSpec

log = logging.getLogger("ptlab")


def enabled(spec: PipelineSpec) -> bool:
    """Whether the spec asks for transferability scores (default: yes)."""
    return bool(spec.transferability.enabled)


def score_device(gpu: bool) -> torch.device:
    """Where the image models are scored: the rank's own GPU (``LOCAL_RANK`` under DDP) on a GPU run, else the CPU."""
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if gpu else torch.device("cpu")


def transferred_copy(model: nn.Module, transfer: Transfer) -> nn.Module:
    """A copy of the fresh ``model`` with ``transfer`` applied (the model itself is left fresh for its stage)."""
    target = copy.deepcopy(model)
    transfer.apply(target)
    return target


def record_scores(tracker: Tracker, scores: dict[str, float]) -> dict[str, Any]:
    """Log ``scores`` (name -> value, and ``samples``) as ``transferability/<name>`` metrics (a NaN score, of a
    diverged model, is not logged); return them for the summary. The gram engine's cells
    (``GramResult.transferability``) are recorded through here too."""
    tracker.log_metrics(
        {f"transferability/{name}": value for name, value in scores.items() if name != "samples" and math.isfinite(value)}
    )
    return dict(scores)


def finish(tracker: Tracker, scores: dict[str, float], n: int, started: float) -> dict[str, Any]:
    log.info(
        "transferability on %d task-2 samples (%.1f s): %s",
        n,
        time.perf_counter() - started,
        ", ".join(f"{name} {value:.4f}" for name, value in scores.items()),
    )
    return record_scores(tracker, {**scores, "samples": n})


def image_scores(
    spec: PipelineSpec,
    tracker: Tracker,
    upstream: nn.Module | None,
    downstream: nn.Module,
    transfer: Transfer | None,
    x: Tensor,
    y: Tensor,
    device: torch.device,
    model_input_size: Callable[[nn.Module], int | None],
) -> dict[str, Any]:
    """The scores of an image pipeline on the task-2 training images ``x``, ``y`` (``upstream`` and ``transfer`` are
    ``None`` without transfer: then only ``logme_scratch``), each model fed at its ``model_input_size``."""
    started = time.perf_counter()
    keep = score_subset(len(x), spec.transferability.max_samples, spec.seed)
    x, y = x[keep], y[keep]
    batch = spec.train.batch_size

    def features(model: nn.Module) -> Tensor:
        return penultimate_features(model, x, batch, model_input_size(model), device)

    scores: dict[str, float] = {}
    if transfer is not None and upstream is not None:
        scores["logme"] = scored(logme, features(transferred_copy(downstream, transfer)), y)
        scores["leep"] = scored(leep, class_probabilities(upstream, x, batch, model_input_size(upstream), device), y)
    scores["logme_scratch"] = scored(logme, features(downstream), y)
    return finish(tracker, scores, len(x), started)


def two_patch_probabilities(model: nn.Module, x: Tensor) -> Tensor:
    """The two-layer CNN's 2-class softmax of ``(F_{-1}, F_{+1})``: ``(sigmoid(-f), sigmoid(f))`` of the margin."""
    margin = model(x)
    return torch.stack([torch.sigmoid(-margin), torch.sigmoid(margin)], dim=1)


def synthetic_scores(
    spec: PipelineSpec,
    tracker: Tracker,
    upstream: nn.Module | None,
    downstream: nn.Module,
    transfer: Transfer | None,
    x: Tensor,
    y: Tensor,
) -> dict[str, Any]:
    """The scores of a synthetic pipeline on the task-2 training patches ``x`` (N, 2, d), labels ``y``."""
    started = time.perf_counter()
    keep = score_subset(len(x), spec.transferability.max_samples, spec.seed)
    x, y = x[keep], y[keep]

    def features(model: nn.Module) -> Tensor:
        with torch.no_grad():
            return model.hidden(x.to(model.weight.device)).flatten(1)

    scores: dict[str, float] = {}
    if transfer is not None and upstream is not None:
        scores["logme"] = scored(logme, features(transferred_copy(downstream, transfer)), y)
        with torch.no_grad():
            scores["leep"] = scored(leep, two_patch_probabilities(upstream, x.to(upstream.weight.device)), y)
    scores["logme_scratch"] = scored(logme, features(downstream), y)
    return finish(tracker, scores, len(x), started)

"""A regulariser (``ptlab.modules.regularizers``) as the kernel's per-filter ``StageInputs`` fields, for a single
stage (``GramEngine.train_stage``) and a batch of cells (``batching``) alike."""

from __future__ import annotations

import torch
from torch import Tensor

from ptlab.modules.regularizers import Regularizer


def regularizer_inputs(
    regularizer: Regularizer | None, inherited: Tensor | None, steps: int, dtype: torch.dtype
) -> dict[str, Tensor]:
    """The ``StageInputs`` fields of one cell's regulariser (``ptlab.modules.regularizers``) over its filters, with
    ``inherited`` (2m,) the filters the transfer copied; no fields (no regulariser) for ``None``."""
    if regularizer is None or inherited is None or not regularizer.active:
        return {}
    return drop_neutral(
        {key: value[None, None] for key, value in filter_regularizer(regularizer, inherited, steps, dtype).items()}
    )


def drop_neutral(fields: dict[str, Tensor]) -> dict[str, Tensor]:
    """``fields`` without the step multiplier when it is 1 wherever it applies, and without the penalty when every
    kappa is 0 (the kernel then skips that work; the result is the same bit for bit)."""
    out = dict(fields)
    if bool(((out["step_scale"] == 1) | (out["scale_until"] <= 0)[..., None]).all()):
        del out["step_scale"], out["scale_until"]
    if not bool(out["decay"].any()):
        del out["decay"], out["anchored"]
    return out


def filter_regularizer(regularizer: Regularizer, inherited: Tensor, steps: int, dtype: torch.dtype) -> dict[str, Tensor]:
    """A regulariser as per-filter tensors (shapes (Fm,), ``scale_until`` ()): ``step_scale``, ``scale_until``,
    ``decay``, ``anchored`` (see ``StageInputs``). Neutral values (multiplier 1, kappa 0) do nothing, exactly."""
    one, zero = torch.ones((), dtype=dtype), torch.zeros((), dtype=dtype)
    multiplier = torch.tensor(regularizer.multiplier(0), dtype=dtype)
    until = regularizer.k if regularizer.name == "freeze" else (steps if regularizer.name == "lr_scale" else 0)
    lam = torch.tensor(regularizer.anchor_coefficient, dtype=dtype)
    decay = torch.tensor(regularizer.decay_coefficient, dtype=dtype)
    return {
        "step_scale": torch.where(inherited, multiplier, one),
        "scale_until": torch.tensor(min(until, steps)),
        "decay": torch.where(inherited, lam, decay),
        "anchored": torch.where(inherited, one, zero),
    }

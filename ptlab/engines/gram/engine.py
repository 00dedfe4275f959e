"""``GramEngine``: the gram engine behind the ``Engine`` interface of ``ptlab.engines.base`` (one ``Stage`` at a
time, its model's weights read once and written back)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ptlab.data.synthetic import ResponseTestSet
from ptlab.engines.base import Stage, StageResult
from ptlab.engines.gram.kernel import StageInputs, eval_steps, torch_threads, train_stage_batch
from ptlab.engines.gram.results import GramStage, check_loss
from ptlab.modules.decomposition import SIGNALS
from ptlab.modules.regularizers import Regularizer


class GramEngine:
    """``Engine`` that trains a stage in coefficient space (see the module docstring): the model's
    weights are read once (after the stage's transfer is applied), the steps touch only the Gram
    matrix of the stage's training vectors, and the trained weights are written back into the model."""

    def __init__(self, name: str = "gram", trainer: Any = None) -> None:
        """``trainer`` (the trainer group) does not apply: the gram engine runs on the CPU in this process."""
        self.name = name

    def train_stage(self, stage: Stage) -> StageResult:
        model = stage.model
        plan = stage.transfer.apply(model) if stage.transfer is not None else None
        weight = model.weight.detach()
        dtype = weight.dtype
        filters = weight.reshape(-1, weight.shape[-1])  # (2m, d)
        directions = stage.directions
        rows = torch.cat([directions.basis.T.to(dtype), stage.train.noise.to(dtype)])  # [b_u, b_v1, b_v2; xi]
        if isinstance(stage.test, ResponseTestSet):
            # one draw for [w(0); b; xi] jointly: the filters' responses and the rows' cross products
            both = torch.cat([directions.basis.T.to(dtype), filters, stage.train.noise.to(dtype)])
            inner = both @ both.T
            drawn = stage.test.responses(inner, inner[:, :3]).T.to(dtype)
            fm = filters.shape[0]
            test_start, cross = drawn[3:3 + fm], torch.cat([drawn[:3], drawn[3 + fm:]])
        else:
            test_noise = stage.test.noise.to(dtype)
            test_start, cross = filters @ test_noise.T, rows @ test_noise.T
        norms = [float(torch.linalg.vector_norm(getattr(directions, name).double())) for name in SIGNALS]
        signal = [norms[0], norms[1] if stage.task == 1 else 0.0, norms[2] if stage.task == 2 else 0.0]

        def one(t: Tensor) -> Tensor:  # a single cell in a single group: (1, 1, ...)
            return t[None, None]

        bias = None if getattr(model, "bias", None) is None else model.bias.detach().reshape(1, 1, -1).to(dtype)
        regularizer = stage.regularizer if stage.transfer is not None and plan else None
        inherited = (stage.transfer.inherited(model, plan).row_mask("weight", filters.shape[0])
                     if regularizer is not None and regularizer.active else None)
        threads = torch.get_num_threads()
        with torch_threads(1):
            out = train_stage_batch(StageInputs(
                start=one(filters @ rows.T), test_start=one(test_start),
                norm2_start=one((filters * filters).sum(-1)), gram=(rows @ rows.T)[None], cross=cross[None],
                y=stage.train.y.to(dtype)[None], clean=stage.train.clean_y.to(dtype)[None],
                test_y=stage.test.y.to(dtype)[None], test_clean=stage.test.clean_y.to(dtype)[None],
                signal_coefficients=torch.tensor([[signal]], dtype=dtype),
                signal_norms=torch.tensor([[norms]], dtype=dtype), lr=torch.tensor([[stage.lr]], dtype=dtype),
                steps=stage.steps, eval_every=stage.eval_every, eval_threads=threads, form=model.form,
                bias_start=bias, **regularizer_inputs(regularizer, inherited, stage.steps, dtype)))
        check_loss(stage.name, out.loss[0, 0], stage.lr)
        coefficients = out.coefficients[0, 0]  # (2m, 3 + N)
        with torch.no_grad():
            start = filters if out.scale is None else out.scale[0, 0, :, None] * filters
            model.weight.copy_((start + coefficients @ rows).view_as(weight))
            if out.bias is not None:
                model.bias.copy_(out.bias[0, 0].view_as(model.bias))
        width = weight.shape[1]
        trained = GramStage(
            name=stage.name, steps=stage.steps, eval_steps=eval_steps(stage.steps, stage.eval_every),
            loss=out.loss[0, 0].double().numpy(), train_acc=out.train_acc[0, 0].double().numpy(),
            test_acc=out.test_acc[0, 0].double().numpy(), decomposition=out.decomposition[0, 0].double().numpy(),
            signal=coefficients[:, :3].reshape(2, width, 3), noise={stage.task: coefficients[:, 3:].reshape(2, width, -1)},
            transferred=torch.zeros(2, width, dtype=torch.bool))
        return trained.result(plan=plan, model=model)


def regularizer_inputs(regularizer: Regularizer | None, inherited: Tensor | None, steps: int,
                       dtype: torch.dtype) -> dict[str, Tensor]:
    """The ``StageInputs`` fields of one cell's regulariser (``ptlab.modules.regularizers``) over its filters, with
    ``inherited`` (2m,) the filters the transfer copied; no fields (no regulariser) for ``None``."""
    if regularizer is None or inherited is None or not regularizer.active:
        return {}
    return drop_neutral({key: value[None, None] for key, value in filter_regularizer(regularizer, inherited, steps,
                                                                                       dtype).items()})


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
    return {"step_scale": torch.where(inherited, multiplier, one), "scale_until": torch.tensor(min(until, steps)),
            "decay": torch.where(inherited, lam, decay), "anchored": torch.where(inherited, one, zero)}

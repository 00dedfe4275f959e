"""``GramEngine``: the gram engine behind the ``Engine`` interface of ``ptlab.engines.base`` (one ``Stage`` at a
time, its model's weights read once and written back). The stage's data and model stay on the CPU; the products and
the steps run on the engine's device, and what comes back (weights, curves) is on the CPU."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from ptlab.config import GRAM_DEVICES, device_choice
from ptlab.data.synthetic import ResponseTestSet
from ptlab.engines.base import Stage, StageResult
from ptlab.engines.gram.cell import resolve_device
from ptlab.engines.gram.kernel import StageInputs, eval_steps, torch_threads, train_stage_batch
from ptlab.engines.gram.results import GramStage, check_loss, on_cpu
from ptlab.modules.decomposition import SIGNALS
from ptlab.modules.regularizers import Regularizer


class GramEngine:
    """``Engine`` that trains a stage in coefficient space (see the module docstring): the model's
    weights are read once (after the stage's transfer is applied), the steps touch only the Gram
    matrix of the stage's training vectors, and the trained weights are written back into the model."""

    def __init__(self, name: str = "gram", trainer: Any = None, device: str | None = None) -> None:
        """``device``: ``engine.device`` (cpu, cuda, auto; ``None`` follows ``trainer``'s accelerator,
        ``ptlab.config.gram_device``); the trainer group does not apply otherwise."""
        self.name = name
        choice = device_choice(device, trainer.get("accelerator") if isinstance(trainer, Mapping) else None)
        if choice not in GRAM_DEVICES:
            raise ValueError(f"engine.device={device!r} is not allowed: must be one of {', '.join(GRAM_DEVICES)}")
        self.device = resolve_device(choice)

    def train_stage(self, stage: Stage) -> StageResult:
        model = stage.model
        plan = stage.transfer.apply(model) if stage.transfer is not None else None
        weight = model.weight.detach()
        dtype, device = weight.dtype, self.device
        filters = weight.reshape(-1, weight.shape[-1]).to(device)  # (2m, d)
        directions = stage.directions
        basis_t, noise = directions.basis.T.to(device=device, dtype=dtype), stage.train.noise.to(device=device, dtype=dtype)
        rows = torch.cat([basis_t, noise])  # [b_u, b_v1, b_v2; xi]
        if isinstance(stage.test, ResponseTestSet):
            # one draw for [w(0); b; xi] jointly, from the test set's CPU generator: the filters' responses and the
            # rows' cross products
            both = torch.cat([basis_t, filters, noise])
            inner = (both @ both.T).cpu()
            drawn = stage.test.responses(inner, inner[:, :3]).T.to(device=device, dtype=dtype)
            fm = filters.shape[0]
            test_start, cross = drawn[3 : 3 + fm], torch.cat([drawn[:3], drawn[3 + fm :]])
        else:
            test_noise = stage.test.noise.to(device=device, dtype=dtype)
            test_start, cross = filters @ test_noise.T, rows @ test_noise.T
        norms = [float(torch.linalg.vector_norm(getattr(directions, name).double())) for name in SIGNALS]
        signal = [norms[0], norms[1] if stage.task == 1 else 0.0, norms[2] if stage.task == 2 else 0.0]

        def one(t: Tensor) -> Tensor:  # a single cell in a single group: (1, 1, ...)
            return t[None, None]

        bias = (
            None if getattr(model, "bias", None) is None else model.bias.detach().reshape(1, 1, -1).to(device=device, dtype=dtype)
        )

        def on_device(t: Tensor) -> Tensor:
            return t.to(device=device, dtype=dtype)

        regularizer = stage.regularizer if stage.transfer is not None and plan else None
        inherited = (
            stage.transfer.inherited(model, plan).row_mask("weight", filters.shape[0])
            if regularizer is not None and regularizer.active
            else None
        )
        regularized = {
            key: value.to(device) for key, value in regularizer_inputs(regularizer, inherited, stage.steps, dtype).items()
        }
        threads = torch.get_num_threads()
        with torch_threads(1):
            out = train_stage_batch(
                StageInputs(
                    start=one(filters @ rows.T),
                    test_start=one(test_start),
                    norm2_start=one((filters * filters).sum(-1)),
                    gram=(rows @ rows.T)[None],
                    cross=cross[None],
                    y=on_device(stage.train.y)[None],
                    clean=on_device(stage.train.clean_y)[None],
                    test_y=on_device(stage.test.y)[None],
                    test_clean=on_device(stage.test.clean_y)[None],
                    signal_coefficients=torch.tensor([[signal]], dtype=dtype, device=device),
                    signal_norms=torch.tensor([[norms]], dtype=dtype, device=device),
                    lr=torch.tensor([[stage.lr]], dtype=dtype, device=device),
                    steps=stage.steps,
                    eval_every=stage.eval_every,
                    eval_threads=threads,
                    form=model.form,
                    bias_start=bias,
                    **regularized,
                )
            )
        check_loss(stage.name, out.loss[0, 0], stage.lr)
        coefficients = out.coefficients[0, 0]  # (2m, 3 + N)
        with torch.no_grad():
            start = filters if out.scale is None else out.scale[0, 0, :, None] * filters
            model.weight.copy_((start + coefficients @ rows).view_as(weight))  # copy_ brings it to the CPU
            if out.bias is not None:
                model.bias.copy_(out.bias[0, 0].view_as(model.bias))
        out = on_cpu(out)
        coefficients = out.coefficients[0, 0]
        width = weight.shape[1]
        trained = GramStage(
            name=stage.name,
            steps=stage.steps,
            eval_steps=eval_steps(stage.steps, stage.eval_every),
            loss=out.loss[0, 0].double().numpy(),
            train_acc=out.train_acc[0, 0].double().numpy(),
            test_acc=out.test_acc[0, 0].double().numpy(),
            decomposition=out.decomposition[0, 0].double().numpy(),
            signal=coefficients[:, :3].reshape(2, width, 3),
            noise={stage.task: coefficients[:, 3:].reshape(2, width, -1)},
            transferred=torch.zeros(2, width, dtype=torch.bool),
        )
        return trained.result(plan=plan, model=model)


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

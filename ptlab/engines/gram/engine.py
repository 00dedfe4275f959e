"""``GramEngine``: the gram engine behind the ``Engine`` interface of ``ptlab.engines.base`` (one ``Stage`` at a
time, its model's weights read once and written back). The stage's data and model stay on the CPU; the products and
the steps run on the engine's device, and what comes back (weights, curves) is on the CPU."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ptlab.config import GRAM_DEVICES, device_choice
from ptlab.data.synthetic import ResponseTestSet
from ptlab.engines.base import PipelineJob, PipelineResult, Stage, StageResult, run_recipe
from ptlab.engines.gram.cell import GramCell, resolve_device
from ptlab.engines.gram.kernel import StageInputs, eval_steps, torch_threads, train_stage_batch
from ptlab.engines.gram.regularize import regularizer_inputs
from ptlab.engines.gram.results import GramResult, GramStage, check_loss, on_cpu
from ptlab.modules.decomposition import SIGNALS

if TYPE_CHECKING:
    from ptlab.engines.gram.batching import ChunkMap


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

    def run(
        self,
        jobs: Sequence[PipelineJob],
        history: str = "full",
        max_cells: int = 60,
        workers: int = 1,
        chunk_map: ChunkMap | None = None,
        keep_curves: bool = True,
        record_coefficients: bool = False,
    ) -> Iterator[list[tuple[int, PipelineResult]]]:
        """Jobs with a recipe one by one through it (stage by stage: the upstream cache, live curves); the others as
        cells (``job.cell`` or the spec's ``GramCell``) batched in chunks (``iter_chunks``: ``max_cells``, ``workers``,
        ``chunk_map``), each yielded as its chunk comes back. ``history``: the curve points kept; ``keep_curves=False``:
        none but the finals cross back from the workers (a grid)."""
        for index, job in enumerate(jobs):
            if job.recipe is not None:
                yield [(index, run_recipe(self, job))]
        batched = [index for index, job in enumerate(jobs) if job.recipe is None]
        if not batched:
            return
        from ptlab.engines.gram.batching import iter_chunks  # batching imports this module

        cells = [jobs[i].cell if jobs[i].cell is not None else GramCell.from_spec(jobs[i].spec) for i in batched]
        summarize = functools.partial(pipeline_result, history=history, keep_curves=keep_curves)
        for chunk in iter_chunks(
            cells,
            max_cells,
            record_coefficients,
            workers=workers,
            summarize=summarize,
            chunk_map=chunk_map,
            history=history,
        ):
            yield [(batched[position], result) for position, result in chunk]

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


def pipeline_result(result: GramResult, history: str = "full", keep_curves: bool = True) -> PipelineResult:
    """A trained cell as the driver takes it (run in the worker: only this crosses back): its stages as ``history``
    keeps their curves (none with ``keep_curves=False``), its transferability scores and its divergence."""
    error = result.divergence()
    stages = result.stage_results(history)
    if not keep_curves:
        stages = {name: dataclasses.replace(stage, curves={}) for name, stage in stages.items()}
    return PipelineResult(stages, error=error, scores=result.transferability)

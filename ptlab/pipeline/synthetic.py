"""The synthetic pipeline: upstream on task 1 -> transfer on task 2 -> scratch on task 2 (paired).

The transfer stage applies ``transfer.control`` to the inherited filters; the scratch stage trains
``train.scratch_budget`` steps (downstream, or upstream + downstream: compute-matched).

The stages are trained by the config's engine (``ptlab.engines``: Lightning or gram, one interface);
this module decides what each stage trains and tracks each one as soon as it is done.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from torch import nn

from ptlab.config import SyntheticTaskSchema, scratch_length
from ptlab.data.synthetic import DTYPES, SyntheticTransferData, make_synthetic_data
from ptlab.engines.base import Engine, Stage, StageResult
from ptlab.models.factory import build_model as build_seeded_model
from ptlab.modules.regularizers import Regularizer
from ptlab.pipeline import transferability
from ptlab.pipeline.cache import cached_upstream
from ptlab.pipeline.record import record_stage
from ptlab.seeding import derive_seed
from ptlab.spec import PipelineSpec
from ptlab.tracking.base import Tracker
from ptlab.transfer.apply import Transfer
from ptlab.transfer.selection import SelectionInputs

log = logging.getLogger("ptlab")


def make_data(spec: PipelineSpec) -> SyntheticTransferData:
    """The seeded synthetic data of a pipeline."""
    task, noise = spec.task, spec.noise
    return make_synthetic_data(
        d=task.d,
        n1=task.n1,
        n2=task.n2,
        n_test=task.n_test,
        u_norm=task.u_norm,
        v_norm=task.v_norm,
        label_noise=task.label_noise,
        sigma_p1=noise.sigma_p1,
        sigma_p2=noise.sigma_p2,
        seed=derive_seed(spec.seed, "data"),
        dtype=DTYPES[spec.train.dtype],
        project_noise=task.project_noise,
        signal_position=task.signal_position,
        test_space=task.test_space,
    )


def build_model(spec: PipelineSpec, stream: str) -> nn.Module:
    """The synthetic model of ``stream`` (``upstream``: ``upstream_model``; ``downstream``: ``model``) with its init
    drawn from the ``stream`` sub-seed of the spec's seed.

    Transfer and scratch both use the ``downstream`` stream, so their fresh filters are identical.
    """
    model = build_seeded_model(spec.model_config(stream), spec.seed, stream, input_dim=spec.task.d)
    return model.to(DTYPES[spec.train.dtype])


def selection_inputs(data: SyntheticTransferData) -> SelectionInputs:
    """What a selection strategy may read on the synthetic task: the task-2 training set as one batch and
    the universal direction (for the ``signal`` oracle); docs/design.md section 7."""
    return SelectionInputs(batches=[(data.task2_train.x, data.task2_train.y)], universal=data.directions.u)


def train_and_record(engine: Engine, tracker: Tracker, stage: Stage) -> StageResult:
    """Train ``stage`` on its own child run and track it (one log line when it starts and ends)."""
    log.info("stage %s: %d GD steps on task %d (engine %s)", stage.name, stage.steps, stage.task, engine.name)
    started = time.perf_counter()
    tracker.start_stage(stage.name)
    result = engine.train_stage(stage)
    record_stage(tracker, result)
    log.info(
        "stage %s done in %.1f s: train_acc %.4f, test_acc %.4f",
        stage.name,
        time.perf_counter() - started,
        result.final["train_acc"],
        result.final["test_acc"],
    )
    return result


def needs_whole_cell(task: SyntheticTaskSchema) -> bool:
    """Response-space test sets and gram sampling draw one law for the whole pipeline (the test responses of
    transfer and scratch in one draw; no d-space vectors at all), so the gram engine trains such a pipeline as one
    cell (``GramEngine.run``), as in a batched sweep; ``ptlab.pipeline.run.recipe_for``."""
    return task.test_space == "response" or task.sampling == "gram"


def run_synthetic(spec: PipelineSpec, engine: Engine, tracker: Tracker) -> tuple[dict[str, StageResult], dict[str, Any]]:
    """Algorithms 1 and 2 on one seed; returns the trained stages and the ``transferability`` scores (taken after the
    transfer, before downstream training; ``ptlab.pipeline.transferability``)."""
    if engine.name == "gram" and needs_whole_cell(spec.task):
        raise ValueError("this pipeline has no stage-by-stage gram recipe: the gram engine trains it whole (Engine.run)")
    data = make_data(spec)
    train = spec.train
    scratch_steps = scratch_length(train.upstream_steps, train.downstream_steps, train.scratch_budget)

    regularizer = Regularizer.from_config(spec.regularizer)

    def stage(name: str, model: nn.Module, task: int, transfer: Transfer | None = None) -> Stage:
        part_train, part_test = (data.task1_train, data.task1_test) if task == 1 else (data.task2_train, data.task2_test)
        steps = {"upstream": train.upstream_steps, "transfer": train.downstream_steps}.get(name, scratch_steps)
        return Stage(
            name,
            model,
            part_train,
            part_test,
            steps,
            train.lr,
            train.eval_every,
            data.directions,
            task,
            transfer,
            train.dtype,
            regularizer if transfer is not None else None,
        )

    stages: dict[str, StageResult] = {}
    extra: dict[str, Any] = {}
    transfer_cfg = spec.transfer
    if transfer_cfg.kind != "none":
        upstream = build_model(spec, "upstream")
        stages["upstream"] = cached_upstream(
            spec, engine.name, tracker, upstream, lambda: train_and_record(engine, tracker, stage("upstream", upstream, 1))
        )
        transfer = Transfer(
            upstream,
            transfer_cfg.alpha,
            transfer_cfg.selection,
            derive_seed(spec.seed, "selection"),
            inputs=selection_inputs(data),
            control=transfer_cfg.control,
            control_seed=derive_seed(spec.seed, "control"),
        )
        downstream = build_model(spec, "downstream")
        if transferability.enabled(spec):
            extra["transferability"] = transferability.synthetic_scores(
                spec, tracker, upstream, downstream, transfer, data.task2_train.x, data.task2_train.y
            )
        stages["transfer"] = train_and_record(engine, tracker, stage("transfer", downstream, 2, transfer))
        stages["transfer"].extra["regularizer"] = regularizer.as_dict()
        stages["transfer"].extra["control"] = transfer_cfg.control
    scratch = build_model(spec, "downstream")
    if transfer_cfg.kind == "none" and transferability.enabled(spec):
        extra["transferability"] = transferability.synthetic_scores(
            spec, tracker, None, scratch, None, data.task2_train.x, data.task2_train.y
        )
    stages["scratch"] = train_and_record(engine, tracker, stage("scratch", scratch, 2))
    stages["scratch"].extra.update(budget=train.scratch_budget, steps=scratch_steps)
    return stages, extra

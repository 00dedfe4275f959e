"""``run_pipeline``: one config in, upstream/transfer/scratch trained and tracked, summary.json out.

The config is parsed once, here at the top, into a ``PipelineSpec`` (``ptlab.spec``); objects are built from it
(``hydra.utils.instantiate``: the engine from ``conf/engine``; the tracker from ``logger``; models inside the
recipe) and handed down with the parts of the spec they read. Its one job goes through the driver
(``ptlab.pipeline.driver.drive``) with a ``LiveRecorder``: the engine trains it (the task's recipe, stage by stage,
or whole), ``ptlab.pipeline.record`` tracks it and writes the summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ptlab.checks import check_paths
from ptlab.config import IMAGE_TASKS, ConfigError, LoggerSchema
from ptlab.context import JobContext, job_context
from ptlab.devices import job_device
from ptlab.distributed import is_global_zero
from ptlab.engines.base import Engine, PipelineJob, PipelineResult, Recipe
from ptlab.paths import preset_description
from ptlab.pipeline.driver import drive
from ptlab.pipeline.record import (
    cell_name,
    format_table,
    open_pipeline,
    pipeline_tags,
    record_pipeline,
    record_trained,
    used_params,
)
from ptlab.pipeline.resume import config_hash, should_skip_finished, skip_if_finished
from ptlab.registry import Registry
from ptlab.spec import PipelineSpec, parse
from ptlab.tracking.background import BackgroundTracker, runs_in_background
from ptlab.tracking.base import NullTracker, Tracker
from ptlab.tracking.faults import prepare_sqlite_store, signal_exits_as_terminated, signals_as_interrupt

log = logging.getLogger("ptlab")
"""Hydra writes this logger to each job's ``ptlab.log``: what ran, each stage, the result."""

RECIPES: Registry[Recipe] = Registry("task.name")
"""The recipes of the tasks (``ptlab.engines.base.Recipe``), by ``task.name``: what trains a pipeline stage by stage
(the image recipe loads Lightning and torchvision only when used)."""
RECIPES.add("synthetic", "ptlab.pipeline.synthetic:run_synthetic")
for _name in IMAGE_TASKS:
    RECIPES.add(_name, "ptlab.pipeline.images:run_images")


def figure_title(spec: PipelineSpec) -> str:
    """The decomposition figure's title: the seed and the settings that shape the curves."""
    task = spec.task
    return f"seed {spec.seed}: d={task.d}, N1={task.n1}, N2={task.n2}, ||u||={task.u_norm}, sigma_p1={spec.noise.sigma_p1}"


def make_engine(spec: PipelineSpec) -> Engine:
    """The engine of ``spec.engine`` (``conf/engine/<name>.yaml``), given the ``trainer`` group's config."""
    return instantiate(dict(spec.engine), trainer=dict(spec.trainer), _recursive_=False)


def make_pipeline_tracker(
    logger: LoggerSchema, run_name: str, tags: dict[str, str], description: str = "", background: bool = False
) -> Tracker:
    """The tracker of the ``logger`` group (none on DDP ranks other than 0); ``background``: through a helper process
    that loads MLflow and writes while this one trains (``ptlab.tracking.background.runs_in_background``)."""
    if logger.kind == "none" or not is_global_zero():
        return NullTracker()
    if background:
        return BackgroundTracker(
            logger.tracking_uri,
            logger.experiment_name,
            run_name,
            logger.artifact_location,
            tags,
            description,
            wal=logger.sqlite_wal,
        )
    from ptlab.tracking.mlflow import MLflowTracker  # MLflow loads only when a run is tracked

    return MLflowTracker(logger.tracking_uri, logger.experiment_name, run_name, logger.artifact_location, tags, description)


def in_background(spec: PipelineSpec, context: JobContext) -> bool:
    """Whether this job tracks through a helper process (``ptlab.tracking.background.runs_in_background``)."""
    return runs_in_background(spec.logger.kind, spec.task.name, context.multirun, spec.resume.skip_finished)


def run_pipeline(cfg: DictConfig | PipelineSpec, output_dir: str | Path, context: JobContext | None = None) -> dict[str, Any]:
    """Run one pipeline (a composed config, parsed here, or its spec); returns (and writes to
    ``output_dir/summary.json``) its summary."""
    spec = cfg if isinstance(cfg, PipelineSpec) else parse(cfg)
    context = context or job_context()
    check_paths(OmegaConf.create(dict(spec.resolved)) if cfg is spec else cfg, output_dir, context.start_dir)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    digest = config_hash(spec)
    logger = spec.logger
    if logger.kind == "mlflow" and not in_background(spec, context):  # else the helper prepares it
        from ptlab.tracking.mlflow import resolve_tracking_uri

        prepare_sqlite_store(resolve_tracking_uri(logger.tracking_uri), wal=logger.sqlite_wal)
    with config_lock(spec, digest, context):
        finished = skip_if_finished(spec.resume, logger, digest, output_dir, context.multirun)
        if finished is not None:
            return finished
        summary = _run_tracked(spec, output_dir, digest, context)
    print(format_table(summary))
    if logger.kind == "mlflow" and not context.multirun:
        print(mlflow_view_line(logger.tracking_uri, summary["mlflow"]["experiment_id"]))
    return summary


def mlflow_view_line(tracking_uri: str, experiment_id: str) -> str:
    """Where to see the result in the MLflow UI: the runs table with the result columns shown."""
    from ptlab.tracking.views import result_view_url

    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow: {result_view_url(experiment_id, tracking_uri.rstrip('/'))}"
    return f"MLflow: mlflow ui --backend-store-uri {tracking_uri}, then open {result_view_url(experiment_id)}"


def lock_dir(tracking_uri: str, cache: Path) -> Path:
    """Where the one-config locks of a store live: beside a SQLite store's file (``<file>.locks``), so that every
    process writing that store meets the same locks whatever its ``cache.dir``; under ``cache`` for any other store
    (a tracking server's processes on one machine share it through ``cache.dir``)."""
    from ptlab.tracking.faults import sqlite_path
    from ptlab.tracking.mlflow import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    path = sqlite_path(uri)
    if path is not None:
        return path.parent / f"{path.name}.locks"
    digest = hashlib.sha256(uri.encode()).hexdigest()[:16]
    return cache / "locks" / digest


@contextlib.contextmanager
def config_lock(spec: PipelineSpec, digest: str, context: JobContext) -> Iterator[None]:
    """Where finished configs are skipped (a multirun), one process at a time runs a config of a store: a second
    sweep that reaches a cell another live process is running waits for it, then skips it. The lock is a file in
    ``lock_dir``, released by the OS if its process dies. On a store other than a SQLite file (a server, where
    processes with other cache folders or on other hosts meet), the store is asked too (``wait_for_live_runs``)."""
    if not should_skip_finished(spec.resume, spec.logger, context.multirun) or not is_global_zero():
        yield
        return
    from filelock import FileLock, Timeout

    from ptlab.pipeline.cache import cache_dir
    from ptlab.pipeline.resume import wait_for_live_runs
    from ptlab.tracking.faults import sqlite_path
    from ptlab.tracking.mlflow import resolve_tracking_uri

    folder = lock_dir(spec.logger.tracking_uri, cache_dir(spec.cache, context.start_dir))
    folder.mkdir(parents=True, exist_ok=True)
    timeout = spec.cache.lock_timeout
    try:
        with FileLock(str(folder / f"{digest}.lock"), timeout=timeout):
            if spec.logger.kind == "mlflow" and sqlite_path(resolve_tracking_uri(spec.logger.tracking_uri)) is None:
                wait_for_live_runs(spec.logger.tracking_uri, spec.logger.experiment_name, digest, timeout)
            yield
    except Timeout:
        raise ConfigError(
            f"cache.lock_timeout={timeout}: another process ran this config longer; raise it or remove a stale lock"
        ) from None


def recipe_for(spec: PipelineSpec) -> Recipe | None:
    """The recipe that trains ``spec`` stage by stage, or ``None`` where its engine trains it whole: the gram engine
    draws response-space test sets and gram sampling as one law for the whole pipeline (no d-space vectors), so it
    trains such a pipeline as one cell, as in a batched sweep."""
    from ptlab.pipeline.synthetic import needs_whole_cell

    if spec.engine_name == "gram" and needs_whole_cell(spec.task):
        return None
    return RECIPES.get(spec.task.name)


class LiveRecorder:
    """The single run's ``Recorder``: one job tracked live on the run's own tracker (a recipe tracks each stage as it
    ends; a pipeline the engine trained whole is tracked when it comes back), then the summary and its file."""

    def __init__(self, spec: PipelineSpec, tracker: Tracker, output_dir: Path, choices: dict[str, str]) -> None:
        self.spec, self.tracker, self.output_dir, self.choices = spec, tracker, output_dir, choices
        self.theory: Any = None
        self.summary: dict[str, Any] = {}

    def finished(self, index: int) -> bool:
        return False  # run_pipeline skips a finished config under its lock, before the tracker opens

    def open(self, index: int) -> Tracker:
        spec = self.spec
        if spec.synthetic:
            from ptlab.theory import predict_from_spec

            self.theory = predict_from_spec(spec)
        resolved = dict(spec.resolved)
        open_pipeline(self.tracker, used_params(resolved), OmegaConf.to_yaml(resolved), self.theory)
        return self.tracker

    def record(self, index: int, result: PipelineResult) -> None:
        if result.error is not None and result.tracked:
            raise result.error  # its stage's child run is open: the tracker closes it FAILED with the error
        extra = dict(result.extra)
        if not result.tracked:
            if result.scores is not None:
                from ptlab.pipeline.transferability import record_scores

                extra["transferability"] = record_scores(self.tracker, result.scores)
            record_trained(self.tracker, result.stages, result.error)
        spec = self.spec
        if is_global_zero() and not spec.synthetic:
            from ptlab.pipeline.checkpoints import discard_checkpoints

            discard_checkpoints(spec)
        draw = spec.synthetic and spec.logger.figures
        self.summary = record_pipeline(
            self.tracker,
            result.stages,
            self.output_dir,
            spec.seed,
            self.choices,
            self.theory,
            extra,
            figure_title=figure_title(spec) if draw else None,
            write_file=is_global_zero(),
        )

    def flush(self) -> None:
        return None

    def abandon(self, status: str) -> None:
        return None  # the run's tracker, open around the drive, ends its runs with the error

    def close(self) -> None:
        return None


def _run_tracked(spec: PipelineSpec, output_dir: Path, digest: str, context: JobContext) -> dict[str, Any]:
    """The pipeline between opening its runs and writing its summary: one job through the driver."""
    engine = make_engine(spec)
    log.info(
        "%s: task=%s engine=%s, experiment %s",
        cell_name(context.overrides, spec.seed),
        spec.task.name,
        spec.engine_name,
        spec.logger.experiment_name,
    )
    tracker = make_pipeline_tracker(
        spec.logger,
        cell_name(context.overrides, spec.seed),
        pipeline_tags(spec.seed, digest, context.choices),
        preset_description(context.choices.get("experiment")),
        in_background(spec, context),
    )
    with job_device(spec, context.multirun) as spec, signals_as_interrupt(), tracker, signal_exits_as_terminated():
        recorder = LiveRecorder(spec, tracker, output_dir, context.choices)
        drive([PipelineJob(spec, recipe=recipe_for(spec))], engine, recorder)
        return recorder.summary

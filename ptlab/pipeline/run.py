"""``run_pipeline``: one config in, upstream/transfer/scratch trained and tracked, summary.json out.

Objects are built here, at the top, from the config (``hydra.utils.instantiate``: the engine from
``conf/engine``; the tracker from ``logger``; models inside the stage runner), and handed down; the
stage runner of the task trains the stages, ``ptlab.pipeline.record`` tracks them and writes the
summary.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from ptlab.checks import check_paths
from ptlab.config import IMAGE_TASKS, ConfigError, validate
from ptlab.context import JobContext, job_context
from ptlab.devices import job_device
from ptlab.distributed import is_global_zero
from ptlab.engines.base import Engine, StageResult
from ptlab.paths import preset_description
from ptlab.pipeline.record import cell_name, format_table, open_pipeline, pipeline_tags, record_pipeline, used_params
from ptlab.pipeline.resume import config_hash, should_skip_finished, skip_if_finished
from ptlab.registry import Registry
from ptlab.tracking.base import NullTracker, Tracker
from ptlab.tracking.faults import prepare_sqlite_store, signal_exits_as_terminated, signals_as_interrupt

StageRunner = Callable[[DictConfig, Engine, Tracker], "tuple[dict[str, StageResult], dict[str, Any]]"]

log = logging.getLogger("ptlab")
"""Hydra writes this logger to each job's ``ptlab.log``: what ran, each stage, the result."""

STAGE_RUNNERS: Registry[StageRunner] = Registry("task.name")
"""Stage runners by ``task.name`` (image runners load Lightning and torchvision only when used)."""
STAGE_RUNNERS.add("synthetic", "ptlab.pipeline.synthetic:run_synthetic")
for _name in IMAGE_TASKS:
    STAGE_RUNNERS.add(_name, "ptlab.pipeline.images:run_images")


def figure_title(cfg: Any) -> str:
    """The decomposition figure's title: the seed and the settings that shape the curves."""
    return (f"seed {cfg.seed}: d={cfg.task.d}, N1={cfg.task.n1}, N2={cfg.task.n2}, ||u||={cfg.task.u_norm}, "
            f"sigma_p1={cfg.noise.sigma_p1}")


def make_engine(cfg: DictConfig) -> Engine:
    """The engine of ``cfg.engine`` (``conf/engine/<name>.yaml``), given the ``trainer`` group's config."""
    return instantiate(cfg.engine, trainer=cfg.trainer, _recursive_=False)


def make_pipeline_tracker(cfg: DictConfig, run_name: str, tags: dict[str, str], description: str = "") -> Tracker:
    """The tracker of ``cfg.logger`` (none on DDP ranks other than 0)."""
    if cfg.logger.kind == "none" or not is_global_zero():
        return NullTracker()
    from ptlab.tracking.mlflow import MLflowTracker  # MLflow loads only when a run is tracked

    return MLflowTracker(cfg.logger.tracking_uri, cfg.logger.experiment_name, run_name, cfg.logger.artifact_location,
                         tags, description)


def run_pipeline(cfg: DictConfig, output_dir: str | Path, context: JobContext | None = None) -> dict[str, Any]:
    """Run one pipeline; returns (and writes to ``output_dir/summary.json``) its summary."""
    validate(cfg)
    context = context or job_context()
    check_paths(cfg, output_dir, context.start_dir)
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    digest = config_hash(cfg)
    if cfg.logger.kind == "mlflow":
        from ptlab.tracking.mlflow import resolve_tracking_uri

        prepare_sqlite_store(resolve_tracking_uri(cfg.logger.tracking_uri), wal=cfg.logger.sqlite_wal)
    with config_lock(cfg, digest, context):
        finished = skip_if_finished(cfg, digest, output_dir, context.multirun)
        if finished is not None:
            return finished
        summary = _run_tracked(cfg, output_dir, digest, context)
    print(format_table(summary))
    if cfg.logger.kind == "mlflow" and not context.multirun:
        print(mlflow_view_line(cfg.logger.tracking_uri, summary["mlflow"]["experiment_id"]))
    return summary


def mlflow_view_line(tracking_uri: str, experiment_id: str) -> str:
    """Where to see the result in the MLflow UI: the runs table with the result columns shown."""
    from ptlab.tracking.mlflow import result_view_url

    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow: {result_view_url(experiment_id, tracking_uri.rstrip('/'))}"
    return (f"MLflow: mlflow ui --backend-store-uri {tracking_uri}, then open "
            f"{result_view_url(experiment_id)}")


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
def config_lock(cfg: DictConfig, digest: str, context: JobContext) -> Iterator[None]:
    """Where finished configs are skipped (a multirun), one process at a time runs a config of a store: a second
    sweep that reaches a cell another live process is running waits for it, then skips it. The lock is a file in
    ``lock_dir``, released by the OS if its process dies."""
    if not should_skip_finished(cfg, context.multirun) or not is_global_zero():
        yield
        return
    from filelock import FileLock, Timeout

    from ptlab.pipeline.cache import cache_dir

    folder = lock_dir(cfg.logger.tracking_uri, cache_dir(cfg, context.start_dir))
    folder.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(folder / f"{digest}.lock"), timeout=cfg.cache.lock_timeout):
            yield
    except Timeout:
        raise ConfigError(f"cache.lock_timeout={cfg.cache.lock_timeout}: another process ran this config longer; "
                          "raise it or remove a stale lock") from None


def _run_tracked(cfg: DictConfig, output_dir: Path, digest: str, context: JobContext) -> dict[str, Any]:
    """The pipeline between opening its runs and writing its summary."""
    runner = STAGE_RUNNERS.get(cfg.task.name)
    engine = make_engine(cfg)
    log.info("%s: task=%s engine=%s, experiment %s", cell_name(context.overrides, cfg.seed), cfg.task.name,
             cfg.engine.get("name"), cfg.logger.experiment_name)
    synthetic = cfg.task.name == "synthetic"
    tracker = make_pipeline_tracker(cfg, cell_name(context.overrides, cfg.seed),
                                    pipeline_tags(cfg.seed, digest, context.choices),
                                    preset_description(context.choices.get("experiment")))
    with job_device(cfg, context.multirun), signals_as_interrupt(), tracker, signal_exits_as_terminated():
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved.pop("hydra", None)
        theory = None
        if synthetic:
            from ptlab.theory import predict_from_config

            theory = predict_from_config(cfg)
        open_pipeline(tracker, used_params(resolved), OmegaConf.to_yaml(resolved), theory)
        stages, extra = runner(cfg, engine, tracker)
        if is_global_zero() and not synthetic:
            from ptlab.pipeline.checkpoints import discard_checkpoints

            discard_checkpoints(cfg)
        draw = synthetic and cfg.logger.get("figures", False)
        return record_pipeline(tracker, stages, output_dir, cfg.seed, context.choices, theory, extra,
                               figure_title=figure_title(cfg) if draw else None, write_file=is_global_zero())

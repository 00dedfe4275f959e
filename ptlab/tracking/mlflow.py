"""MLflow tracking of a pipeline (design.md section 5): one parent run, a child run per stage.

Children are Lightning ``MLFlowLogger`` runs tagged with ``mlflow.parentRunId``; metric curves are
buffered and sent with ``log_batch`` (a call per metric point would dominate a synthetic run).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from time import time
from types import TracebackType
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only
from sqlalchemy.exc import IntegrityError

from ptlab.config import ConfigError
from ptlab.tracking.faults import RetryingClient
from ptlab.tracking.sql import MetricPoint, MetricWriter, is_database_uri

MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100
STAGE_TAG = "ptlab.stage"


def resolve_tracking_uri(uri: str, cwd: Path | None = None) -> str:
    """Make a relative ``sqlite:///file.db`` absolute against ``cwd`` (default: the current directory)."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(((cwd or Path.cwd()) / uri[len(prefix):]).resolve())
    return uri


def default_artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """``mlartifacts/<experiment>`` beside a sqlite database; ``None`` (the server decides) otherwise."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment_name)
    return (Path(tracking_uri[len(prefix):]).parent / "mlartifacts" / safe).as_uri()


def get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created (or restored) if needed; safe when jobs race to create it."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``; lists stay whole values."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


class BufferedMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger`` that keeps metric points in memory and stores them in bulk: straight into the
    tables of a database-backed store (``ptlab.tracking.sql``), through ``log_batch`` in batches of
    1000 otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: list[MetricPoint] = []
        self._writer: MetricWriter | None = None

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        stamp = int(time() * 1000)
        self._pending.extend((k, float(v), stamp, step or 0) for k, v in metrics.items() if not isinstance(v, str))
        if len(self._pending) >= 10 * MAX_METRICS_PER_BATCH:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        """Store every pending metric point."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        if is_database_uri(self._tracking_uri or ""):
            if self._writer is None:
                self._writer = MetricWriter(self._tracking_uri)
            try:
                self._writer.write(self.run_id, pending)
                return
            except IntegrityError:  # a point stored before: MLflow's log_batch skips what exists
                pass
        metrics = [Metric(key, value, stamp, step) for key, value, stamp, step in pending]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.experiment.log_batch(self.run_id, metrics=metrics[start:start + MAX_METRICS_PER_BATCH])

    def save(self) -> None:
        super().save()
        self.flush()

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self._initialized or self._pending:
            self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        super().finalize(status)


class PipelineTracker:
    """A context manager around one pipeline's parent run; on an exception every open run is FAILED
    (KILLED for Ctrl-C), so nothing is left RUNNING."""

    def __init__(self, tracking_uri: str, experiment_name: str, run_name: str,
                 artifact_location: str | None = None, tags: Mapping[str, str] | None = None) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment_name, self.run_name = experiment_name, run_name
        self.artifact_location = artifact_location or default_artifact_location(self.tracking_uri, experiment_name)
        self.tags = dict(tags or {})
        self.client = RetryingClient(MlflowClient(self.tracking_uri))
        self.experiment_id = ""
        self.parent_run_id = ""
        self.children: dict[str, str] = {}

    def __enter__(self) -> PipelineTracker:
        try:
            self.experiment_id = get_or_create_experiment(self.client, self.experiment_name, self.artifact_location)
        except MlflowException as err:
            if not self.tracking_uri.startswith(("http://", "https://")):
                raise
            raise ConfigError(f"logger.tracking_uri={self.tracking_uri!r} is not allowed: must be a reachable "
                              f"MLflow store ({str(err).splitlines()[0]})") from None
        run = self.client.create_run(self.experiment_id, run_name=self.run_name,
                                     tags={STAGE_TAG: "pipeline", **self.tags})
        self.parent_run_id = run.info.run_id
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None:
            status = "FINISHED"
        else:
            status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
            self.client.set_tag(self.parent_run_id, "ptlab.error", f"{exc_type.__name__}: {exc}"[:5000])
        for run_id in self.children.values():
            child_status = self.client.get_run(run_id).info.status
            if child_status == "RUNNING" or (status == "KILLED" and child_status == "FAILED"):
                self.client.set_terminated(run_id, status)
        self.client.set_terminated(self.parent_run_id, status)

    def child_logger(self, stage: str) -> BufferedMLFlowLogger:
        """A Lightning logger on a new child run named ``stage`` (created now, so its id is known)."""
        logger = BufferedMLFlowLogger(
            experiment_name=self.experiment_name, tracking_uri=self.tracking_uri, run_name=stage,
            tags={MLFLOW_PARENT_RUN_ID: self.parent_run_id, STAGE_TAG: stage, **self.tags})
        self.children[stage] = logger.run_id
        return logger

    def run_id(self, stage: str | None = None) -> str:
        """The parent run's id, or the child run of ``stage``."""
        return self.children[stage] if stage else self.parent_run_id

    def log_params(self, params: Mapping[str, Any], stage: str | None = None) -> None:
        """Log params in batches of 100 (values as strings, cut to MLflow's 6000 characters)."""
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id(stage), params=items[start:start + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], stage: str | None = None, step: int = 0) -> None:
        """Log a set of numbers in one batch."""
        stamp = int(time() * 1000)
        items = [Metric(k, float(v), stamp, step) for k, v in metrics.items()]
        for start in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id(stage), metrics=items[start:start + MAX_METRICS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any], stage: str | None = None) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id(stage), key, str(value))

    def log_dict(self, data: Any, artifact_file: str, stage: str | None = None) -> None:
        """Store ``data`` as a JSON (or, for ``.yaml``/text, as given) artifact."""
        self.log_text(data if isinstance(data, str) else json.dumps(data, indent=2, default=str),
                      artifact_file, stage)

    def log_text(self, text: str, artifact_file: str, stage: str | None = None) -> None:
        self.client.log_text(self.run_id(stage), text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, stage: str | None = None) -> None:
        self.client.log_artifact(self.run_id(stage), str(path), artifact_path)


class NullTracker:
    """Tracking switched off (``logger=none``): the same calls, nothing stored."""

    tracking_uri = experiment_id = parent_run_id = ""

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def child_logger(self, stage: str) -> None:
        return None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("log_") or name == "set_tags":
            return lambda *args, **kwargs: None
        raise AttributeError(name)


def make_tracker(kind: str, tracking_uri: str = "", experiment_name: str = "default", run_name: str = "pipeline",
                 artifact_location: str | None = None, tags: Mapping[str, str] | None = None,
                 ) -> PipelineTracker | NullTracker:
    """The tracker for ``logger.kind``."""
    if kind == "none":
        return NullTracker()
    return PipelineTracker(tracking_uri, experiment_name, run_name, artifact_location, tags)


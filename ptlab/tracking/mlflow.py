"""MLflow tracking of a pipeline (docs/design.md section 5): one parent run, a child run per stage.

``MLflowTracker`` implements ``ptlab.tracking.base.Tracker`` with MLflow's client. Children are runs
tagged with ``mlflow.parentRunId`` and ``ptlab.stage``; whole curves go into a database store's
tables in one transaction (``ptlab.tracking.sql``), else through ``log_batch`` in batches.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from time import monotonic, sleep, time
from types import TracebackType
from typing import Any

from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from mlflow.tracking.context.registry import resolve_tags
from sqlalchemy.exc import IntegrityError

from ptlab.errors import ConfigError, restore_hint
from ptlab.tracking.base import (
    CELL_TAG,
    NOTE_TAG,
    PARENT_RUN_TAG,
    STAGE_TAG,
    Curves,
    NullTracker,
    as_json,
    child_name,
    curve_points,
    metric_name,
    resolve_tracking_uri,
)
from ptlab.tracking.faults import (
    STORE_FAULTS,
    UNREACHABLE,
    RetryingClient,
    close_retry_s,
    free_sqlite_journal,
    quick_http_requests,
    store_error,
    store_fault,
    tracking_write,
)
from ptlab.tracking.heartbeat import beat_tags, start_beating, stop_beating
from ptlab.tracking.sql import MetricPoint, MetricWriter, end_runs_in_place, is_database_uri, tables_checked
from ptlab.tracking.stale import PROCESS_TAG, mark_vanished, process_tag
from ptlab.tracking.views import RESULT_COLUMNS, RESULT_VIEW, SHARED_VIEW_TAG, WORKFLOW, result_view_url  # noqa: F401

log = logging.getLogger(__name__)

PASSING_FAULTS = (STORE_FAULTS["database or disk is full"], STORE_FAULTS["disk i/o error"], UNREACHABLE)
"""Store faults worth waiting a few seconds on when the runs are ended at exit (a disk that frees, a server back)."""


def may_pass(err: BaseException | None) -> bool:
    """Whether ``err`` is a store fault of ``PASSING_FAULTS`` (a ``StoreError``'s line names its fault)."""
    fault = store_fault(err) or ""
    return any(passing in fault for passing in PASSING_FAULTS)


MAX_METRICS_PER_BATCH = 1000
MAX_PARAMS_PER_BATCH = 100


def default_artifact_location(tracking_uri: str, experiment_name: str) -> str | None:
    """``mlartifacts/<experiment>`` beside a sqlite database; ``None`` (the server decides) otherwise."""
    prefix = "sqlite:///"
    if not tracking_uri.startswith(prefix):
        return None
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", experiment_name)
    return (Path(tracking_uri[len(prefix) :]).parent / "mlartifacts" / safe).as_uri()


EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
ML_EXPERIMENT = "custom_model_development"
"""MLflow 3's UI opens an experiment tagged ``mlflow.experimentKind=custom_model_development`` on its runs (the
"Model training" side), not on the GenAI overview of traces and evaluations."""
GIT_COMMIT_TAG = "mlflow.source.git.commit"


def provenance_tags(tags: Mapping[str, str]) -> dict[str, str]:
    """``tags`` plus what MLflow's context adds to a run (``mlflow.user``, ``mlflow.source.name``, ``.type``, the
    git commit of the started file), with the git commit of ptlab's own checkout where the started file is in
    none (the ``ptlab`` console script lives in the virtual environment's ``bin``)."""
    resolved = resolve_tags(dict(tags))
    if GIT_COMMIT_TAG not in resolved:
        from mlflow.utils.git_utils import get_git_commit

        commit = get_git_commit(str(Path(__file__).resolve().parent))
        if commit:
            resolved[GIT_COMMIT_TAG] = commit
    return resolved


def get_or_create_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """The id of experiment ``name``, created if needed, as an ML (not GenAI) experiment with the ``RESULT_VIEW``
    of its runs table; safe when jobs race to create it. A deleted experiment is a ``ConfigError`` (restoring it
    silently would bring its deleted runs back)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(
                name, artifact_location=artifact_location, tags={EXPERIMENT_KIND_TAG: ML_EXPERIMENT}
            )
        except MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
        else:
            experiment = client.get_experiment(experiment_id)
    if experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"logger.experiment_name={name!r} is not allowed: that experiment is deleted; "
            f"{restore_hint(experiment.experiment_id, str(client.tracking_uri))}"
        )
    if SHARED_VIEW_TAG + RESULT_VIEW not in experiment.tags:
        view = {"selectedColumns": list(RESULT_COLUMNS), "orderByKey": "attributes.start_time", "orderByAsc": False}
        client.set_experiment_tag(experiment.experiment_id, SHARED_VIEW_TAG + RESULT_VIEW, as_json(view))
    return experiment.experiment_id


class MLflowTracker:
    """``Tracker`` on an MLflow store: a context manager around one pipeline's parent run; on an
    exception every open run is FAILED (KILLED for Ctrl-C), so nothing is left RUNNING."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        artifact_location: str | None = None,
        tags: Mapping[str, str] | None = None,
        description: str = "",
    ) -> None:
        """``description``: the experiment's MLflow description, set when it has none yet (the preset's comment)."""
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.experiment_name, self.run_name, self.description = experiment_name, run_name, description
        self.artifact_location = artifact_location or default_artifact_location(self.tracking_uri, experiment_name)
        self.tags = {CELL_TAG: run_name, **dict(tags or {})}
        self.client = RetryingClient(MlflowClient(self.tracking_uri))
        self.experiment_id = ""
        self.parent_run_id = ""
        self.children: dict[str, str] = {}
        self._ended: set[str] = set()
        """Runs this tracker ended (``end_stage``): a store that stops answering is not asked about them at exit."""
        self._writer: MetricWriter | None = None
        self.clock_ms: int | None = None
        """When runs are created and ended (ms since the epoch); ``None``: now. The background tracker's helper sets
        the time each call was made in the run's own process, so run start times and durations are the run's."""

    def __enter__(self) -> MLflowTracker:
        try:
            self.experiment_id = get_or_create_experiment(self.client, self.experiment_name, self.artifact_location)
        except MlflowException as err:
            if not self.tracking_uri.startswith(("http://", "https://")):
                raise
            raise ConfigError(
                f"logger.tracking_uri={self.tracking_uri!r} is not allowed: must be a reachable "
                f"MLflow store ({str(err).splitlines()[0]})"
            ) from None
        mark_vanished(self.client, [self.experiment_id])
        if self.description and NOTE_TAG not in self.client.get_experiment(self.experiment_id).tags:
            self.client.set_experiment_tag(self.experiment_id, NOTE_TAG, self.description)
        self.tags = {**self.tags, PROCESS_TAG: process_tag()}
        beating = beat_tags(self.tracking_uri)
        with tracking_write(raise_deferred=None):  # a signal here is raised inside the with-body, not before it
            run = self.client.create_run(
                self.experiment_id,
                run_name=self.run_name,
                start_time=self.clock_ms,
                tags=provenance_tags({STAGE_TAG: "pipeline", **self.tags, **beating}),
            )
            self.parent_run_id = run.info.run_id
            if beating:
                start_beating(self.tracking_uri, self.parent_run_id)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """Close every open run: FINISHED, KILLED (a signal) or FAILED. Each write is tried on its own (the
        statuses first, the error tag last), so one failed write leaves no other run RUNNING. Runs whose end could
        not be written (a full disk, a server that stopped answering) are tried again for a few seconds
        (``_end_left``); a store fault, in the block or while closing, is raised as one-line ``StoreError`` that
        names the runs still RUNNING, if any (the next command marks them FAILED, ``mark_vanished``)."""
        stop_beating(self.parent_run_id)
        fault = None if exc is None or isinstance(exc, KeyboardInterrupt) else store_fault(exc)
        failed: list[BaseException] = []
        left: list[str] = []
        error = f"{exc_type.__name__}: {exc}"[:5000] if exc_type else None
        # One shielded block: a second signal (Ctrl-C twice, a group-wide SIGTERM) cannot stop it half-way.
        with tracking_write(raise_deferred=exc_type is None):
            if exc_type is None:
                status = "FINISHED"
            else:
                status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
            if fault is None or UNREACHABLE not in fault:
                left = self._close_runs(status, error, failed)
            elif self.parent_run_id:  # a server that stopped answering: not asked about every run first
                left = [run_id for run_id in self.children.values() if run_id not in self._ended] + [self.parent_run_id]
            if left:
                left = self._end_left(left, status, error)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if fault is not None:
            raise store_error(exc, self.tracking_uri, left) from exc
        if failed:
            log.warning("ptlab: %d tracking write(s) failed while closing the runs: %s", len(failed), failed[0])
            if exc_type is None:
                raise store_error(failed[0], self.tracking_uri, left) from failed[0]
            if left:
                log.warning("ptlab: %s", store_error(failed[0], self.tracking_uri, left))

    def _close_runs(self, status: str, error: str | None, failed: list[BaseException]) -> list[str]:
        """Set the status of the open children and the parent, then the parent's error tag; a write that fails
        is appended to ``failed`` and the others are still tried. Returns the runs whose status was not written."""
        left: list[str] = []

        def attempt(call: Any, *args: Any) -> bool:
            try:
                call(*args)
            except Exception as err:  # noqa: BLE001 - collected; the caller reports the first
                failed.append(err)
                return False
            return True

        for run_id in self.children.values():
            try:
                child_status = self.client.get_run(run_id).info.status
            except Exception as err:  # noqa: BLE001 - collected; the caller reports the first
                failed.append(err)
                child_status = "RUNNING"
            if child_status == "RUNNING" or (status == "KILLED" and child_status == "FAILED"):
                if not attempt(self.client.set_terminated, run_id, status, self.clock_ms) and child_status == "RUNNING":
                    left.append(run_id)
        if not attempt(self.client.set_terminated, self.parent_run_id, status, self.clock_ms):
            left.append(self.parent_run_id)
        if error is not None:
            attempt(self.client.set_tag, self.parent_run_id, "ptlab.error", error)
        return left

    def _end_left(self, left: list[str], status: str, error: str | None) -> list[str]:
        """Try again to end the runs in ``left`` for up to ``close_retry_s()`` seconds (``PTLAB_CLOSE_RETRY_S``,
        default 5) where the fault may pass (``PASSING_FAULTS``; else once): a SQLite store first gives back its
        write-ahead log's space (``free_sqlite_journal``: after a failed write on a full disk it holds that write's
        pages), a SQLite store on a full disk is written with its journal in memory (``end_runs_in_place``), a full
        disk may free meanwhile, an HTTP store is asked with one 2 s try per call. Returns the runs still RUNNING."""
        deadline = monotonic() + close_retry_s()
        with quick_http_requests():
            while True:
                free_sqlite_journal(self.tracking_uri)
                still, last = [], None
                for run_id in left:
                    try:
                        self.client.set_terminated(run_id, status, self.clock_ms)
                    except Exception as err:  # noqa: BLE001 - the store still cannot be written: tried again, then named
                        still.append(run_id)
                        last = err
                if len(still) < len(left) and self.parent_run_id in left and self.parent_run_id not in still and error:
                    try:
                        self.client.set_tag(self.parent_run_id, "ptlab.error", error)
                    except Exception:  # noqa: BLE001 - the status is what matters; the tag is best effort
                        pass
                if still and STORE_FAULTS["database or disk is full"] in (store_fault(last) or ""):
                    tagged = (self.parent_run_id, error) if error and self.parent_run_id in still else None
                    still = end_runs_in_place(self.tracking_uri, still, status, self.clock_ms or int(time() * 1000), tagged)
                left = still
                if not left or monotonic() + 0.5 > deadline or not may_pass(last):
                    return left
                sleep(0.5)

    def start_stage(self, stage: str) -> None:
        """Create the child run of ``stage`` with the tags MLflow's context adds (user, source, git commit)."""
        tags = provenance_tags({PARENT_RUN_TAG: self.parent_run_id, STAGE_TAG: stage, **self.tags})
        with tracking_write():  # the run's id is recorded before a held signal is raised
            run = self.client.create_run(
                self.experiment_id, run_name=child_name(stage, self.run_name), tags=tags, start_time=self.clock_ms
            )
            self.children[stage] = run.info.run_id

    def end_stage(self, stage: str, status: str = "FINISHED") -> None:
        run_id = self.children[stage]
        if self.client.get_run(run_id).info.status == "RUNNING":
            self.client.set_terminated(run_id, status, self.clock_ms)
        self._ended.add(run_id)

    def stage_logger(self, stage: str) -> Any:
        """A ``BufferedMLFlowLogger`` on the child run of ``stage`` (started if needed)."""
        from ptlab.tracking.lightning import BufferedMLFlowLogger  # Lightning loads only for image runs

        if stage not in self.children:
            self.start_stage(stage)
        return BufferedMLFlowLogger(
            experiment_name=self.experiment_name, tracking_uri=self.tracking_uri, run_id=self.children[stage]
        )

    def log_curves(self, curves: Curves, stage: str | None = None) -> None:
        """Every point of ``curves`` in one write: straight into a database store's tables, else
        ``log_batch`` in batches of 1000."""
        points: list[MetricPoint] = curve_points(curves, int(time() * 1000))
        if not points:
            return
        run_id = self.run_id(stage)
        if is_database_uri(self.tracking_uri) and tables_checked():
            self._writer = self._writer or MetricWriter(self.tracking_uri)
            try:
                self._writer.write(run_id, points)
                return
            except IntegrityError:  # a point stored before: MLflow's log_batch skips what exists
                pass
        metrics = [Metric(key, value, stamp, step) for key, value, stamp, step in points]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.client.log_batch(run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])

    def run_id(self, stage: str | None = None) -> str:
        """The parent run's id, or the child run of ``stage``."""
        return self.children[stage] if stage else self.parent_run_id

    def log_params(self, params: Mapping[str, Any], stage: str | None = None) -> None:
        """Log params in batches of 100 (values as strings, cut to MLflow's 6000 characters)."""
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id(stage), params=items[start : start + MAX_PARAMS_PER_BATCH])

    def log_metrics(self, metrics: Mapping[str, float], stage: str | None = None, step: int = 0) -> None:
        """Log a set of numbers in one batch."""
        stamp = int(time() * 1000)
        items = [Metric(metric_name(k), float(v), stamp, step) for k, v in metrics.items()]
        for start in range(0, len(items), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id(stage), metrics=items[start : start + MAX_METRICS_PER_BATCH])

    def set_tags(self, tags: Mapping[str, Any], stage: str | None = None) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id(stage), key, str(value))

    def log_dict(self, data: Any, artifact_file: str, stage: str | None = None) -> None:
        """Store ``data`` as a JSON (or, for ``.yaml``/text, as given) artifact."""
        self.log_text(as_json(data), artifact_file, stage)

    def log_text(self, text: str, artifact_file: str, stage: str | None = None) -> None:
        self.client.log_text(self.run_id(stage), text, artifact_file)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, stage: str | None = None) -> None:
        self.client.log_artifact(self.run_id(stage), str(path), artifact_path)


def make_tracker(
    kind: str,
    tracking_uri: str = "",
    experiment_name: str = "default",
    run_name: str = "pipeline",
    artifact_location: str | None = None,
    tags: Mapping[str, str] | None = None,
) -> MLflowTracker | NullTracker:
    """The tracker for ``logger.kind``."""
    if kind == "none":
        return NullTracker()
    return MLflowTracker(tracking_uri, experiment_name, run_name, artifact_location, tags)

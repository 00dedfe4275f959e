"""Many pipelines written to MLflow in bulk: the batched sweep's ``MemoryTracker`` s stored at once.

``ptlab.tracking.base.MemoryTracker`` implements the same ``Tracker`` interface as ``MLflowTracker``, so
the code that tracks one pipeline (``ptlab.pipeline.run.record_pipeline``) tracks a recorded one
unchanged. ``BulkRunWriter`` then writes many recorded pipelines into a database-backed MLflow store
in one transaction per batch, with MLflow's own table definitions (``ptlab.tracking.sql`` pins the
MLflow versions they were checked against): the same runs, tags, params, metric
histories, latest metrics and artifacts as the client calls would leave, without their per-call cost
(``create_run`` about 6 ms, ``log_batch`` about 0.15 ms per metric point through the ORM on SQLite).
Runs are written FINISHED once their pipeline is done, so an interrupted sweep leaves nothing RUNNING.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

from mlflow.entities import LifecycleStage, RunStatus, SourceType
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_USER
from mlflow.utils.uri import append_to_uri_path

from ptlab.errors import ConfigError
from ptlab.tracking.api_writer import ApiRunWriter
from ptlab.tracking.base import MemoryTracker
from ptlab.tracking.faults import store_error, store_fault, tracking_write
from ptlab.tracking.mlflow import default_artifact_location, get_or_create_experiment, provenance_tags, resolve_tracking_uri
from ptlab.tracking.sql import (
    DATABASE_SCHEMES,
    SqlLatestMetric,
    SqlMetric,
    SqlParam,
    SqlRun,
    SqlTag,
    check_tables,
    create_engine,
    is_database_uri,
    metric_rows,
    tables_checked,
)
from ptlab.tracking.stale import PROCESS_TAG, mark_vanished, process_tag


class BulkRunWriter:
    """Writes ``MemoryTracker`` pipelines into one MLflow experiment of a database-backed store."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_location: str | None = None) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        if not is_database_uri(self.tracking_uri):
            raise ConfigError(
                f"logger.tracking_uri={tracking_uri!r} is not allowed with the batched gram launcher: "
                f"must be a database URI ({', '.join(s + '://' for s in DATABASE_SCHEMES)}), "
                "or use logger=none"
            )
        client = MlflowClient(self.tracking_uri)
        location = artifact_location or default_artifact_location(self.tracking_uri, experiment_name)
        self.experiment_id = get_or_create_experiment(client, experiment_name, location)
        mark_vanished(client, [self.experiment_id])
        self.artifact_root = client.get_experiment(self.experiment_id).artifact_location
        self.context_tags = {k: str(v) for k, v in provenance_tags({}).items()}
        """What ``MLFlowLogger`` adds to a child run (user, source); resolved once."""
        check_tables()
        self.engine = create_engine(self.tracking_uri)

    def tracker(self, run_name: str, tags: Mapping[str, str]) -> MemoryTracker:
        """A memory tracker for one pipeline of this experiment."""
        return MemoryTracker(
            self.tracking_uri, self.experiment_id, run_name, {**tags, PROCESS_TAG: process_tag()}, self.context_tags
        )

    def write(self, trackers: Iterable[MemoryTracker]) -> int:
        """Store every run of ``trackers`` (rows in one transaction, then artifacts); returns the run count.
        A signal that arrives meanwhile is raised once rows and artifacts are all written."""
        with tracking_write():
            try:
                return self._write(trackers)
            except Exception as err:
                if store_fault(err):  # a full disk, a damaged file: one line (the runs' rows are all or none)
                    raise store_error(err, self.tracking_uri) from err
                raise

    def _write(self, trackers: Iterable[MemoryTracker]) -> int:
        runs, tags, params, metrics, latest = [], [], [], [], []
        artifacts: list[tuple[str, dict[str, bytes]]] = []
        for tracker in trackers:
            for run in tracker.runs():
                artifact_uri = append_to_uri_path(self.artifact_root, run.run_id, "artifacts")
                runs.append(
                    dict(
                        run_uuid=run.run_id,
                        name=run.name,
                        source_type=SourceType.to_string(SourceType.UNKNOWN),
                        source_name="",
                        entry_point_name="",
                        user_id=run.tags.get(MLFLOW_USER, "unknown"),
                        status=run.status if run.status != "RUNNING" else RunStatus.to_string(RunStatus.FINISHED),
                        start_time=run.start_ms,
                        end_time=run.end_ms,
                        deleted_time=None,
                        source_version="",
                        lifecycle_stage=LifecycleStage.ACTIVE,
                        artifact_uri=artifact_uri,
                        experiment_id=int(self.experiment_id),
                    )
                )
                tags.extend(dict(key=k, value=v[:8000], run_uuid=run.run_id) for k, v in run.tags.items())
                params.extend(dict(key=k, value=v, run_uuid=run.run_id) for k, v in run.params.items())
                rows, newest = metric_rows(run.run_id, run.metrics)
                metrics.extend(rows)
                latest.extend(newest.values())
                if run.artifacts:
                    artifacts.append((artifact_uri, run.artifacts))
        with self.engine.begin() as connection:
            for table, rows in (
                (SqlRun, runs),
                (SqlTag, tags),
                (SqlParam, params),
                (SqlMetric, metrics),
                (SqlLatestMetric, latest),
            ):
                if rows:
                    connection.execute(table.__table__.insert(), rows)
        for artifact_uri, texts in artifacts:
            self._write_artifacts(artifact_uri, texts)
        return len(runs)

    def abandon(self, trackers: Iterable[MemoryTracker], status: str = "KILLED") -> None:
        """Nothing to end: this writer creates a pipeline's runs only when it writes them."""

    @staticmethod
    def _write_artifacts(artifact_uri: str, files: Mapping[str, bytes]) -> None:
        """Local artifact stores get the files written in place (what their repository's copy would leave);
        others go through MLflow's artifact repository."""
        parsed = urlparse(artifact_uri)
        if parsed.scheme in ("", "file") and not parsed.netloc:
            root = Path(url2pathname(parsed.path))
            for name, content in files.items():
                path = root / name
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
            return
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in files.items():
                path = Path(tmp, name)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(content)
            get_artifact_repository(artifact_uri).log_artifacts(tmp)


RunWriter = BulkRunWriter | ApiRunWriter
"""What writes a batched sweep's recorded pipelines (``tracker``, ``write``, ``experiment_id``, ``context_tags``)."""


def run_writer(tracking_uri: str, experiment_name: str, artifact_location: str | None = None) -> RunWriter:
    """The writer for a batched sweep's store: direct SQL rows (``BulkRunWriter``) only for a local SQLite file whose
    MLflow tables are the ones ptlab checked; MLflow's public client (``ApiRunWriter``) for a tracking server, another
    database, a file store or another MLflow version."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and tables_checked():
        return BulkRunWriter(uri, experiment_name, artifact_location)
    return ApiRunWriter(uri, experiment_name, artifact_location)

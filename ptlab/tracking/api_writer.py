"""Many recorded pipelines written through MLflow's public client: any store MLflow can reach (a tracking server,
a database, a file store), any MLflow version.

``BulkRunWriter`` (``ptlab.tracking.bulk``) writes MLflow's SQL tables directly, which is only safe for a local SQLite
file whose tables ptlab checked. ``ApiRunWriter`` has the same interface and stores the same runs with
``create_run``, ``log_batch`` (in MLflow's batch limits), artifact uploads and ``set_terminated``. MLflow's client
chooses run ids, so each recorded run is created when its ``MemoryTracker`` opens it (RUNNING, with the process tag
that lets the next command close it if this process dies) and filled and ended when the pipeline is written.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from ptlab.tracking.base import MemoryTracker, RecordedRun
from ptlab.tracking.faults import tracking_write
from ptlab.tracking.heartbeat import beat_tags, start_beating, stop_beating
from ptlab.tracking.mlflow import default_artifact_location, get_or_create_experiment, provenance_tags, resolve_tracking_uri
from ptlab.tracking.stale import PROCESS_TAG, mark_vanished, process_tag

MAX_METRICS, MAX_PARAMS, MAX_TAGS = 1000, 100, 100
"""MLflow's limits for one ``log_batch`` call."""


class ApiRunWriter:
    """Writes ``MemoryTracker`` pipelines into one MLflow experiment through the public client."""

    def __init__(self, tracking_uri: str, experiment_name: str, artifact_location: str | None = None) -> None:
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self.client = MlflowClient(self.tracking_uri)
        location = artifact_location or default_artifact_location(self.tracking_uri, experiment_name)
        self.experiment_id = get_or_create_experiment(self.client, experiment_name, location)
        mark_vanished(self.client, [self.experiment_id])
        self.context_tags = {k: str(v) for k, v in provenance_tags({}).items()}
        """What MLflow's context adds to a run (user, source); resolved once."""

    def _create(self, name: str, tags: Mapping[str, str]) -> str:
        beating = beat_tags(self.tracking_uri)
        created = {PROCESS_TAG: tags.get(PROCESS_TAG, process_tag()), **beating}
        run_id = self.client.create_run(self.experiment_id, run_name=name, tags=created).info.run_id
        if beating:
            start_beating(self.tracking_uri, run_id)
        return run_id

    def tracker(self, run_name: str, tags: Mapping[str, str]) -> MemoryTracker:
        """A memory tracker for one pipeline of this experiment, its runs created in the store as it opens them."""
        return MemoryTracker(
            self.tracking_uri,
            self.experiment_id,
            run_name,
            {**tags, PROCESS_TAG: process_tag()},
            self.context_tags,
            new_run_id=self._create,
        )

    def write(self, trackers: Iterable[MemoryTracker]) -> int:
        """Fill and end every run of ``trackers``; returns the run count. A signal that arrives meanwhile is raised
        once they are all written."""
        count = 0
        with tracking_write():
            for tracker in trackers:
                for run in tracker.runs():
                    self._write_run(run)
                    count += 1
        return count

    def _write_run(self, run: RecordedRun) -> None:
        tags = [RunTag(k, v[:8000]) for k, v in run.tags.items() if k != PROCESS_TAG]
        params = [Param(k, v) for k, v in run.params.items()]
        metrics = [Metric(key, value, stamp, step) for key, value, stamp, step in run.metrics]
        for start in range(0, len(metrics), MAX_METRICS):
            self.client.log_batch(run.run_id, metrics=metrics[start : start + MAX_METRICS])
        for start in range(0, len(params), MAX_PARAMS):
            self.client.log_batch(run.run_id, params=params[start : start + MAX_PARAMS])
        for start in range(0, len(tags), MAX_TAGS):
            self.client.log_batch(run.run_id, tags=tags[start : start + MAX_TAGS])
        if run.artifacts:
            with tempfile.TemporaryDirectory() as tmp:
                for name, content in run.artifacts.items():
                    path = Path(tmp, name)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(content)
                self.client.log_artifacts(run.run_id, tmp)
        status = run.status if run.status != "RUNNING" else "FINISHED"
        self.client.set_terminated(run.run_id, status, end_time=run.end_ms)
        stop_beating(run.run_id)

    def abandon(self, trackers: Iterable[MemoryTracker], status: str = "KILLED") -> None:
        """End the runs of pipelines that will not be written (the sweep was stopped): they exist in the store, so
        they are marked ``status`` rather than left RUNNING."""
        with tracking_write():
            for tracker in trackers:
                for run in tracker.runs():
                    stop_beating(run.run_id)
                    self.client.set_terminated(run.run_id, status)

"""The ``Tracker`` interface of a pipeline, and the trackers that need no tracking library.

A pipeline has one parent run and a child run per stage (docs/design.md section 5). Code that
tracks talks to a ``Tracker``: ``MLflowTracker`` (``ptlab.tracking.mlflow``) writes through MLflow's
client, ``NullTracker`` stores nothing (``logger=none``), ``MemoryTracker`` keeps everything in memory
for ``ptlab.tracking.bulk.BulkRunWriter`` to store later in bulk (the batched sweep). Every method
is spelled out in each of them, so a misspelled call is an ``AttributeError``, never a silent no-op.
"""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from time import time
from types import TracebackType
from typing import Any, Protocol, runtime_checkable

from ptlab.utils import flatten  # noqa: F401 - re-exported: the pipeline imports it from here

STAGE_TAG = "ptlab.stage"
CELL_TAG = "ptlab.cell"
NOTE_TAG = "mlflow.note.content"
PARENT_RUN_TAG = "mlflow.parentRunId"
CONFIG_HASH_TAG = "ptlab.config_hash"
"""A pipeline's config hash (``ptlab.pipeline.resume.hash_resolved``): what resume and the report key runs by."""
GRID_KEY_TAG = "ptlab.grid_key"
"""A grid row's identity (``ptlab.pipeline.batched.grid_key``): the report keeps the latest row of each."""
RUN_NAME_TAG = "mlflow.runName"

Curves = Mapping[str, Sequence[tuple[int, float]]]
"""Metric curves: name -> [(step, value)]."""


HTTP_REQUEST_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "5",
}
"""MLflow's HTTP client settings (its documented environment variables) that ptlab sets when they are unset: 3
tries, 1 s and 2 s apart, 5 s each, so a tracking server that is down or stops answering fails a call within
about 20 s (MLflow's own defaults retry for about 4 minutes). Set the variables to change them."""


def bound_http_requests() -> None:
    """Set ``HTTP_REQUEST_DEFAULTS`` where the environment does not set them (MLflow reads them per request)."""
    for name, value in HTTP_REQUEST_DEFAULTS.items():
        os.environ.setdefault(name, value)


def resolve_tracking_uri(uri: str, cwd: Path | None = None) -> str:
    """Make a relative ``sqlite:///file.db`` absolute against ``cwd`` (default: the current directory); for an
    HTTP store, bound MLflow's retries first (``bound_http_requests``)."""
    if uri.startswith(("http://", "https://")):
        bound_http_requests()
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(((cwd or Path.cwd()) / uri[len(prefix) :]).resolve())
    return uri


SPLITS = ("train", "test", "val")
RENAMED_PREFIXES = {"decomp": "signal_noise", "final": "summary"}


def metric_name(key: str) -> str:
    """The MLflow name of a metric: MLflow's run page groups charts by the name's first ``/`` part and orders
    the groups by name, so ``train/loss`` and ``test/loss`` are stored as ``loss/train`` and ``loss/test`` (one
    group, ``acc`` and ``loss`` first), the filters' decomposition ``decomp/*`` as ``signal_noise/*`` and a
    stage's final numbers ``final/*`` as ``summary/*`` after them, Lightning's ``lr-SGD`` as ``optimizer/lr-SGD``."""
    head, sep, tail = key.partition("/")
    if sep and head in SPLITS and "/" not in tail:
        return f"{tail}/{head}"
    if sep and head in RENAMED_PREFIXES:
        return f"{RENAMED_PREFIXES[head]}/{tail}"
    if key.startswith("lr-"):
        return f"optimizer/{key}"
    return key


def curve_points(curves: Curves, stamp: int) -> list[tuple[str, float, int, int]]:
    """``curves`` as (MLflow name, value, timestamp ms, step) points; a point's timestamp is ``stamp + step`` ms,
    so that MLflow's time axis runs along the steps too (curves are stored after their stage ends)."""
    return [
        (metric_name(key), float(value), stamp + int(step), int(step)) for key, points in curves.items() for step, value in points
    ]


def child_name(stage: str, cell: str) -> str:
    """A stage's run name: ``<stage> | <cell name>``, so a child run says which cell it belongs to."""
    return f"{stage} | {cell}" if cell else stage


def as_json(data: Any) -> str:
    """``data`` as the JSON text of an artifact (a string is stored as given)."""
    return data if isinstance(data, str) else json.dumps(data, indent=2, default=str)


@runtime_checkable
class Tracker(Protocol):
    """One pipeline's runs: the parent (``stage=None``) and a child per stage."""

    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    children: dict[str, str]

    def __enter__(self) -> Tracker: ...

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None: ...

    def start_stage(self, stage: str) -> None:
        """Open the child run of ``stage`` (RUNNING until ``end_stage`` or the pipeline's end)."""

    def end_stage(self, stage: str, status: str = "FINISHED") -> None:
        """Close the child run of ``stage``."""

    def stage_logger(self, stage: str) -> Any:
        """A Lightning logger on the child run of ``stage`` for live curves, or ``None``."""

    def log_params(self, params: Mapping[str, Any], stage: str | None = None) -> None: ...

    def log_metrics(self, metrics: Mapping[str, float], stage: str | None = None, step: int = 0) -> None: ...

    def log_curves(self, curves: Curves, stage: str | None = None) -> None:
        """Store whole metric curves at once (one write, not one per point)."""

    def set_tags(self, tags: Mapping[str, Any], stage: str | None = None) -> None: ...

    def log_dict(self, data: Any, artifact_file: str, stage: str | None = None) -> None: ...

    def log_text(self, text: str, artifact_file: str, stage: str | None = None) -> None: ...

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, stage: str | None = None) -> None: ...


class NullTracker:
    """Tracking switched off (``logger=none``): the same calls, nothing stored."""

    tracking_uri = experiment_id = parent_run_id = ""

    def __init__(self) -> None:
        self.children: dict[str, str] = {}

    def __enter__(self) -> NullTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        return None

    def start_stage(self, stage: str) -> None:
        return None

    def end_stage(self, stage: str, status: str = "FINISHED") -> None:
        return None

    def stage_logger(self, stage: str) -> None:
        return None

    def log_params(self, params: Mapping[str, Any], stage: str | None = None) -> None:
        return None

    def log_metrics(self, metrics: Mapping[str, float], stage: str | None = None, step: int = 0) -> None:
        return None

    def log_curves(self, curves: Curves, stage: str | None = None) -> None:
        return None

    def set_tags(self, tags: Mapping[str, Any], stage: str | None = None) -> None:
        return None

    def log_dict(self, data: Any, artifact_file: str, stage: str | None = None) -> None:
        return None

    def log_text(self, text: str, artifact_file: str, stage: str | None = None) -> None:
        return None

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, stage: str | None = None) -> None:
        return None


class RecordedRun:
    """One run held in memory: tags, params, metric points and artifacts (name -> bytes)."""

    def __init__(self, name: str, tags: Mapping[str, str], run_id: str | None = None) -> None:
        self.run_id = run_id or uuid.uuid4().hex
        self.name = name
        self.tags: dict[str, str] = {RUN_NAME_TAG: name, **{k: str(v) for k, v in tags.items()}}
        self.params: dict[str, str] = {}
        self.metrics: list[tuple[str, float, int, int]] = []
        self.artifacts: dict[str, bytes] = {}
        self.start_ms = int(time() * 1000)
        self.end_ms = self.start_ms
        self.status = "RUNNING"

    def finish(self, status: str = "FINISHED") -> None:
        self.status = status
        self.end_ms = int(time() * 1000)


class MemoryTracker:
    """A pipeline's runs recorded in memory, run ids fixed at creation; ``BulkRunWriter`` or ``ApiRunWriter`` stores
    them.

    ``child_tags`` are added to the parent and every child run (what MLflow's context adds to a run: user, source,
    git commit); ``new_run_id`` (name, tags) -> id gives each run its id when it opens (the store's, for a writer
    that cannot choose ids)."""

    def __init__(
        self,
        tracking_uri: str = "",
        experiment_id: str = "",
        run_name: str = "pipeline",
        tags: Mapping[str, str] | None = None,
        child_tags: Mapping[str, str] | None = None,
        new_run_id: Callable[[str, Mapping[str, str]], str] | None = None,
    ) -> None:
        self.tracking_uri, self.experiment_id = tracking_uri, experiment_id
        self.tags = dict(tags or {})
        self.child_tags = dict(child_tags or {})
        self.new_run_id = new_run_id
        self.tags.setdefault(CELL_TAG, run_name)
        self.parent = self._open(run_name, {**self.child_tags, STAGE_TAG: "pipeline", **self.tags})
        self.parent_run_id = self.parent.run_id
        self.stages: dict[str, RecordedRun] = {}
        self.children: dict[str, str] = {}

    def __enter__(self) -> MemoryTracker:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        status = "FINISHED" if exc_type is None else ("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")
        if exc_type is not None:
            self.parent.tags["ptlab.error"] = f"{exc_type.__name__}: {exc}"[:5000]
        for run in self.stages.values():
            if run.status == "RUNNING":
                run.finish(status)
        self.parent.finish(status)

    def run(self, stage: str | None = None) -> RecordedRun:
        return self.stages[stage] if stage else self.parent

    def runs(self) -> list[RecordedRun]:
        return [self.parent, *self.stages.values()]

    def _open(self, name: str, tags: Mapping[str, str]) -> RecordedRun:
        return RecordedRun(name, tags, self.new_run_id(name, tags) if self.new_run_id is not None else None)

    def start_stage(self, stage: str) -> None:
        run = self._open(
            child_name(stage, self.parent.name),
            {**self.child_tags, PARENT_RUN_TAG: self.parent_run_id, STAGE_TAG: stage, **self.tags},
        )
        self.stages[stage] = run
        self.children[stage] = run.run_id

    def end_stage(self, stage: str, status: str = "FINISHED") -> None:
        self.stages[stage].finish(status)

    def stage_logger(self, stage: str) -> None:
        return None

    def log_params(self, params: Mapping[str, Any], stage: str | None = None) -> None:
        self.run(stage).params.update({k: str(v)[:6000] for k, v in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], stage: str | None = None, step: int = 0) -> None:
        stamp = int(time() * 1000)
        self.run(stage).metrics.extend((metric_name(k), float(v), stamp, step) for k, v in metrics.items())

    def log_curves(self, curves: Curves, stage: str | None = None) -> None:
        self.run(stage).metrics.extend(curve_points(curves, int(time() * 1000)))

    def set_tags(self, tags: Mapping[str, Any], stage: str | None = None) -> None:
        self.run(stage).tags.update({k: str(v) for k, v in tags.items()})

    def log_dict(self, data: Any, artifact_file: str, stage: str | None = None) -> None:
        self.log_text(as_json(data), artifact_file, stage)

    def log_text(self, text: str, artifact_file: str, stage: str | None = None) -> None:
        self.run(stage).artifacts[artifact_file] = text.encode()

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, stage: str | None = None) -> None:
        name = Path(path).name
        self.run(stage).artifacts[f"{artifact_path}/{name}" if artifact_path else name] = Path(path).read_bytes()

    def artifact_text(self, name: str, stage: str | None = None) -> str:
        """A recorded artifact as text (for tests and for the sweep's ``.hydra/config.yaml``)."""
        return self.run(stage).artifacts[name].decode()

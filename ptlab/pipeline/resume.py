"""Resumable sweeps: a pipeline whose config already has a FINISHED parent run is not run again.

Every parent run is tagged ``ptlab.config_hash``: the SHA-256 of the resolved config without the keys
that do not change results (where it is tracked, the cache, resume itself, which GPU it ran on, the
theory's constants).
Re-running a multirun after a crash or a kill then skips the cells that finished and re-runs the
others (FAILED, KILLED, or never started). ``resume.skip_finished``: ``multirun`` (default: only
under ``-m``), ``always``, or ``never``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ptlab.distributed import is_global_zero
from ptlab.tracking.base import CONFIG_HASH_TAG, STAGE_TAG

if TYPE_CHECKING:
    from mlflow.entities import Run

    from ptlab.config import LoggerSchema, ResumeSchema
    from ptlab.spec import PipelineSpec

RESUMED_TAG = "ptlab.resumed_from"
IGNORED_KEYS = ("logger", "cache", "resume", "devices", "theory", "transferability")
"""Top-level keys that do not change what a pipeline computes (the theory's constants only relabel it; the
transferability scores are read off the models, not trained into them)."""


NEUTRAL_DEFAULTS: dict[tuple[str, ...], Any] = {
    ("regularizer",): {"name": "none"},
    ("transfer", "control"): "none",
    ("train", "scratch_budget"): "downstream",
    ("engine", "device"): None,
}
"""Keys added after stores held finished runs, at the value that computes what the config computed before them: left
out of the hash there, so a finished run is still found on resume (any other value changes the hash)."""


def hash_resolved(resolved: dict[str, Any]) -> str:
    """SHA-256 of a resolved config container minus ``IGNORED_KEYS`` and the ``NEUTRAL_DEFAULTS`` at their neutral
    value; ``trainer.devices`` counts, not indices."""
    kept = {k: v for k, v in resolved.items() if k not in ("hydra", *IGNORED_KEYS)}
    for path, neutral in NEUTRAL_DEFAULTS.items():
        *parents, leaf = path
        node = kept
        for key in parents:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == neutral:
            if parents:
                kept[parents[0]] = node = _without(kept[parents[0]], parents[1:], leaf)
            else:
                del kept[leaf]
    trainer = kept.get("trainer")
    if isinstance(trainer, dict) and isinstance(trainer.get("devices"), list):
        kept["trainer"] = {**trainer, "devices": len(trainer["devices"])}
    canonical = json.dumps(kept, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _without(node: dict[str, Any], path: list[str], leaf: str) -> dict[str, Any]:
    """A copy of ``node`` without ``leaf`` at ``path`` below it (the resolved container itself is left as it is)."""
    if not path:
        return {k: v for k, v in node.items() if k != leaf}
    return {**node, path[0]: _without(node[path[0]], path[1:], leaf)}


def config_hash(spec: PipelineSpec) -> str:
    """``hash_resolved`` of the spec's resolved config."""
    return hash_resolved(dict(spec.resolved))


def should_skip_finished(resume: ResumeSchema, logger: LoggerSchema, multirun: bool) -> bool:
    """Whether ``resume.skip_finished`` applies to this job (tracking on, and a multirun for ``multirun``)."""
    mode = resume.skip_finished
    if logger.kind == "none" or mode == "never":
        return False
    return mode == "always" or multirun


def _finished_query(
    tracking_uri: str, experiment_name: str, extra: str = "", max_results: int = 50000, newest_first: bool = True
) -> list[Run]:
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ptlab.tracking.mlflow import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    try:
        experiment = client.get_experiment_by_name(experiment_name)
    except MlflowException:
        return []
    if experiment is None:
        return []
    return client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{STAGE_TAG}` = 'pipeline' and attributes.status = 'FINISHED'{extra}",
        order_by=[f"attributes.start_time {'DESC' if newest_first else 'ASC'}"],
        max_results=max_results,
    )


def find_finished(tracking_uri: str, experiment_name: str, digest: str) -> Run | None:
    """The newest FINISHED parent run of ``experiment_name`` tagged with config hash ``digest``."""
    runs = _finished_query(tracking_uri, experiment_name, f" and tags.`{CONFIG_HASH_TAG}` = '{digest}'", 1)
    return runs[0] if runs else None


def live_runs(client: Any, experiment_id: str, digest: str, now: float) -> list[Run]:
    """RUNNING pipeline runs of config ``digest`` whose process is alive as far as the store tells: another process
    than this one, neither vanished nor silent (``ptlab.tracking.stale.dead_runs``; without a heartbeat, a run of
    another host counts as alive)."""
    from ptlab.tracking.stale import PROCESS_TAG, dead_runs, process_tag, running_runs

    running = running_runs(client, [experiment_id])
    dead = dead_runs(running, now)
    return [
        run
        for run in running
        if run.data.tags.get(STAGE_TAG) == "pipeline"
        and run.data.tags.get(CONFIG_HASH_TAG) == digest
        and run.info.run_id not in dead
        and run.data.tags.get(PROCESS_TAG) != process_tag()
    ]


def wait_for_live_runs(tracking_uri: str, experiment_name: str, digest: str, timeout: float, poll: float = 2.0) -> None:
    """Wait while another live process runs config ``digest`` in ``experiment_name`` of the store, whatever its
    ``cache.dir`` or host (the config's file lock only meets processes sharing a folder); ``ConfigError`` after
    ``timeout`` seconds (``cache.lock_timeout``). Two processes that both look before either opened its run still
    both run it: the store has no atomic claim."""
    import time

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ptlab.errors import ConfigError
    from ptlab.tracking.mlflow import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    try:
        experiment = client.get_experiment_by_name(experiment_name)
    except MlflowException:
        return
    if experiment is None:
        return
    deadline = time.monotonic() + timeout
    while live := live_runs(client, experiment.experiment_id, digest, time.time()):
        if time.monotonic() >= deadline:
            raise ConfigError(
                f"cache.lock_timeout={timeout:g}: run {live[0].info.run_id} of another process has run this config "
                "longer; raise it, or end that run (python -m ptlab.tracking.stale ends one whose process is gone)"
            )
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))


def finished_runs(tracking_uri: str, experiment_name: str) -> dict[str, Run]:
    """Every FINISHED parent run of the experiment by config hash (the newest wins), for a sweep's resume."""
    return {run.data.tags.get(CONFIG_HASH_TAG): run for run in _finished_query(tracking_uri, experiment_name, newest_first=False)}


def finished_summary(tracking_uri: str, run: Run) -> dict[str, Any]:
    """The ``summary.json`` artifact of ``run`` (its metrics when the artifact is missing), marked as resumed."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from ptlab.tracking.mlflow import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"  # a skipped cell prints one line, no bar
    try:
        with tempfile.TemporaryDirectory() as tmp:
            summary = json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", tmp)).read_text())
    except (MlflowException, OSError, ValueError):
        summary = {"metrics": dict(run.data.metrics)}
    summary["resumed_from"] = run.info.run_id
    return summary


def skip_if_finished(
    resume: ResumeSchema, logger: LoggerSchema, digest: str, output_dir: Path, multirun: bool
) -> dict[str, Any] | None:
    """When this config already FINISHED (and ``resume.skip_finished`` applies): write its summary to
    ``output_dir/summary.json``, say so in one line and return it; otherwise ``None``. Every DDP rank
    looks (read-only), so that all of them skip or none does."""
    if not should_skip_finished(resume, logger, multirun):
        return None
    run = find_finished(logger.tracking_uri, logger.experiment_name, digest)
    if run is None:
        return None
    summary = finished_summary(logger.tracking_uri, run)
    if not is_global_zero():
        return summary
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(
        f"ptlab: skipped, run {run.info.run_id} of experiment {logger.experiment_name!r} already "
        f"FINISHED this config (resume.skip_finished={resume.skip_finished})"
    )
    return summary

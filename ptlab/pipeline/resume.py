"""Resumable sweeps: a pipeline whose config already has a FINISHED parent run is not run again.

Every parent run is tagged ``ptlab.config_hash``: the SHA-256 of the resolved config without the keys
that do not change results (where it is tracked, the cache, resume itself, which GPU it ran on).
Re-running a multirun after a crash or a kill then skips the cells that finished and re-runs the
others (FAILED, KILLED, or never started). ``resume.skip_finished``: ``multirun`` (default: only
under ``-m``), ``always``, or ``never``.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf

from ptlab.distributed import is_global_zero
from ptlab.tracking.mlflow import STAGE_TAG, resolve_tracking_uri

CONFIG_HASH_TAG = "ptlab.config_hash"
RESUMED_TAG = "ptlab.resumed_from"
IGNORED_KEYS = ("logger", "cache", "resume", "devices")
"""Top-level keys that do not change what a pipeline computes."""


def config_hash(cfg: DictConfig) -> str:
    """SHA-256 of the resolved config minus ``IGNORED_KEYS``; ``trainer.devices`` counts, not indices."""
    resolved = OmegaConf.to_container(cfg, resolve=True)
    for key in ("hydra", *IGNORED_KEYS):
        resolved.pop(key, None)
    trainer = resolved.get("trainer")
    if isinstance(trainer, dict) and isinstance(trainer.get("devices"), list):
        trainer["devices"] = len(trainer["devices"])
    canonical = json.dumps(resolved, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def should_skip_finished(cfg: DictConfig) -> bool:
    """Whether ``resume.skip_finished`` applies to this job (tracking on, and a multirun for ``multirun``)."""
    mode = cfg.resume.skip_finished
    if cfg.logger.kind == "none" or mode == "never":
        return False
    if mode == "always":
        return True
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def find_finished(tracking_uri: str, experiment_name: str, digest: str) -> Run | None:
    """The newest FINISHED parent run of ``experiment_name`` tagged with config hash ``digest``."""
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    try:
        experiment = client.get_experiment_by_name(experiment_name)
    except MlflowException:
        return None
    if experiment is None:
        return None
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string=(f"tags.`{CONFIG_HASH_TAG}` = '{digest}' and tags.`{STAGE_TAG}` = 'pipeline' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"], max_results=1)
    return runs[0] if runs else None


def finished_summary(tracking_uri: str, run: Run) -> dict[str, Any]:
    """The ``summary.json`` artifact of ``run`` (its metrics when the artifact is missing), marked as resumed."""
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            summary = json.loads(Path(client.download_artifacts(run.info.run_id, "summary.json", tmp)).read_text())
    except (MlflowException, OSError, ValueError):
        summary = {"metrics": dict(run.data.metrics)}
    summary["resumed_from"] = run.info.run_id
    return summary


def skip_if_finished(cfg: DictConfig, digest: str, output_dir: Path) -> dict[str, Any] | None:
    """When this config already FINISHED (and ``resume.skip_finished`` applies): write its summary to
    ``output_dir/summary.json``, say so in one line and return it; otherwise ``None``. Every DDP rank
    looks (read-only), so that all of them skip or none does."""
    if not should_skip_finished(cfg):
        return None
    run = find_finished(cfg.logger.tracking_uri, cfg.logger.experiment_name, digest)
    if run is None:
        return None
    summary = finished_summary(cfg.logger.tracking_uri, run)
    if not is_global_zero():
        return summary
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"ptlab: skipped, run {run.info.run_id} of experiment {cfg.logger.experiment_name!r} already "
          f"FINISHED this config (resume.skip_finished={cfg.resume.skip_finished})")
    return summary

"""``run_pipeline``: validate, open the MLflow parent run, run the task's stages, write summary.json."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ptlab.config import validate
from ptlab.devices import job_device
from ptlab.distributed import is_global_zero
from ptlab.pipeline.images import run_images
from ptlab.pipeline.checkpoints import discard_checkpoints
from ptlab.pipeline.resume import CONFIG_HASH_TAG, config_hash, skip_if_finished
from ptlab.pipeline.synthetic import log_theory, run_synthetic
from ptlab.tracking import NullTracker, PipelineTracker, flatten, make_tracker, resolve_tracking_uri
from ptlab.tracking.faults import prepare_sqlite_store, signals_as_interrupt

StageRunner = Callable[[DictConfig, "PipelineTracker | NullTracker"], dict[str, Any]]

RUNNERS: dict[str, StageRunner] = {"synthetic": run_synthetic, "cifar10": run_images, "cifar100": run_images,
                                   "digits": run_images}
"""Stage runners by ``task.name``; image tasks register theirs here."""

STAGES = ("upstream", "transfer", "scratch")


def _hydra_choices() -> dict[str, str]:
    if not HydraConfig.initialized():
        return {}
    choices = HydraConfig.get().runtime.choices
    return {k: str(v) for k, v in choices.items() if not k.startswith("hydra") and "schema" not in k}


def _run_name(cfg: DictConfig) -> str:
    if HydraConfig.initialized():
        overrides = HydraConfig.get().job.override_dirname
        if overrides:
            return overrides
    return f"seed={cfg.seed}"


def format_table(summary: dict[str, Any]) -> str:
    """A short text table of the stages' accuracies."""
    lines = [f"{'stage':<10}{'train_acc':>11}{'test_acc':>10}"]
    for stage in STAGES:
        result = summary.get(stage)
        if result:
            lines.append(f"{stage:<10}{result['train_acc']:>11.4f}{result['test_acc']:>10.4f}")
    if summary.get("transfer") and summary.get("scratch"):
        gain = summary["transfer"]["test_acc"] - summary["scratch"]["test_acc"]
        lines.append(f"transfer - scratch test accuracy: {gain:+.4f}")
    if summary.get("theory"):
        theory = summary["theory"]
        lines.append(f"theory: {theory['predicted']} (d / D* = {theory['d_over_threshold']:.3g}, "
                     f"Gamma = {theory['gamma']:.3g})")
    return "\n".join(lines)


def run_pipeline(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run one pipeline; returns (and writes to ``output_dir/summary.json``) its summary."""
    validate(cfg)
    runner = RUNNERS[cfg.task.name]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    choices = _hydra_choices()
    digest = config_hash(cfg)
    tags = {"ptlab.seed": str(cfg.seed), CONFIG_HASH_TAG: digest,
            **{f"ptlab.choice.{k}": v for k, v in choices.items()}}
    if cfg.logger.kind == "mlflow":
        prepare_sqlite_store(resolve_tracking_uri(cfg.logger.tracking_uri), wal=cfg.logger.sqlite_wal)
    finished = skip_if_finished(cfg, digest, output_dir)
    if finished is not None:
        return finished
    tracker = make_tracker(cfg.logger.kind if is_global_zero() else "none", cfg.logger.tracking_uri,
                           cfg.logger.experiment_name, _run_name(cfg), cfg.logger.artifact_location, tags)
    with job_device(cfg), tracker, signals_as_interrupt():
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved.pop("hydra", None)
        tracker.log_params(flatten(resolved))
        tracker.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
        theory = {"theory": log_theory(cfg, tracker)} if cfg.task.name == "synthetic" else {}
        results = runner(cfg, tracker)
        if is_global_zero():
            discard_checkpoints(cfg)
        summary: dict[str, Any] = {
            **results,
            **theory,
            "seed": cfg.seed,
            "choices": choices,
            "mlflow": {"tracking_uri": tracker.tracking_uri, "experiment_id": tracker.experiment_id,
                       "parent_run_id": tracker.parent_run_id},
        }
        final = {f"{stage}_{key}": summary[stage][key] for stage in STAGES if summary.get(stage)
                 for key in ("train_acc", "test_acc")}
        if summary.get("transfer") and summary.get("scratch"):
            final["transfer_gain"] = summary["transfer"]["test_acc"] - summary["scratch"]["test_acc"]
        tracker.log_metrics(final)
        text = json.dumps(summary, indent=2)
        if is_global_zero():
            (output_dir / "summary.json").write_text(text)
        tracker.log_text(text, "summary.json")
    print(format_table(summary))
    return summary

"""``run_pipeline``: validate, open the MLflow parent run, run the task's stages, write summary.json."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from ptlab.config import validate
from ptlab.pipeline.synthetic import run_synthetic
from ptlab.tracking import NullTracker, PipelineTracker, flatten, make_tracker

StageRunner = Callable[[DictConfig, "PipelineTracker | NullTracker"], dict[str, Any]]

RUNNERS: dict[str, StageRunner] = {"synthetic": run_synthetic}
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
    return "\n".join(lines)


def run_pipeline(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Run one pipeline; returns (and writes to ``output_dir/summary.json``) its summary."""
    validate(cfg)
    runner = RUNNERS[cfg.task.name]
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    choices = _hydra_choices()
    tags = {"ptlab.seed": str(cfg.seed), **{f"ptlab.choice.{k}": v for k, v in choices.items()}}
    tracker = make_tracker(cfg.logger.kind, cfg.logger.tracking_uri, cfg.logger.experiment_name,
                           _run_name(cfg), cfg.logger.artifact_location, tags)
    with tracker:
        resolved = OmegaConf.to_container(cfg, resolve=True)
        resolved.pop("hydra", None)
        tracker.log_params(flatten(resolved))
        tracker.log_text(OmegaConf.to_yaml(resolved), "config.yaml")
        results = runner(cfg, tracker)
        summary: dict[str, Any] = {
            **results,
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
        (output_dir / "summary.json").write_text(text)
        tracker.log_text(text, "summary.json")
    print(format_table(summary))
    return summary

"""The first log line of a job, written before torch, Lightning and MLflow load (several seconds on a
busy machine): what is about to train, stage by stage, with each stage's total. Standard library only."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def stage_totals(cfg: Mapping[str, Any]) -> str:
    """``upstream 800 GD steps, transfer 400 GD steps, scratch 400 GD steps`` (synthetic) or the epochs of an
    image pipeline (``upstream as built`` for 0 upstream epochs)."""
    train = cfg["train"]
    if cfg["task"]["name"] == "synthetic":
        up, down, unit = train["upstream_steps"], train["downstream_steps"], "GD steps"
    else:
        up, down, unit = train["upstream_epochs"], train["downstream_epochs"], "epochs"
    upstream = f"upstream {up} {unit}" if up else "upstream as built"
    return f"{upstream}, transfer {down} {unit}, scratch {down} {unit}"


def start_line(cfg: Mapping[str, Any]) -> str:
    """``starting seed=0 task=synthetic engine=gram: upstream 800 GD steps, transfer 400 GD steps, ...``."""
    return f"starting seed={cfg['seed']} task={cfg['task']['name']} engine={cfg['engine'].get('name')}: {stage_totals(cfg)}"

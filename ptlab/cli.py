"""``python -m ptlab``: the Hydra entry point that runs one pipeline per (multi)run job."""

from __future__ import annotations

from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from ptlab.config import ConfigError, register_configs
from ptlab.pipeline import run_pipeline

register_configs()

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")
"""The repo's top-level ``conf/`` (ptlab is installed editable, next to its configs)."""


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    """Run the pipeline of the composed config; returns the transfer test accuracy (for sweepers)."""
    try:
        summary = run_pipeline(cfg, Path(HydraConfig.get().runtime.output_dir))
    except ConfigError as err:
        raise SystemExit(f"ptlab: {err}") from None
    best = summary.get("transfer") or summary.get("scratch")
    return best["test_acc"] if best else None

"""DDP: ``trainer=ddp_spawn`` on 2 CPU processes, and ``ddp`` under ``-m`` switched to it."""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient

from ptlab.distributed import multirun_safe_strategy
from ptlab.pipeline import run_pipeline

DDP_SPAWN_CPU = ["engine=lightning", "trainer=ddp_spawn", "trainer.accelerator=cpu", "trainer.devices=2"]


def test_ddp_spawn_on_two_cpu_processes_equals_one_process(make_cfg, tracking_uri: str, tmp_path: Path) -> None:
    """Full-batch GD all-reduces two identical gradients: (g + g) / 2 == g exactly, so two ranks give
    the single-process model bit for bit (and the numbers come back from the spawned workers)."""
    single = run_pipeline(make_cfg("engine=lightning", "transfer=none", "logger=none"), tmp_path / "single")
    spawned = run_pipeline(make_cfg("transfer=none", *DDP_SPAWN_CPU), tmp_path / "ddp")
    assert spawned["scratch"] == single["scratch"]
    assert set(spawned["scratch"]) == {"train_acc", "test_acc", "train_loss", "budget", "steps"}
    client = MlflowClient(tracking_uri)
    parent = client.get_run(spawned["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["trainer.strategy"] == "ddp_spawn"
    (scratch,) = client.search_runs([parent.info.experiment_id], "tags.`ptlab.stage` = 'scratch'")
    assert scratch.info.status == "FINISHED"
    assert scratch.data.metrics["summary/test_acc"] == single["scratch"]["test_acc"]


def test_ddp_under_multirun_switches_to_ddp_spawn(make_cfg) -> None:
    cfg = make_cfg("trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2")
    assert multirun_safe_strategy(cfg, multirun=False) is None and cfg.trainer.strategy == "ddp"
    notice = multirun_safe_strategy(cfg, multirun=True)
    assert cfg.trainer.strategy == "ddp_spawn"
    assert notice is not None and "ddp_spawn" in notice and "\n" not in notice

"""Multi-process training (Lightning's DDP strategies) inside ptlab's pipelines.

- ``trainer=ddp`` starts ranks 1..n-1 by re-running the command line; every rank then runs the
  whole pipeline script, so only rank 0 tracks and writes (``is_global_zero``), and the other ranks
  read the upstream cache without locking. Re-running a ``-m`` command line would re-launch the
  sweep, so in a multirun ``ddp`` is switched to ``ddp_spawn`` (``multirun_safe_strategy``).
- ``trainer=ddp_spawn`` runs each fit in spawned workers and sends back only the weights and
  ``trainer.callback_metrics``; ``ptlab.engines.lightning.FinalToMainProcess`` carries
  ``FullBatchGD.final`` home that way.

This module imports neither torch nor Lightning, so the CLI and the gram engine can ask for the rank.
"""

from __future__ import annotations

import os

from omegaconf import DictConfig, open_dict

RANK_VARIABLES = ("RANK", "LOCAL_RANK", "SLURM_PROCID")
"""Set by Lightning's DDP launcher (children), torchrun or SLURM's srun; absent means rank 0."""

RELAUNCHING_STRATEGIES = ("ddp", "ddp_find_unused_parameters_true", "ddp_find_unused_parameters_false")
"""Strategies whose ranks are new processes running ``sys.argv`` again."""


def global_rank() -> int:
    """This process's rank in a multi-process run (0 when it is not one)."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return 0


def is_global_zero() -> bool:
    """True in the process that tracks, writes summaries and owns the cache lock."""
    return global_rank() == 0


def ranks_started_externally() -> bool:
    """True when srun or torchrun already started one process per rank (Lightning then launches none)."""
    return int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TORCHELASTIC_RUN_ID" in os.environ


def multirun_safe_strategy(cfg: DictConfig, multirun: bool) -> str | None:
    """Switch a re-launching DDP strategy to ``ddp_spawn`` in a multirun; returns the one-line notice.

    Lightning's ``ddp`` starts its other ranks by running ``sys.argv`` again; with ``-m`` that would
    start the whole sweep once more per rank. ``ddp_spawn`` starts them from inside the job instead.
    """
    strategy = cfg.trainer.get("strategy")
    if not multirun or not isinstance(strategy, str) or strategy not in RELAUNCHING_STRATEGIES:
        return None
    if ranks_started_externally():
        return None
    with open_dict(cfg):
        cfg.trainer.strategy = "ddp_spawn"
    return (
        f"ptlab: trainer.strategy={strategy} would re-launch the sweep from every rank under -m; "
        "using trainer.strategy=ddp_spawn for this job"
    )

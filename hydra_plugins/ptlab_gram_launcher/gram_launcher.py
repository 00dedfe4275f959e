"""``hydra/launcher=ptlab_gram``: every ``engine=gram`` synthetic job of a sweep in one batched process.

``python -m ptlab -m engine=gram hydra/launcher=ptlab_gram hydra/sweeper=ptlab_batched ...`` (what
``experiment=fig2`` selects) composes each job, groups
the cells by shape, trains them with ``ptlab.engines.gram`` and tracks every job as ``run_pipeline``
would (``ptlab.pipeline.batched``). Other jobs of the sweep run one by one, as with the basic launcher.
"""

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.utils import JobReturn, configure_log, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

SUBMITIT_DEFAULTS: Dict[str, Any] = {
    # logs, pickles and results of the jobs (%j: the job id)
    "folder": "${hydra.sweep.dir}/.submitit/%j",
    "timeout_min": 60,
    # torch threads of a job (the steps run on one, the d-space products and evaluations on these)
    "cpus_per_task": 1,
    # null: what the cells' engine.device needs (SLURM: 1 for cuda, else 0; local: the visible GPUs for cuda or auto)
    "gpus_per_node": None,
    "mem_gb": None,
    "slurm_partition": None,
    "slurm_array_parallelism": 64,
    "slurm_additional_parameters": {},
}
"""``hydra.launcher.submitit``: ``folder`` and ``submitit.AutoExecutor.update_parameters`` keywords (null: unset)."""


@dataclass
class PtlabGramLauncherConf:
    """``max_cells``: cells per batched chunk (memory about 1.2 MB a cell at N1=200, m=40, plus ~100 MB);
    ``workers``: processes that run chunks (null: torch's thread count); ``history``: curve points sent to MLflow
    per run: full | eval | last; ``progress``: a progress bar over cells; ``tracking``: auto | runs | grid, a run per
    cell or the grid layout (one grid run with a results table and ``grid_samples`` full cells; auto above
    ``grid_threshold`` cells, ``ptlab.pipeline.batched``); ``executor``: where the chunks train: pool (forked
    workers here), submitit_local or submitit_slurm (one submitit job a chunk; tracking stays here); ``submitit``: the
    jobs' folder and ``submitit.AutoExecutor`` parameters (docs/scaling.md)."""

    _target_: str = "hydra_plugins.ptlab_gram_launcher.gram_launcher.PtlabGramLauncher"
    max_cells: int = 60
    workers: Optional[int] = None
    history: str = "last"
    progress: bool = True
    tracking: str = "auto"
    grid_threshold: int = 2000
    grid_samples: int = 5
    executor: str = "pool"
    submitit: Dict[str, Any] = field(default_factory=lambda: dict(SUBMITIT_DEFAULTS))


ConfigStore.instance().store(group="hydra/launcher", name="ptlab_gram", node=PtlabGramLauncherConf, provider="ptlab")


class PtlabGramLauncher(Launcher):
    """Hydra ``Launcher`` that hands a sweep's jobs to ``ptlab.pipeline.batched.launch_batched``."""

    def __init__(
        self,
        max_cells: int = 60,
        workers: Optional[int] = None,
        history: str = "last",
        progress: bool = True,
        tracking: str = "auto",
        grid_threshold: int = 2000,
        grid_samples: int = 5,
        executor: str = "pool",
        submitit: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.max_cells, self.workers, self.history, self.progress = max_cells, workers, history, progress
        self.tracking, self.grid_threshold, self.grid_samples = tracking, grid_threshold, grid_samples
        options = SUBMITIT_DEFAULTS if submitit is None else submitit
        self.executor = executor
        self.submitit = OmegaConf.to_container(options, resolve=True) if isinstance(options, DictConfig) else dict(options)
        self.config: Optional[DictConfig] = None
        self.task_function: Optional[TaskFunction] = None
        self.hydra_context: Optional[HydraContext] = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from ptlab.errors import ConfigError, StoreError
        from ptlab.pipeline.batched import launch_batched  # torch and MLflow load only when a sweep runs

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        try:
            return launch_batched(
                self.hydra_context,
                self.task_function,
                self.config,
                job_overrides,
                initial_job_idx,
                self.max_cells,
                self.history,
                self.progress,
                self.workers,
                self.tracking,
                self.grid_threshold,
                self.grid_samples,
                self.executor,
                self.submitit,
            )
        except ConfigError as err:  # one line: exit 2 for what the preflight could not see (a cells file, jobs past
            print(f"ptlab: {err}", file=sys.stderr)  # its limit: refused while composing), 1 for a store that failed
            raise SystemExit(1 if isinstance(err, StoreError) else 2) from None

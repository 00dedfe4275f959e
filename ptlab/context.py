"""What a job knows about how it was started: the one place that reads Hydra's runtime config."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class JobContext:
    """``multirun``: part of a ``-m`` sweep; ``start_dir``: where the command was started (relative
    paths such as ``cache.dir`` are taken from there); ``choices``: the config group options picked;
    ``overrides``: the job's command-line overrides (its cell of a sweep)."""

    multirun: bool = False
    start_dir: Path = field(default_factory=Path.cwd)
    choices: dict[str, str] = field(default_factory=dict)
    overrides: tuple[str, ...] = ()
    output_dir: Path | None = None


def job_context() -> JobContext:
    """The context of the running Hydra job (a plain one outside Hydra: tests, notebooks)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized():
        return JobContext()
    hydra = HydraConfig.get()
    choices = {k: str(v) for k, v in hydra.runtime.choices.items() if not k.startswith("hydra") and "schema" not in k}
    output_dir = hydra.runtime.get("output_dir")
    return JobContext(
        multirun=hydra.mode == RunMode.MULTIRUN,
        start_dir=Path(hydra.runtime.cwd),
        choices=choices,
        overrides=tuple(str(o) for o in hydra.overrides.task),
        output_dir=Path(output_dir) if output_dir else None,
    )

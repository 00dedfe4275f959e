"""Stage checkpoints that let an interrupted image run continue where it stopped.

Each stage of a pipeline saves ``last.ckpt`` after every epoch under
``<cache.dir>/checkpoints/<config hash>/<stage>/``: the same config (re-run by hand, by a resumed sweep
or by a requeued SLURM job) finds it and passes it to ``Trainer.fit(ckpt_path=...)``, which restores
weights, optimiser, scheduler and epoch. A stage that had finished restores and returns at once. A
checkpoint that does not read back whole (killed while writing) is dropped and the stage starts over.
Once the whole pipeline has finished, its checkpoints are deleted (``discard_checkpoints``).
``resume.from_checkpoints=false`` turns this off.
"""

from __future__ import annotations

import logging
import shutil
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import pytorch_lightning as pl
from pytorch_lightning.callbacks import ModelCheckpoint

from ptlab.pipeline.cache import cache_dir
from ptlab.pipeline.resume import config_hash

if TYPE_CHECKING:
    from ptlab.spec import PipelineSpec

log = logging.getLogger(__name__)

LAST = "last.ckpt"


@dataclass
class StageCheckpointing:
    """What ``fit`` needs: the callbacks to pass the Trainer and the checkpoint to continue from."""

    callbacks: list[pl.Callback] = field(default_factory=list)
    ckpt_path: str | None = None

    @property
    def trainer_kwargs(self) -> dict[str, bool]:
        return {"enable_checkpointing": True} if self.callbacks else {}


def readable(path: Path) -> bool:
    """Whether ``path`` is a whole ``torch.save`` zip archive (every member's CRC checks out)."""
    try:
        with zipfile.ZipFile(path) as archive:
            return archive.testzip() is None
    except (OSError, zipfile.BadZipFile):
        return False


def checkpoint_root(spec: PipelineSpec) -> Path:
    """The folder of this config's stage checkpoints."""
    return cache_dir(spec.cache) / "checkpoints" / config_hash(spec)


def discard_checkpoints(spec: PipelineSpec) -> None:
    """Delete this config's stage checkpoints (its pipeline finished; a re-run is skipped or starts fresh)."""
    shutil.rmtree(checkpoint_root(spec), ignore_errors=True)


def stage_checkpointing(spec: PipelineSpec, stage: str) -> StageCheckpointing:
    """Checkpointing for ``stage`` of the pipeline ``spec``; resumes from ``last.ckpt`` when it is whole."""
    if not spec.resume.from_checkpoints:
        return StageCheckpointing()
    directory = checkpoint_root(spec) / stage
    last = directory / LAST
    resume_from = None
    if last.is_file():
        if readable(last):
            resume_from = str(last)
        else:
            log.warning("ptlab: dropping unreadable checkpoint %s; stage %s starts over", last, stage)
            last.unlink()
    callback = ModelCheckpoint(
        dirpath=directory, filename=LAST.removesuffix(".ckpt"), save_top_k=1, every_n_epochs=1, enable_version_counter=False
    )
    return StageCheckpointing([callback], resume_from)

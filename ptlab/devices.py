"""One GPU per job: parallel sweep jobs on a multi-GPU node each train on their own device.

A job claims a free GPU slot (a file lock per slot, ``devices.jobs_per_gpu`` slots per GPU) for as
long as it runs and sets ``trainer.devices=[i]``. Slots work whatever the launcher: joblib's reused
workers, ``submitit_local``'s processes, or jobs started by hand. The lock is released when the job
ends, or by the OS when its process dies. Nothing is claimed when

- ``devices.per_job`` is false, or the job is not part of a multirun;
- the trainer is not on GPU, or asks for more than one device (a DDP run uses all it names);
- the launcher already pinned the job: CUDA_VISIBLE_DEVICES names a single GPU (SLURM with
  ``gpus_per_task: 1`` does this), so ``trainer.devices=1`` is that GPU;
- fewer than two GPUs are visible.
"""

from __future__ import annotations

import contextlib
import dataclasses
import getpass
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from filelock import FileLock, Timeout
from omegaconf import OmegaConf

if TYPE_CHECKING:
    from ptlab.spec import PipelineSpec

GPU_ACCELERATORS = ("gpu", "cuda", "auto")


def gpu_count() -> int:
    """GPUs visible to this process (0 without CUDA); ``${ptlab_gpu_count:}`` in configs."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


if not OmegaConf.has_resolver("ptlab_gpu_count"):
    OmegaConf.register_new_resolver("ptlab_gpu_count", gpu_count)


def slot_lock_dir() -> Path:
    """Per-user, per-machine folder of GPU slot locks (the node's temp dir, never a shared disk)."""
    return Path(tempfile.gettempdir()) / f"ptlab-gpu-slots-{getpass.getuser()}"


def wants_own_gpu(trainer: Mapping[str, Any], per_job: bool, multirun: bool, visible_gpus: int) -> bool:
    """Whether this job (its ``trainer`` config, ``devices.per_job``) should claim a GPU of its own (see the module
    docstring)."""
    pinned = len([d for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]) == 1
    return (
        bool(per_job)
        and multirun
        and str(trainer.get("accelerator")) in GPU_ACCELERATORS
        and trainer.get("devices") in (1, "1")
        and not pinned
        and visible_gpus > 1
    )


@contextlib.contextmanager
def claim_gpu(visible_gpus: int, jobs_per_gpu: int = 1, lock_dir: Path | None = None, poll_s: float = 1.0) -> Iterator[int]:
    """Hold a free slot and yield its GPU index; waits while every slot is taken."""
    lock_dir = lock_dir or slot_lock_dir()
    lock_dir.mkdir(parents=True, exist_ok=True)
    slots = [(gpu, k) for k in range(jobs_per_gpu) for gpu in range(visible_gpus)]
    while True:
        for gpu, k in slots:
            lock = FileLock(str(lock_dir / f"gpu{gpu}.slot{k}.lock"), timeout=0)
            try:
                lock.acquire()
            except Timeout:
                continue
            try:
                yield gpu
            finally:
                lock.release()
            return
        time.sleep(poll_s)


@contextlib.contextmanager
def job_device(spec: PipelineSpec, multirun: bool) -> Iterator[PipelineSpec]:
    """Within the block, the job's spec: with ``trainer.devices=[i]`` for the GPU ``i`` this job claimed, or the
    spec itself when the job does not claim one."""
    visible = gpu_count()
    if not wants_own_gpu(spec.trainer, spec.devices.per_job, multirun, visible):
        yield spec
        return
    with claim_gpu(visible, int(spec.devices.jobs_per_gpu)) as gpu:
        trainer = {**spec.trainer, "devices": [gpu]}
        yield dataclasses.replace(spec, trainer=MappingProxyType(trainer), resolved={**spec.resolved, "trainer": trainer})

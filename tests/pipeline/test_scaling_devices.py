"""One GPU per job: which jobs claim a GPU, and concurrent claims get different GPUs (no GPU needed)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from ptlab.devices import claim_gpu, wants_own_gpu
from ptlab.distributed import global_rank, is_global_zero


def own(cfg, multirun: bool, visible_gpus: int) -> bool:
    return wants_own_gpu(cfg.trainer, cfg.devices.per_job, multirun, visible_gpus)


def test_only_single_device_gpu_jobs_of_a_multirun_claim_a_gpu(make_cfg, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    gpu = make_cfg("trainer=gpu")
    assert own(gpu, multirun=True, visible_gpus=4)
    assert not own(gpu, multirun=False, visible_gpus=4)
    assert not own(gpu, multirun=True, visible_gpus=1)
    assert not own(make_cfg("trainer=cpu"), multirun=True, visible_gpus=4)
    assert not own(make_cfg("trainer=ddp"), multirun=True, visible_gpus=4)
    assert not own(make_cfg("trainer=gpu", "devices.per_job=false"), multirun=True, visible_gpus=4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")  # pinned by SLURM (gpus_per_task: 1)
    assert not own(gpu, multirun=True, visible_gpus=4)


def test_concurrent_jobs_claim_different_gpus_and_wait_when_all_are_taken(tmp_path: Path) -> None:
    with claim_gpu(2, lock_dir=tmp_path) as first, claim_gpu(2, lock_dir=tmp_path) as second:
        assert {first, second} == {0, 1}
        claimed: list[int] = []
        waiter = threading.Thread(target=lambda: claimed.append(_claim_once(tmp_path)))
        waiter.start()
        waiter.join(timeout=0.5)
        assert waiter.is_alive() and not claimed  # both slots taken: it waits
    waiter.join(timeout=10)
    assert claimed == [0]
    with (
        claim_gpu(2, jobs_per_gpu=2, lock_dir=tmp_path) as a,
        claim_gpu(2, jobs_per_gpu=2, lock_dir=tmp_path) as b,
        claim_gpu(2, jobs_per_gpu=2, lock_dir=tmp_path) as c,
    ):
        assert sorted([a, b, c]) == [0, 0, 1]


def _claim_once(lock_dir: Path) -> int:
    with claim_gpu(2, lock_dir=lock_dir, poll_s=0.05) as gpu:
        return gpu


def test_rank_comes_from_the_launcher_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "LOCAL_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    assert global_rank() == 0 and is_global_zero()
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert global_rank() == 1 and not is_global_zero()

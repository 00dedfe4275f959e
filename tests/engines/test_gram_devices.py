"""The gram engine on any device and its chunks on any executor.

- Device-agnostic by construction, checked without a GPU: the kernel and the draws run on PyTorch's ``meta`` device
  (shapes only; any tensor created on the CPU inside would meet a meta tensor and fail), and every result comes back
  on the CPU. With a GPU, the same cells on ``cuda`` agree with the CPU to float64 rounding.
- ``engine.device`` and ``trainer=gpu`` pick the device; the preflight refuses cuda without a GPU (unless the jobs
  train on a SLURM cluster).
- Chunks run as submitit jobs (``submitit_local``) give bitwise the numbers of the fork pool, in process and through
  the CLI (summaries and MLflow metrics); SIGTERM to the sweep cancels its jobs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from ptlab.cli import compose_config, preflight
from ptlab.engines.gram import GramCell, GramEngine, draws, iter_chunks, kernel, run_cells
from ptlab.engines.gram.workers import submitit_map
from ptlab.models.two_layer_cnn import ModelForm
from ptlab.spec import parse

from ..conftest import SMALL, run_cli
from ..gram_devices import CUDA

META = torch.device("meta")


def meta_inputs(
    form: ModelForm,
    groups: int = 2,
    cells: int = 3,
    filters: int = 4,
    n: int = 5,
    n_test: int = 7,
) -> kernel.StageInputs:
    """A stage's inputs, every tensor on the meta device."""
    p = 3 + n

    def meta(*shape: int) -> torch.Tensor:
        return torch.empty(*shape, device=META, dtype=torch.float64)

    return kernel.StageInputs(
        start=meta(groups, cells, filters, p),
        test_start=meta(groups, cells, filters, n_test),
        norm2_start=meta(groups, cells, filters),
        gram=meta(groups, p, p),
        cross=meta(groups, p, n_test),
        y=meta(groups, n),
        clean=meta(groups, n),
        test_y=meta(groups, n_test),
        test_clean=meta(groups, n_test),
        signal_coefficients=meta(groups, cells, 3),
        signal_norms=meta(groups, cells, 3),
        lr=meta(groups, cells),
        steps=4,
        eval_every=2,
        record_coefficients=True,
        form=form,
        bias_start=meta(groups, cells, filters) if form.bias else None,
    )


@pytest.mark.parametrize("form", [ModelForm(), ModelForm(bias=True, activation="leaky_relu")], ids=["relu", "leaky_bias"])
def test_kernel_creates_every_tensor_on_the_inputs_device(form: ModelForm) -> None:
    """The step program on meta inputs: every output is on meta, with the shapes it has on the CPU."""
    out = kernel.train_stage_batch(meta_inputs(form))
    for name in ("loss", "train_acc", "test_acc", "decomposition", "coefficients", "norm2", "trajectory"):
        assert getattr(out, name).device == META, name
    assert out.loss.shape == (2, 3, 5) and out.coefficients.shape == (2, 3, 4, 8) and out.trajectory.shape == (2, 3, 3, 4, 8)
    assert (out.bias is not None) == form.bias and (out.bias is None or out.bias.device == META)


@pytest.mark.parametrize("extra", [[], ["task.test_space=response", "task.sampling=gram"]], ids=["dspace", "gram_sampling"])
def test_draws_land_on_the_cells_device(make_cfg, extra: list[str]) -> None:
    """A data group's tensors end on the requested device (the draws themselves on the CPU), and on the CPU they are
    the default's, bit for bit."""
    cell = GramCell.from_spec(parse(make_cfg("train.dtype=float64", *extra)))
    on_meta = draws.prepare_group(cell, [0], META).tensors
    on_cpu = draws.prepare_group(cell, [0], torch.device("cpu")).tensors
    default = draws.prepare_group(cell, [0]).tensors
    assert sorted(on_meta) == sorted(default) and all(t.device == META for t in on_meta.values())
    for key, tensor in default.items():
        assert torch.equal(on_cpu[key], tensor) and on_meta[key].shape == tensor.shape, key


def test_engine_device_and_trainer_pick_the_device() -> None:
    """``engine.device`` as given; null follows the trainer (trainer=gpu: cuda); the single-run engine resolves it."""

    def device(*overrides: str) -> str:
        return GramCell.from_spec(parse(compose_config(["engine=gram", *overrides]))).device

    assert device() == "cpu"
    assert device("trainer=gpu") == "cuda"
    assert device("trainer=gpu", "engine.device=cpu") == "cpu"
    assert device("engine.device=auto") == "auto"
    assert GramEngine(trainer={"accelerator": "cpu"}).device == torch.device("cpu")
    assert GramEngine(device="auto").device.type == ("cuda" if CUDA else "cpu")
    with pytest.raises(ValueError, match="engine.device='tpu' is not allowed"):
        GramEngine(device="tpu")


@pytest.mark.skipif(CUDA, reason="a GPU is here")
def test_cuda_without_a_gpu_passes_the_preflight_only_for_slurm(tmp_path: Path) -> None:
    """Here (no GPU) ``engine.device=cuda`` is refused for the pool and the local executor, and let through when the
    chunks train on a SLURM cluster's machines (checked there)."""
    base = [
        "-m",
        "engine=gram",
        "hydra/launcher=ptlab_gram",
        "engine.device=cuda",
        *SMALL,
        "seed=0,1",
        f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    for executor in ("pool", "submitit_local"):
        error = preflight([*base, f"hydra.launcher.executor={executor}"])
        assert error is not None and error.startswith("engine.device='cuda' is not allowed: no CUDA GPU"), error
    assert preflight([*base, "hydra.launcher.executor=submitit_slurm"]) is None
    assert not (tmp_path / "sweep").exists() and not (tmp_path / "mlflow.db").exists()


def cells_of(make_cfg, device: str = "cpu") -> list[GramCell]:
    """Four float64 cells of one shape in two data groups."""
    return [
        GramCell.from_spec(parse(make_cfg("train.dtype=float64", f"engine.device={device}", f"task.u_norm={u}", f"seed={s}")))
        for u, s in ((0.0, 0), (2.0, 0), (1.0, 1), (3.0, 1))
    ]


def assert_same_results(a: dict, b: dict, exact: bool = True) -> None:
    """Two ``{index: GramResult}``: equal bit for bit (``exact``) or to float64 rounding."""
    assert sorted(a) == sorted(b)
    for index in a:
        assert a[index].plan == b[index].plan
        for name, stage in a[index].stages.items():
            other = b[index].stages[name]
            for key in ("loss", "train_acc", "test_acc", "decomposition"):
                x, y = getattr(stage, key), getattr(other, key)
                assert np.array_equal(x, y) if exact else np.allclose(x, y, rtol=1e-9, atol=1e-12), (index, name, key)
            for x, y in ((stage.signal, other.signal), *((stage.noise[k], other.noise[k]) for k in stage.noise)):
                assert x.device.type == "cpu" and y.device.type == "cpu"
                if exact:
                    assert torch.equal(x, y), (index, name)
                else:
                    torch.testing.assert_close(x, y, rtol=1e-9, atol=1e-12)


def test_submitit_local_jobs_give_the_pools_numbers(make_cfg, tmp_path: Path) -> None:
    """Two chunks as two submitit jobs on this machine and in the two-worker fork pool: the same results, bitwise
    (one torch thread each way, the same arithmetic)."""
    cells = cells_of(make_cfg)
    pool = {k: r for chunk in iter_chunks(cells, max_cells=2, workers=2) for k, r in chunk}
    jobs = submitit_map("submitit_local", tmp_path / "jobs" / "%j", {"timeout_min": 5, "cpus_per_task": 1})
    chunks = list(iter_chunks(cells, max_cells=2, chunk_map=jobs))
    assert len(chunks) == 2 and len(list((tmp_path / "jobs").glob("*/*_result.pkl"))) == 2
    assert_same_results(pool, {k: r for chunk in chunks for k, r in chunk})


@pytest.mark.skipif(not CUDA, reason="no CUDA GPU visible")
def test_cuda_gives_the_cpus_numbers(make_cfg) -> None:
    """The same cells on cuda and on the CPU: the data drawn identically (labels bitwise, Gram blocks to rounding),
    plans equal, every number to float64 rounding, results on the CPU."""
    cpu_cells, cuda_cells = cells_of(make_cfg, "cpu"), cells_of(make_cfg, "cuda")
    on_cpu = draws.prepare_group(cpu_cells[0], [0], torch.device("cpu")).tensors
    on_cuda = draws.prepare_group(cuda_cells[0], [0], torch.device("cuda")).tensors
    for key in ("y1", "c1", "y2", "c2", "ty2", "tc2"):
        assert torch.equal(on_cuda[key].cpu(), on_cpu[key]), key
    torch.testing.assert_close(on_cuda["gram1"].cpu(), on_cpu["gram1"], rtol=1e-12, atol=1e-12)
    assert_same_results(dict(enumerate(run_cells(cpu_cells))), dict(enumerate(run_cells(cuda_cells))), exact=False)


def sweep_args(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [
        "-m",
        "engine=gram",
        "hydra/launcher=ptlab_gram",
        "hydra/sweeper=ptlab_batched",
        *SMALL,
        "train.dtype=float64",
        "task.u_norm=0.0,2.0",
        "seed=0,1",
        "hydra.launcher.max_cells=2",
        "hydra.launcher.workers=2",
        "hydra.launcher.history=eval",
        f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"logger.experiment_name={name}",
        f"hydra.sweep.dir={tmp_path / name}",
        *extra,
    ]


@pytest.mark.slow
def test_submitit_local_sweep_tracks_the_pools_numbers(tmp_path: Path) -> None:
    """The CLI sweep with ``executor=submitit_local`` (one job a chunk, tracking in the parent) writes the summaries
    and MLflow metrics of the pool's sweep, bitwise in float64; the jobs' files land under the sweep dir."""
    for name, executor in (("pool", "pool"), ("jobs", "submitit_local")):
        done = run_cli(sweep_args(tmp_path, name, f"hydra.launcher.executor={executor}"), cwd=tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((tmp_path / "jobs" / ".submitit").glob("*/*_result.pkl"))) == 2
    for job in range(4):
        pool, jobs = (json.loads((tmp_path / name / str(job) / "summary.json").read_text()) for name in ("pool", "jobs"))
        assert {k: v for k, v in pool.items() if k != "mlflow"} == {k: v for k, v in jobs.items() if k != "mlflow"}
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def metrics(name: str) -> dict[tuple[str, str], dict[str, list[tuple[int, float]]]]:
        experiment = client.get_experiment_by_name(name).experiment_id
        out = {}
        for run in client.search_runs([experiment]):
            if run.data.tags["ptlab.stage"] == "sweep":  # the sweep's own run, named after its experiment
                continue
            key = (run.data.tags.get("ptlab.cell", run.info.run_name), run.data.tags["ptlab.stage"])
            out[key] = {m: [(p.step, p.value) for p in client.get_metric_history(run.info.run_id, m)] for m in run.data.metrics}
        return out

    pool_metrics = metrics("pool")
    assert len(pool_metrics) == 16 and pool_metrics == metrics("jobs")  # 4 cells: a parent and 3 stages each


def job_processes(folder: Path) -> list[int]:
    """Pids of the submitit job processes whose command line names ``folder``."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                command = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if "submitit" in command and str(folder) in command:
                pids.append(int(proc.name))
    return pids


@pytest.mark.slow
def test_sigterm_to_the_sweep_cancels_its_jobs(tmp_path: Path) -> None:
    """SIGTERM to a sweep whose chunks are submitit jobs: the sweep ends with 143 and its running jobs are cancelled
    (their processes end) instead of training for nobody."""
    args = sweep_args(
        tmp_path,
        "stopped",
        "hydra.launcher.executor=submitit_local",
        "train.upstream_steps=200000",
        "hydra.launcher.progress=false",
    )
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    sweep = subprocess.Popen(
        [sys.executable, "-m", "ptlab", *args], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    folder = tmp_path / "stopped" / ".submitit"
    deadline = time.monotonic() + 240
    while len(job_processes(folder)) < 2 and time.monotonic() < deadline and sweep.poll() is None:
        time.sleep(0.5)
    assert len(job_processes(folder)) >= 2, sweep.stderr.read()[-3000:] if sweep.poll() is not None else "no jobs"
    time.sleep(2)
    sweep.send_signal(signal.SIGTERM)
    _, stderr = sweep.communicate(timeout=120)
    assert sweep.returncode == 143, stderr[-3000:]
    deadline = time.monotonic() + 60
    while job_processes(folder) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert job_processes(folder) == []
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("stopped")
    runs = client.search_runs([experiment.experiment_id]) if experiment is not None else []
    assert all(run.info.status != "RUNNING" for run in runs), [(run.info.run_name, run.info.status) for run in runs]

"""Every kind of bad input the CLI knows: exit 2, one line on stderr naming the key, no traceback, no run
created, nothing written to the working directory; and a run that diverges ends FAILED."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tests.conftest import SMALL, run_cli

IMAGE = ["task=digits", "model=resnet18_small", "upstream_model=resnet18_small"]

BAD = [
    (["transfer.alpha=1.5"], "transfer.alpha"),
    (["train.lr=inf"], "train.lr=inf is not allowed: must be a finite number"),
    (["task.u_norm=inf"], "task.u_norm=inf is not allowed: must be a finite number"),
    (["noise.sigma_p2=nan"], "noise.sigma_p2=nan is not allowed"),
    (["noise.sigma_p1=-inf"], "noise.sigma_p1=-inf is not allowed"),
    (["task.d=1000000000000"], "task.d=1000000000000 is not allowed: the synthetic data and models need about"),
    (["model.width=1000000000000"], "model.width=1000000000000 is not allowed: the synthetic data"),
    (
        ["task=cifar10", "+pair=resnet34_small_resnet18_small", "task.data_dir=missing_data"],
        "task.data_dir='missing_data' is not allowed: no cifar-10-batches-py/",
    ),
    (
        ["task=fashion_mnist", "+pair=vgg16_small_vgg11_small", "task.data_dir=missing_fashion"],
        "task.data_dir='missing_fashion' is not allowed: no Fashion-MNIST IDX files",
    ),
    (
        ["task=fashion_mnist", "+pair=vgg16_small_vgg11_small", "task.data_dir=BAD_IDX"],
        "task.data_dir='BAD_IDX' is not allowed: train-images-idx3-ubyte is not an IDX file",
    ),
    ([*IMAGE, "model.weights_path=nope.pth"], "model.weights_path='nope.pth' is not allowed: no such file"),
    ([*IMAGE, "upstream_model.weights_path=GARBAGE"], "upstream_model.weights_path='GARBAGE' is not allowed: not a "),
    (["cache.dir=A_FILE"], "cache.dir='A_FILE' is not allowed"),
    (["logger.tracking_uri=foo://x"], "logger.tracking_uri='foo://x' is not allowed: must start with one of"),
    (["logger.tracking_uri="], "logger.tracking_uri='' is not allowed"),
    (["logger.tracking_uri=sqlite:///A_FILE/m.db"], "logger.tracking_uri='sqlite:///A_FILE/m.db' is not allowed"),
    (["logger.tracking_uri=sqlite:////proc/ptlab/m.db"], "logger.tracking_uri='sqlite:////proc/ptlab/m.db' is not"),
    (["hydra.run.dir=/proc/ptlab/out"], "hydra.run.dir='/proc/ptlab/out' is not allowed"),
    (["hydra.run.dir=A_FILE/out"], "hydra.run.dir='A_FILE/out' is not allowed"),
    (["-m", "transfer.alpha=0.5,2"], "transfer.alpha=2.0 is not allowed"),
    (["-m", "hydra.sweep.dir=/proc/ptlab/sweep", "seed=0,1"], "hydra.sweep.dir='/proc/ptlab/sweep' is not allowed"),
    (["hydra/launcher=nosuch"], "hydra/launcher=nosuch is not an option: choose one of"),
    (["transfer.alpah=0.3"], "did you mean transfer.alpha?"),
    (["-m", "transfer.alpha=[1,"], "could not read the overrides"),
    (["engine=nosuch"], "engine=nosuch is not an option: choose one of gram, lightning"),
    (["engine=gram", *IMAGE], "task=digits is not allowed with engine=gram"),
    (["seed=-1"], "seed=-1 is not allowed"),
    (
        [*IMAGE, "task=image_folder", "task.root=missing_images", "task.task2_classes=[cat]"],
        "task.root='missing_images' is not allowed: no such folder",
    ),
    ([*IMAGE, "task=image_folder", "task.root=EMPTY", "task.task2_classes=[cat]"], "task.root='EMPTY' is not allowed: "),
    (
        [*IMAGE, "model=torchvision", "model.arch=mobilenet_v3_smal"],
        "model.arch='mobilenet_v3_smal' is not allowed: not a model of the library (close names: mobilenet_v3_small",
    ),
    (["model.activation=tanh"], "model.activation='tanh' is not allowed: must be one of relu, relu_q, leaky_relu"),
    (["upstream_model=toy_cnn", "upstream_model.bias=true"], "upstream_model.bias=True is not allowed with engine=gram"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_stops_before_anything_is_tracked(tmp_path: Path, overrides: list[str], message: str) -> None:
    (tmp_path / "A_FILE").write_text("not a folder")
    (tmp_path / "GARBAGE").write_bytes(b"\x00not a torch file")
    (tmp_path / "EMPTY" / "cat").mkdir(parents=True)  # a class folder without images
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):  # Fashion-MNIST's four files, not in the IDX format
        (tmp_path / "BAD_IDX").mkdir(exist_ok=True)
        (tmp_path / "BAD_IDX" / name).write_bytes(b"\x08\x03 not IDX")
    before = sorted(p.name for p in tmp_path.iterdir())
    flags = [o for o in overrides if o == "-m"]
    store = f"logger.tracking_uri=sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    done = run_cli([*flags, store, *[o for o in overrides if o != "-m"]], cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ptlab: "), done.stderr
    assert message in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no store, no outputs, no cache


def test_a_state_dict_file_is_accepted_as_weights(tmp_path: Path) -> None:
    from ptlab.checks import check_weights

    torch.save({"fc.bias": torch.zeros(2), "other": torch.zeros(3)}, tmp_path / "w.pth")  # one tensor fits
    check_weights(
        "model",
        {
            "_target_": "ptlab.models.build_torchvision_cnn",
            "arch": "resnet18",
            "width": 0.25,
            "weights_path": str(tmp_path / "w.pth"),
        },
    )


def test_a_run_whose_loss_is_not_finite_fails_with_one_line(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = run_cli(
        [*SMALL, f"logger.tracking_uri={uri}", "noise.sigma_p1=1e30", "hydra.run.dir=out", "cache.dir=cache"], cwd=tmp_path
    )
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == (
        "ptlab: stage upstream diverged at step 1: the loss is nan; lower train.lr (now 0.01)"
    )
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("default").experiment_id])
    assert {r.info.status for r in runs} == {"FAILED"} and len(runs) == 2
    assert not (tmp_path / "out" / "summary.json").exists()


def test_summary_json_is_valid_json_when_a_theory_value_is_infinite(make_cfg, tmp_path: Path) -> None:
    from ptlab.pipeline import run_pipeline

    run_pipeline(make_cfg("task.u_norm=0.0", "logger=none"), tmp_path)
    text = (tmp_path / "summary.json").read_text()
    summary = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in summary.json"))
    assert summary["theory"]["signal_ratio"] is None


def wait_for_runs(store: Path, name: str, process, count: int = 2, timeout: float = 120):
    """A client of ``store`` and the experiment ``name`` once it holds ``count`` runs (the parent and its first
    child), while ``process`` runs; the experiment is ``None`` when that does not happen within ``timeout`` seconds.
    The client opens the store only once ``process`` made it (MLflow creates and migrates a store when a client
    opens it, which would race the process's own creation)."""
    import time

    deadline = time.time() + timeout
    client = experiment = None
    while time.time() < deadline and process.poll() is None:
        time.sleep(1)
        if client is None and store.exists():
            client = MlflowClient(f"sqlite:///{store}")
        experiment = client.get_experiment_by_name(name) if client is not None else None
        if experiment and len(client.search_runs([experiment.experiment_id])) >= count:
            return client, experiment
    return client, experiment


def test_runs_of_a_killed_process_are_marked_failed_by_the_next_command(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # resume.skip_finished=always keeps the tracker in this process (a single run's helper process marks the runs of a
    # killed run FAILED itself: tests/tracking/test_background_tracking.py), so its runs stay RUNNING for the next command
    slow = [
        "engine=lightning",
        "task.d=300",
        "train.upstream_steps=100000",
        "hydra.run.dir=killed",
        "cache.dir=cache",
        f"logger.tracking_uri={uri}",
        "logger.experiment_name=kill",
        "resume.skip_finished=always",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "ptlab", *slow], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    client, experiment = wait_for_runs(tmp_path / "mlflow.db", "kill", process)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.info.status for r in runs) == ["RUNNING", "RUNNING"]
    done = run_cli(
        [*SMALL, f"logger.tracking_uri={uri}", "logger.experiment_name=kill", "hydra.run.dir=next", "cache.dir=cache"],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    runs = client.search_runs([experiment.experiment_id])
    assert sum(r.info.status == "RUNNING" for r in runs) == 0
    vanished = [r for r in runs if r.data.tags.get("ptlab.error") == "process vanished"]
    assert len(vanished) == 2 and {r.info.status for r in vanished} == {"FAILED"}


def test_a_live_process_is_not_vanished() -> None:
    from ptlab.tracking.stale import is_vanished, process_tag

    assert not is_vanished(process_tag())
    host, pid, ticks, boot, namespace = process_tag().split(":")
    assert is_vanished(f"{host}:{pid}:{int(ticks) + 1}:{boot}:{namespace}")  # the pid reused by another process
    assert not is_vanished(f"another-host:{pid}:{ticks}:{boot}:{namespace}")
    assert not is_vanished(f"{host}:{pid}:{int(ticks) + 1}:{boot}:1")  # another PID namespace: not judged
    assert is_vanished(f"{host}:{pid}:{ticks}:another-boot:1")  # a process of an earlier boot
    assert is_vanished(f"{host}:{pid}:{int(ticks) + 1}:{boot}")  # a tag of an older ptlab (no namespace)


@pytest.mark.parametrize(("signum", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_marks_the_runs_killed_and_exits_with_its_code(tmp_path: Path, signum: str, code: int) -> None:
    import signal
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    slow = [
        "engine=lightning",
        "task.d=300",
        "train.upstream_steps=100000",
        "hydra.run.dir=out",
        "cache.dir=cache",
        f"logger.tracking_uri={uri}",
        "logger.experiment_name=signal",
    ]
    process = subprocess.Popen(
        [sys.executable, "-m", "ptlab", *slow], cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    client, experiment = wait_for_runs(tmp_path / "mlflow.db", "signal", process)
    process.send_signal(getattr(signal, signum))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == code, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == f"ptlab: stopped by signal {signum}; its MLflow runs are marked KILLED"
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"KILLED"}

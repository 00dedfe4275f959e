"""Resume in-process: finished configs are skipped, failed ones re-run, and the summary comes back."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from ptlab.pipeline import run_pipeline
from ptlab.spec import parse
from tests.scaling_helpers import MARKER_ENV

FAULTY = "trainer._target_=tests.scaling_helpers.FaultTrainer"
LIGHTNING = "engine=lightning"


def parents(tracking_uri: str) -> list:
    client = MlflowClient(tracking_uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, "tags.`ptlab.stage` = 'pipeline'")


def test_rerun_skips_finished_and_reruns_failed(
    make_cfg, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "fault"
    monkeypatch.setenv(MARKER_ENV, str(marker))
    cells = [
        (f"cache.dir={tmp_path / 'cache'}", "resume.skip_finished=always", FAULTY, LIGHTNING, f"transfer.alpha={a}")
        for a in (0.25, 0.5)
    ]
    done = run_pipeline(make_cfg(*cells[0]), tmp_path / "a1")
    marker.write_text("raise")
    with pytest.raises(RuntimeError, match="injected fault"):
        run_pipeline(make_cfg(*cells[1]), tmp_path / "b1")
    assert sorted(r.info.status for r in parents(tracking_uri)) == ["FAILED", "FINISHED"]

    skipped = run_pipeline(make_cfg(*cells[0]), tmp_path / "a2")
    assert skipped["resumed_from"] == done["mlflow"]["parent_run_id"]
    assert skipped["transfer"] == done["transfer"]
    assert json.loads((tmp_path / "a2" / "summary.json").read_text())["resumed_from"] == skipped["resumed_from"]
    rerun = run_pipeline(make_cfg(*cells[1]), tmp_path / "b2")
    assert "resumed_from" not in rerun
    assert sorted(r.info.status for r in parents(tracking_uri)) == ["FAILED", "FINISHED", "FINISHED"]

    again = run_pipeline(make_cfg(*cells[1], "resume.skip_finished=never"), tmp_path / "b3")
    assert "resumed_from" not in again and len(parents(tracking_uri)) == 4
    assert again["transfer"] == rerun["transfer"]


TINY_IMAGES = [
    "task=digits",
    "noise=pixels",
    "+pair=vgg16_small_vgg11_small",
    "task.n2=8",
    "task.k=2",
    "task.n1_ratio=2",
    "task.n_test=10",
    "train.upstream_epochs=2",
    "train.downstream_epochs=3",
    "train.batch_size=8",
    "train.progress_bar=false",
]


@pytest.mark.slow
def test_interrupted_image_run_continues_from_its_last_checkpoint(
    make_cfg, tracking_uri: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    marker = tmp_path / "fault"
    marker.write_text("raise@2")
    monkeypatch.setenv(MARKER_ENV, str(marker))
    cfg = [*TINY_IMAGES, FAULTY, f"cache.dir={tmp_path / 'cache'}"]
    with pytest.raises(RuntimeError, match="injected fault"):
        run_pipeline(make_cfg(*cfg, small=False), tmp_path / "a")
    (checkpoints,) = (tmp_path / "cache" / "checkpoints").iterdir()
    assert {p.name for p in checkpoints.iterdir()} == {"upstream", "transfer"}
    assert torch.load(checkpoints / "transfer" / "last.ckpt", weights_only=False)["epoch"] == 1

    summary = run_pipeline(make_cfg(*cfg, small=False), tmp_path / "b")
    client = MlflowClient(tracking_uri)
    children = {
        r.data.tags["ptlab.stage"]: r.info.run_id
        for r in client.search_runs(
            [client.get_run(summary["mlflow"]["parent_run_id"]).info.experiment_id],
            f"tags.`mlflow.parentRunId` = '{summary['mlflow']['parent_run_id']}'",
        )
    }
    epochs_trained = {stage: len(client.get_metric_history(run_id, "test/acc")) for stage, run_id in children.items()}
    assert epochs_trained == {"upstream": 0, "transfer": 1, "scratch": 3}  # finished, resumed at epoch 2, fresh
    assert summary["transfer"]["epochs"] == 3 and len(summary["transfer"]["plan"]) == 8
    assert not checkpoints.exists()  # the pipeline finished: its checkpoints are gone


def test_two_identical_sweeps_started_together_run_each_config_once(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.conftest import SMALL

    args = [
        sys.executable,
        "-m",
        "ptlab",
        "-m",
        *SMALL,
        "transfer.alpha=0.25,0.5,0.75",
        f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
        "cache.dir=cache",
    ]
    from ptlab.tracking.faults import prepare_sqlite_store

    prepare_sqlite_store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    sweeps = [
        subprocess.Popen(
            [*args, f"hydra.sweep.dir=sweep{k}"], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for k in range(2)
    ]
    outputs = [p.communicate(timeout=600) for p in sweeps]
    assert [p.returncode for p in sweeps] == [0, 0], [err[-2000:] for _, err in outputs]
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("default").experiment_id
    parents = client.search_runs([experiment], "tags.`ptlab.stage` = 'pipeline'")
    assert len(parents) == 3 and {r.info.status for r in parents} == {"FINISHED"}
    assert len({r.data.tags["ptlab.config_hash"] for r in parents}) == 3
    assert sum(out.count("ptlab: skipped") for out, _ in outputs) == 3


def test_one_pipeline_per_config_per_store_whatever_the_cache_dir(tmp_path: Path) -> None:
    """The one-config lock lives beside the SQLite store: a sweep with another ``cache.dir`` meets the lock a live
    process holds for the same config and store (here it gives up after ``cache.lock_timeout``), while another store
    takes other locks."""
    from filelock import FileLock

    from ptlab.pipeline.resume import config_hash
    from ptlab.pipeline.run import lock_dir
    from tests.conftest import SMALL, compose_config, run_cli

    store = tmp_path / "shared.db"
    overrides = [*SMALL, f"logger.tracking_uri=sqlite:///{store}"]
    digest = config_hash(parse(compose_config(overrides)))
    assert lock_dir(f"sqlite:///{store}", tmp_path / "a") == lock_dir(f"sqlite:///{store}", tmp_path / "b")
    assert lock_dir(f"sqlite:///{tmp_path / 'other.db'}", tmp_path / "a") != lock_dir(f"sqlite:///{store}", tmp_path / "a")
    folder = lock_dir(f"sqlite:///{store}", tmp_path / "a")
    folder.mkdir(parents=True)
    with FileLock(str(folder / f"{digest}.lock")):
        done = run_cli(
            ["-m", *overrides, f"cache.dir={tmp_path / 'b'}", "cache.lock_timeout=1", f"hydra.sweep.dir={tmp_path / 'sweep'}"],
            cwd=tmp_path,
        )
    assert done.returncode == 1
    assert "cache.lock_timeout=1.0: another process ran this config longer" in done.stderr


@pytest.mark.parametrize(
    ("overrides", "digest"),
    [
        ([], "0f28e9a10ce5e4780a7b7e4dcc03315eb9f9a70421647841224f2ca9bdedaaed"),
        (["task.u_norm=0", "transfer.alpha=0.25"], "f8a8ab89b92729c38b369c0d09022556f47db3b611734d9c2e413b83509c7305"),
        (["engine=lightning"], "2485e595f5322e503aa5fa2f09dc99b516cbe2eeb3de72e0e8589792c20082df"),
        (["task=digits"], "be30d3c5a49d6d877c307bed1f04fc36266f1d8e206f17ba6b9a14afdaee93b5"),
    ],
)
def test_config_hashes_of_earlier_versions_still_match(overrides: list[str], digest: str) -> None:
    """The hashes these configs had before the regularizer group, transfer.control, train.scratch_budget and
    engine.device existed (commit 9652dd7): a key added later at its neutral value leaves the hash alone, so resume
    still finds the finished runs of an existing store (``ptlab.pipeline.resume.NEUTRAL_DEFAULTS``)."""
    from omegaconf import OmegaConf

    from ptlab.cli import compose_config
    from ptlab.pipeline.resume import hash_resolved

    assert hash_resolved(OmegaConf.to_container(compose_config(overrides), resolve=True)) == digest
    changed = compose_config([*overrides, "train.scratch_budget=matched"])
    assert hash_resolved(OmegaConf.to_container(changed, resolve=True)) != digest

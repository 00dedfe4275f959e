"""The preflight checks what a config builds (ptlab.build_checks, ptlab.store_checks, the CLI's override checks):
every kind below exits 2 with one line naming the key, before anything is tracked or written (no store file,
no output folder, no cache), also under --config-dir and for every job of a sweep."""

from __future__ import annotations

import socket
import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_cli

D = [
    "task=digits",
    "model=resnet18_small",
    "upstream_model=resnet18_small",
    "train.upstream_epochs=1",
    "train.downstream_epochs=1",
    "train.progress_bar=false",
]
"""A 1-epoch digits config (the issue's D)."""
S = [
    "task.d=200",
    "task.n1=40",
    "task.n2=10",
    "task.n_test=100",
    "train.upstream_steps=20",
    "train.downstream_steps=10",
    "model.width=8",
]
"""A small synthetic config (the issue's S)."""
GRID = ["hydra/launcher=ptlab_gram", "hydra/sweeper=ptlab_batched", "hydra.launcher.tracking=grid"]
FOLDER = [
    "task=image_folder",
    "task.root=FOLDER",
    "model=resnet18_small",
    "upstream_model=resnet18_small",
    "task.task2_classes=[ant,bee]",
    "task.k=1",
    "task.n2=4",
    "task.n1_ratio=1",
]


def closed_port() -> int:
    """A local TCP port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_png_folder(root: Path, classes: tuple[str, ...], per_class: int = 6) -> None:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / name / f"{i}.png")


def make_fixtures(tmp: Path) -> None:
    """The files the bad inputs point at, all under ``tmp``."""
    write_png_folder(tmp / "FOLDER", ("ant", "bee", "cat"))
    write_png_folder(tmp / "HOLE", ("ant", "bee", "cat"))
    (tmp / "HOLE" / "dog").mkdir()  # a class folder holding no image
    (tmp / "HOLE" / "dog" / "notes.txt").write_text("no image here")
    write_png_folder(tmp / "BROKEN", ("ant", "bee", "cat"))
    (tmp / "BROKEN" / "bee" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    write_png_folder(tmp / "DAMAGED", ("ant", "bee", "cat"))
    whole = (tmp / "DAMAGED" / "cat" / "0.png").read_bytes()  # a valid header, then damaged pixel data
    (tmp / "DAMAGED" / "cat" / "0.png").write_bytes(whole[:60] + bytes([whole[60] ^ 0xFF]) + whole[61:])
    (tmp / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    torch.save({"encoder.layer.weight": torch.zeros(3, 3)}, tmp / "foreign.pth")
    from safetensors.torch import save_file

    save_file({"encoder.layer.weight": torch.zeros(3, 3)}, str(tmp / "foreign.safetensors"))
    with sqlite3.connect(tmp / "other.db") as connection:
        connection.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    (tmp / "random.db").write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    (tmp / "cells_digits.yaml").write_text("- [seed=0]\n- [task=digits]\n")
    (tmp / "cells_bad.yaml").write_text("cells:\n- [seed=0]\n- ['seed=range(1,3)', transfer.alpha=1.5]\n")
    (tmp / "my_conf" / "experiment").mkdir(parents=True)
    (tmp / "my_conf" / "experiment" / "mine.yaml").write_text("# @package _global_\ntransfer:\n  alpha: 1.5\n")


def write_zeroed_store(path: Path) -> None:
    """An MLflow store with runs, whose pages after the first two are zeroed (as a crashed disk leaves them)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{path}")
    experiment = client.create_experiment("zeroed", artifact_location=path.with_suffix("").as_uri())
    for _ in range(20):
        run = client.create_run(experiment)
        client.log_param(run.info.run_id, "p", "x" * 2000)
        client.set_terminated(run.info.run_id)
    data = bytearray(path.read_bytes())
    page = int.from_bytes(data[16:18], "big")
    data[2 * page :] = bytes(len(data) - 2 * page)
    path.write_bytes(bytes(data))


GPU_HERE = torch.cuda.is_available()

BAD = [
    # image data
    ([*D, "task.n2=1"], "task.n2=1 is not allowed: must be >= 2"),
    ([*D, "task.n2=10000"], "task.n2=10000 is not allowed: it needs 5000 training images of class 3, which holds"),
    ([*D, "task.task2_classes=[3,3]"], ("task.task2_classes=[3, 3] is not allowed: must be distinct class ids in [0, 10)")),
    ([*D, "task.task2_classes=[12,3]"], "task.task2_classes=[12, 3] is not allowed: must be distinct"),
    (
        [*D, "task.task1_classes=[3,4,6,7,8,9,0,1]"],
        ("task.task1_classes=[3, 4, 6, 7, 8, 9, 0, 1] is not allowed: 3, 8 also in task.task2_classes"),
    ),
    ([*D, "task.k=9"], "task.k=9 is not allowed: must be in [1, 8]"),
    ([*D, "task.n_test=100000"], "task.n_test=100000 is not allowed: it needs"),
    (["-m", *D, "task.k=7,9"], "task.k=9 is not allowed: must be in [1, 8]"),
    (["-m", *D, "task.k=9,2", "task.task2_classes=[3],[3,5]"], "task.k=9 is not allowed: must be in [1, 8]"),  # a pair
    ([*FOLDER, "task.root=HOLE"], "task.root='HOLE' is not allowed: class folder(s) dog hold no image"),
    ([*FOLDER, "task.root=BROKEN"], "is not a readable image (UnidentifiedImageError"),
    ([*FOLDER, "task.root=DAMAGED"], "cat/0.png is not a readable image (SyntaxError"),
    ([*FOLDER, "task.task2_classes=[ant,eel]"], "task.task2_classes=['ant', 'eel'] is not allowed: eel not among"),
    ([*FOLDER, "task.n2=100"], "task.n2=100 is not allowed: it needs 50 training images of class ant"),
    (
        ["task=cifar10", "+pair=resnet34_small_resnet18_small", "task.data_dir=nothing_here", "task.download=true"],
        "task.download=True is not allowed: https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    ),
    # transfer and models
    (
        [*D, "transfer=layers"],
        ("transfer=layers is not allowed with upstream_model=resnet18: whole-block transfer needs vision transformers"),
    ),
    (
        [
            *D,
            "model=deit_tiny",
            "upstream_model=deit_tiny",
            "model.img_size=32",
            "model.patch_size=8",
            "upstream_model.img_size=32",
            "upstream_model.patch_size=8",
        ],
        "transfer=filters is not allowed with upstream_model=deit_tiny: filter transfer needs CNNs",
    ),
    # trainer
    ([*D, "trainer.accelerator=bogus"], "trainer.accelerator='bogus' is not allowed: must be one of auto, cpu, gpu"),
    ([*D, "train.precision=16-mixed"], ("train.precision='16-mixed' is not allowed on a CPU (Lightning would run bf16-mixed)")),
    pytest.param(
        [*D, "trainer=gpu"],
        "trainer.accelerator='gpu' is not allowed: no CUDA GPU is visible here",
        marks=pytest.mark.skipif(GPU_HERE, reason="a GPU is here"),
    ),
    # weights files
    (
        [*D, "model.weights_path=garbage.safetensors"],
        ("model.weights_path='garbage.safetensors' is not allowed: not a safetensors state dict"),
    ),
    (
        [*D, "model.weights_path=foreign.pth"],
        (
            "model.weights_path='foreign.pth' is not allowed: none of its 1 tensors "
            "(encoder.layer.weight, ...) matches a tensor of model"
        ),
    ),
    (
        [*D, "upstream_model.weights_path=foreign.safetensors"],
        ("upstream_model.weights_path='foreign.safetensors' is not allowed: none of its 1 tensors"),
    ),
    # numbers the engine cannot hold
    ([*S, "model.init_std=1e39"], "model.init_std=1e+39 is not allowed: the engine computes in float32"),
    (["task.d=4", "task.n1=90000"], "task.n1=90000 is not allowed: the gram engine's N x N matrices need about"),
    # the store
    (
        ["logger.tracking_uri=sqlite:///:memory:"],
        ("logger.tracking_uri='sqlite:///:memory:' is not allowed: an in-memory SQLite store"),
    ),
    (
        ["logger.tracking_uri=sqlite:///other.db"],
        ("is a SQLite database of something else (tables invoices), not an MLflow store"),
    ),
    (["logger.tracking_uri=sqlite:///random.db"], "is not a readable SQLite database (file is not a database)"),
    (["logger.tracking_uri=sqlite:///zeroed.db"], "is a damaged SQLite database"),
    (["logger.tracking_uri=postgresql://ptlab@127.0.0.1/ptlab"], ("is not allowed: its database driver (the Python module")),
    (["logger.tracking_uri=http://127.0.0.1:PORT"], "is not allowed: no MLflow server answered within 5 s"),
    (["logger.artifact_location=/proc/nope"], "logger.artifact_location='/proc/nope' is not allowed"),
    (["logger.experiment_name='  '"], "logger.experiment_name='  ' is not allowed: must be a name that is not blank"),
    # overrides
    (
        ["+transfer.alpah=0.3"],
        (
            "+transfer.alpah=0.3 is not allowed: transfer.alpah is not a key of the config (+ adds "
            "a key, but the schema does not know this one); did you mean transfer.alpha?"
        ),
    ),
    (["++task.dd=5"], "did you mean task.d?"),
    (["transfer.alpha=0.25,0.5"], "transfer.alpha=0.25,0.5 is a sweep: add -m"),
    # launcher options
    (
        ["-m", "hydra/launcher=ptlab_gram", "hydra.launcher.history=bogus", "seed=0,1"],
        "hydra.launcher.history='bogus' is not allowed: must be one of full, eval, last",
    ),
    (
        ["-m", "hydra/launcher=ptlab_gram", "hydra.launcher.tracking=bogus", "seed=0,1"],
        "hydra.launcher.tracking='bogus' is not allowed: must be one of auto, runs, grid",
    ),
    (
        ["-m", "hydra/launcher=ptlab_gram", "hydra.launcher.max_cells=0", "seed=0,1"],
        "hydra.launcher.max_cells=0 is not allowed: must be >= 1",
    ),
    (["-m", "hydra/launcher=ptlab_joblib", "hydra.launcher.n_jobs=0", "seed=0,1"], "hydra.launcher.n_jobs=0 is not allowed"),
    (
        ["-m", "hydra/launcher=ptlab_gram", "hydra.launcher.n_jobs=0", "seed=0,1"],
        "hydra.launcher.n_jobs: Key 'n_jobs' not in 'PtlabGramLauncherConf'",
    ),
    (
        ["-m", *GRID, *D, "seed=0,1"],
        (
            "hydra.launcher.tracking=grid is not allowed for this sweep: every job must be an "
            "engine=gram synthetic pipeline, one is engine=lightning task=digits"
        ),
    ),
    (
        ["-m", *GRID, "task=synthetic,digits"],
        "every job must be an engine=gram synthetic pipeline, one is engine=lightning task=digits",
    ),  # a later job
    (
        ["-m", *GRID, *S, "seed=0,1", "logger.experiment_name=e${hydra:job.num}"],
        "its jobs are built from one config by their values, but logger.experiment_name=e${hydra:job.num} may differ per",
    ),
    (["-m", *GRID, *S, "seed=0,1", "hydra.sweep.subdir=s${seed}"], "but hydra.sweep.subdir=s${seed} may differ per job"),
    (["-m", *GRID, "hydra.sweeper.cells=cells_digits.yaml"], "one is engine=lightning task=digits"),  # a cell's job
    (["-m", *GRID, *S, "hydra.sweeper.cells=cells_bad.yaml"], "transfer.alpha=1.5 is not allowed"),
    (
        ["-m", *GRID, *S, "hydra.sweeper.cells=cells_bad.yaml", "seed=4,5"],
        "hydra.sweeper.cells=cells_bad.yaml: cell 0 sets seed, which the sweep's params or command line set too",
    ),
    (
        ["-m", "hydra/launcher=ptlab_gram", "hydra.launcher.executor=bogus", "seed=0,1"],
        "hydra.launcher.executor='bogus' is not allowed: must be one of pool, submitit_local, submitit_slurm",
    ),
    (
        [
            "-m",
            "hydra/launcher=ptlab_gram",
            "hydra.launcher.executor=submitit_local",
            "hydra.launcher.submitit.timeout_min=x",
            "seed=0,1",
        ],
        "hydra.launcher.submitit={'timeout_min': 'x', ",
    ),
    # the gram engine's device
    ([*S, "engine.device=tpu"], "engine.device='tpu' is not allowed: must be one of cpu, cuda, auto"),
    pytest.param(
        [*S, "engine.device=cuda"],
        "engine.device='cuda' is not allowed: no CUDA GPU is visible here",
        marks=pytest.mark.skipif(GPU_HERE, reason="a GPU is here"),
    ),
    pytest.param(
        [*S, "trainer=gpu"],
        "trainer.accelerator='gpu' (engine.device=null follows it) is not allowed: no CUDA",
        marks=pytest.mark.skipif(GPU_HERE, reason="a GPU is here"),
    ),
    # the same under --config-dir
    (["--config-dir", "my_conf", "transfer.alpha=1.5"], "transfer.alpha=1.5 is not allowed"),
    (["--config-dir", "my_conf", *D, "task.k=9"], "task.k=9 is not allowed"),
    (["--config-dir", "my_conf", "experiment=mine"], "transfer.alpha=1.5 is not allowed"),  # a preset of my_conf
    (["--config-dir", "missing_conf", "seed=1"], "--config-dir=missing_conf is not allowed: no such folder"),
]


@pytest.mark.parametrize(
    ("overrides", "message"), BAD, ids=[" ".join(case.values[0] if hasattr(case, "values") else case[0]) for case in BAD]
)
def test_what_a_config_builds_is_checked_before_anything_is_written(
    tmp_path: Path, overrides: list[str], message: str, monkeypatch
) -> None:
    make_fixtures(tmp_path)
    if "logger.tracking_uri=sqlite:///zeroed.db" in overrides:
        write_zeroed_store(tmp_path / "zeroed.db")
    port = str(closed_port())
    for name in ("https_proxy", "HTTPS_PROXY"):  # the download probe fails the same way online and offline
        monkeypatch.setenv(name, f"http://127.0.0.1:{port}")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    stamps = {path.name: path.stat().st_mtime_ns for path in tmp_path.glob("*.db")}
    flags = [o for i, o in enumerate(overrides) if o.startswith("-") or overrides[i - 1] == "--config-dir"]
    args = [o.replace("PORT", port) for o in overrides if o not in flags]
    store = (
        []
        if any(a.startswith("logger.tracking_uri=") for a in args)
        else [f"logger.tracking_uri=sqlite:///{tmp_path / 'store' / 'mlflow.db'}"]
    )
    done = run_cli([*flags, *store, *args], cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ptlab: "), done.stderr
    assert message in lines[0], lines[0]
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before  # no store, outputs, cache
    assert stamps == {name: (tmp_path / name).stat().st_mtime_ns for name in stamps}  # the stores untouched


def test_a_deleted_experiment_is_refused_not_restored(tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("gone"))
    size = (tmp_path / "mlflow.db").stat().st_size
    done = run_cli([*S, f"logger.tracking_uri={uri}", "logger.experiment_name=gone"], cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip()
    assert line.startswith(
        "ptlab: logger.experiment_name='gone' is not allowed: that experiment is deleted in "
        "mlflow.db; restore it (mlflow experiments restore --experiment-id 1 with"
    ), line
    assert "or pick another logger.experiment_name" in line and "\n" not in line
    assert client.get_experiment_by_name("gone").lifecycle_stage == "deleted"
    assert (tmp_path / "mlflow.db").stat().st_size == size and not (tmp_path / "outputs").exists()


def test_the_tracker_refuses_a_deleted_experiment_too(tmp_path: Path) -> None:
    """Where the preflight is not run (``run_pipeline`` called from Python), the tracker refuses it."""
    from mlflow.tracking import MlflowClient

    from ptlab.errors import ConfigError
    from ptlab.tracking.mlflow import MLflowTracker

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("gone"))
    with pytest.raises(ConfigError, match="that experiment is deleted; restore it"), MLflowTracker(uri, "gone", "run"):
        pass
    assert client.search_runs([client.get_experiment_by_name("gone").experiment_id], run_view_type=3) == []


def store_at(path: Path, revision: str) -> None:
    """An MLflow store as MLflow makes one, stopped at schema ``revision``: its initial tables, then its migrations."""
    import sqlalchemy
    from alembic import command
    from alembic.config import Config
    from mlflow.store.tracking.dbmodels.initial_models import Base

    from ptlab.tracking.store_template import migrations_dir

    url = f"sqlite:///{path}"
    engine = sqlalchemy.create_engine(url)
    try:
        Base.metadata.create_all(engine)
        config = Config(str(migrations_dir() / "alembic.ini"))
        config.set_main_option("script_location", str(migrations_dir()))
        config.set_main_option("sqlalchemy.url", url)
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def store_at_head(path: Path, *statements: str) -> None:
    """A store at the installed MLflow's head (a copy of its template), then ``statements`` run on it."""
    import shutil

    from ptlab.tracking.store_template import template_path

    template = template_path()
    assert template is not None
    shutil.copyfile(template, path)
    with sqlite3.connect(path) as connection:
        for statement in statements:
            connection.execute(statement)


OLD_REVISION, NEXT_ADDS = "bd07f7e963c5", "ALTER TABLE runs ADD COLUMN deleted_time BIGINT"
"""A schema revision of an older MLflow, and the first change of the migration after it (0c779009ac13)."""


def half_migrated(path: Path) -> None:
    """A store whose migration past ``OLD_REVISION`` stopped after its first change (SQLite's schema changes are not
    one transaction)."""
    store_at(path, OLD_REVISION)
    with sqlite3.connect(path) as connection:
        connection.execute(NEXT_ADDS)


BAD_STORES = {
    "half_migrated": (
        half_migrated,
        f"is an MLflow store at schema revision {OLD_REVISION} that the installed MLflow cannot migrate to",
    ),
    "newer": (
        lambda path: store_at_head(path, "UPDATE alembic_version SET version_num = 'ffffffffffff'"),
        "is an MLflow store at schema revision ffffffffffff, which the installed MLflow does not know",
    ),
    "no_revision": (
        lambda path: store_at_head(path, "DROP TABLE alembic_version"),
        "has MLflow's tables but no schema revision (no alembic_version table)",
    ),
}


@pytest.mark.parametrize("kind", sorted(BAD_STORES))
def test_a_store_mlflow_cannot_open_is_refused_in_one_line(tmp_path: Path, kind: str) -> None:
    """A store that an older MLflow or ptlab left half-migrated, one of a newer MLflow, one without its schema
    revision: one line naming the file and the fix, exit 2, the store untouched."""
    make, message = BAD_STORES[kind]
    store = tmp_path / "stores" / "mlflow.db"
    store.parent.mkdir()
    make(store)
    before = store.read_bytes()
    done = run_cli([*S, f"logger.tracking_uri=sqlite:///{store}", f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip()
    assert line.startswith(f"ptlab: logger.tracking_uri='sqlite:///{store}' is not allowed: {store} "), line
    assert message in line and "\n" not in line, line
    assert line.endswith("restore it from a backup or point logger.tracking_uri at a new file") or kind == "newer", line
    assert store.read_bytes() == before and sorted(p.name for p in store.parent.iterdir()) == ["mlflow.db"]
    assert not (tmp_path / "out").exists()


def test_opening_a_half_migrated_store_fails_in_one_line(tmp_path: Path) -> None:
    """Where the preflight leaves the migration to MLflow (a store above ``MIGRATION_TRY_BYTES``), opening the store
    fails with one ``StoreError`` line, not MLflow's SQL traceback."""
    from ptlab.errors import StoreError
    from ptlab.tracking.faults import prepare_sqlite_store

    store = tmp_path / "mlflow.db"
    half_migrated(store)
    with pytest.raises(
        StoreError, match="an older MLflow or ptlab left its schema half-migrated .* duplicate column name: deleted_time"
    ) as raised:
        prepare_sqlite_store(f"sqlite:///{store}")
    assert "\n" not in str(raised.value)


def test_a_store_without_a_table_fails_in_one_line(tmp_path: Path) -> None:
    """A store at MLflow's head missing a table (not checked before the run) fails its first write to it with one
    ``StoreError`` line naming the fix."""
    from mlflow.tracking import MlflowClient

    from ptlab.errors import StoreError
    from ptlab.tracking.faults import RetryingClient

    store = tmp_path / "mlflow.db"
    store_at_head(store, "DROP TABLE latest_metrics")
    client = RetryingClient(MlflowClient(f"sqlite:///{store}"))
    run = client.create_run(client.create_experiment("x"))
    with pytest.raises(StoreError, match="a table of its schema is missing .* no such table: latest_metrics"):
        client.log_metric(run.info.run_id, "loss", 0.5)


def test_an_older_mlflows_store_is_migrated_as_mlflow_does(tmp_path: Path) -> None:
    """A whole store of an older MLflow is not refused: the run migrates it (as MLflow does) and is tracked there."""
    from mlflow.tracking import MlflowClient

    from ptlab.tracking.store_template import head_revision, schema_revision

    store = tmp_path / "mlflow.db"
    store_at(store, OLD_REVISION)
    done = run_cli(
        [*S, f"logger.tracking_uri=sqlite:///{store}", "logger.experiment_name=old", f"hydra.run.dir={tmp_path / 'out'}"],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert schema_revision(store) == head_revision()
    client = MlflowClient(f"sqlite:///{store}")
    runs = client.search_runs([client.get_experiment_by_name("old").experiment_id], "tags.`ptlab.stage` = 'pipeline'")
    assert [r.info.status for r in runs] == ["FINISHED"]


def test_light_lists_agree_with_the_libraries() -> None:
    """The preflight's copies of lists that live in heavy modules."""
    from lightning_fabric.accelerators import ACCELERATOR_REGISTRY
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.folder import IMG_EXTENSIONS

    from ptlab.build_checks import ACCELERATORS, CIFAR_URLS, IMAGE_EXTENSIONS
    from ptlab.cli import LAUNCHER_EXECUTORS, LAUNCHER_HISTORIES, LAUNCHER_TRACKING
    from ptlab.engines.gram import HISTORIES
    from ptlab.engines.gram.workers import SUBMITIT_EXECUTORS
    from ptlab.pipeline.batched import TRACKING_LAYOUTS

    assert set(IMAGE_EXTENSIONS) == set(IMG_EXTENSIONS)
    assert CIFAR_URLS == {"cifar10": CIFAR10.url, "cifar100": CIFAR100.url}
    assert set(ACCELERATORS) == {"auto", "gpu", *ACCELERATOR_REGISTRY.available_accelerators()}
    assert LAUNCHER_HISTORIES == HISTORIES and LAUNCHER_TRACKING == TRACKING_LAYOUTS
    assert LAUNCHER_EXECUTORS == ("pool", *SUBMITIT_EXECUTORS)


def test_the_checks_do_not_import_torch_or_tracking_for_a_plain_config() -> None:
    import subprocess

    code = (
        "import sys; from ptlab.cli import preflight; assert preflight(['task.d=300']) is None; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'mlflow') "
        "or m.startswith('ptlab.tracking')))"
    )
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == "[]"


def test_image_data_counts_match_the_loaders(tmp_path: Path) -> None:
    """The preflight's per-class counts are the ones the data loaders split into (digits, an image folder)."""
    from omegaconf import OmegaConf

    from ptlab.build_checks import digits_counts, label_counts
    from ptlab.data.images import load_digits_images, load_image_folder

    raw = load_digits_images(32, 0.3, 0)
    counts = digits_counts(0.3, 0)
    assert list(counts.train) == torch.bincount(raw.train_y, minlength=10).tolist()
    assert list(counts.test) == torch.bincount(raw.test_y, minlength=10).tolist()
    write_png_folder(tmp_path / "f", ("ant", "bee", "cat"), per_class=7)
    raw = load_image_folder(tmp_path / "f", 8, 0.3, 0)
    counts = label_counts(
        OmegaConf.create({"name": "image_folder", "root": str(tmp_path / "f"), "test_fraction": 0.3, "split_seed": 0})
    )
    assert counts.names == ("ant", "bee", "cat")
    assert list(counts.train) == torch.bincount(raw.train_y, minlength=3).tolist()


def test_a_drawn_task1_is_checked_as_drawn(make_cfg) -> None:
    """When task 1's classes are drawn by seed, the preflight draws them as the data code does."""
    from ptlab.build_checks import drawn_task1
    from ptlab.data.images import split_classes
    from ptlab.seeding import generator

    for seed in range(5):
        assert drawn_task1(10, [3, 5], 4, seed) == split_classes(10, [3, 5], 4, None, generator(seed, "images", "classes"))[0]

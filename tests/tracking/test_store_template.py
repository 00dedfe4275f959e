"""New SQLite stores from the pre-migrated template (ptlab.tracking.store_template): the same store MLflow makes."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ptlab.paths import STORE_TEMPLATES_ENV as TEMPLATES_ENV
from ptlab.paths import store_template_dir
from ptlab.tracking import store_template
from ptlab.tracking.faults import prepare_sqlite_store
from ptlab.tracking.store_template import head_revision, schema_revision, template_key

REPO = Path(__file__).resolve().parents[2]


def schema(path: Path) -> dict[str, object]:
    """Every table's columns (name, type, not null, default, primary key), every index and trigger's SQL, and the
    revision."""
    connection = sqlite3.connect(path)
    try:
        tables = [name for (name,) in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        columns = {table: connection.execute(f"PRAGMA table_info('{table}')").fetchall() for table in tables}
        objects = sorted(
            connection.execute("SELECT type, name, tbl_name, sql FROM sqlite_master WHERE type != 'table'").fetchall(), key=str
        )
        return {"columns": columns, "objects": objects, "revision": schema_revision(path)}
    finally:
        connection.close()


def experiments(path: Path) -> list[tuple]:
    with sqlite3.connect(path) as connection:
        return connection.execute(
            "SELECT experiment_id, name, artifact_location, lifecycle_stage FROM experiments ORDER BY experiment_id"
        ).fetchall()


def test_template_store_equals_a_migrated_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # MLflow's Default experiment takes its artifact root from the working directory
    monkeypatch.setenv(TEMPLATES_ENV, "off")
    migrated = tmp_path / "migrated.db"
    prepare_sqlite_store(f"sqlite:///{migrated}")
    assert not list(tmp_path.glob("**/mlflow-*.db"))
    monkeypatch.setenv(TEMPLATES_ENV, str(tmp_path / "templates"))
    copied = tmp_path / "copied.db"
    assert prepare_sqlite_store(f"sqlite:///{copied}") == "wal"
    template = tmp_path / "templates" / f"{template_key()}-{head_revision()}.db"
    assert template.is_file()
    assert experiments(template) == []  # MLflow adds its Default experiment when a copy is first opened

    assert schema(copied) == schema(migrated)
    assert schema(copied)["revision"] == head_revision() and len(schema(copied)["columns"]) > 20
    assert experiments(copied) == experiments(migrated)
    assert experiments(copied)[0][:2] == (0, "Default")
    client = MlflowClient(f"sqlite:///{copied}")
    experiment_id = client.create_experiment("x")
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "loss", 0.5, step=3)
    client.set_terminated(run.info.run_id)
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "loss")] == [(3, 0.5)]
    # an existing store is never replaced
    assert prepare_sqlite_store(f"sqlite:///{copied}") == "wal"
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def test_template_rebuilt_for_another_key_and_a_bad_template_falls_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "templates"
    monkeypatch.setenv(TEMPLATES_ENV, str(folder))
    first = store_template.template_path()
    assert first is not None and first.name == f"{template_key()}-{head_revision()}.db"
    built = first.stat().st_mtime_ns
    assert store_template.template_path() == first and first.stat().st_mtime_ns == built  # reused
    monkeypatch.setattr(store_template, "template_key", lambda: "mlflow-0.0.0-other")
    second = store_template.template_path()
    assert second == folder / f"mlflow-0.0.0-other-{head_revision()}.db" and second.is_file() and first.is_file()
    assert schema(second) == schema(first)

    # A template whose revision is not the head it was built at is discarded; MLflow migrates the store instead.
    with sqlite3.connect(second) as connection:
        connection.execute("UPDATE alembic_version SET version_num = 'aaaaaaaaaaaa'")
    connection.close()
    store = tmp_path / "store.db"
    prepare_sqlite_store(f"sqlite:///{store}")
    assert not second.exists()
    assert schema_revision(store) == head_revision()
    assert MlflowClient(f"sqlite:///{store}").get_experiment("0").name == "Default"
    assert store_template.template_path() == second and schema_revision(second) == head_revision()  # rebuilt


def test_templates_off_and_an_unwritable_folder_migrate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(TEMPLATES_ENV, "off")
    assert store_template_dir() is None
    assert not store_template.new_store_from_template(tmp_path / "a.db") and not (tmp_path / "a.db").exists()
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv(TEMPLATES_ENV, str(blocker / "templates"))
    assert not store_template.new_store_from_template(tmp_path / "b.db") and not (tmp_path / "b.db").exists()
    prepare_sqlite_store(f"sqlite:///{tmp_path / 'b.db'}")
    assert schema_revision(tmp_path / "b.db") == head_revision()


@pytest.mark.slow
def test_concurrent_new_stores_and_template_build(tmp_path: Path) -> None:
    """Three processes start on one new store and two on another, with no template yet: one template is built,
    every store is complete and every process succeeds."""
    code = textwrap.dedent("""
        import sys
        from mlflow.tracking import MlflowClient
        from ptlab.tracking.faults import prepare_sqlite_store
        uri = "sqlite:///" + sys.argv[1]
        prepare_sqlite_store(uri)
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("shared") or client.get_experiment(client.create_experiment("shared"))
        client.set_terminated(client.create_run(experiment.experiment_id).info.run_id)
    """)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO), TEMPLATES_ENV: str(tmp_path / "templates"), "HOME": str(tmp_path)}
    stores = [tmp_path / "one.db"] * 3 + [tmp_path / "two.db"] * 2
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(path)], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True)
        for path in stores
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-2000:]
    assert [p.name for p in (tmp_path / "templates").glob("*.db")] == [f"{template_key()}-{head_revision()}.db"]
    assert not list(tmp_path.glob("**/*.partial"))
    for path, runs in ((tmp_path / "one.db", 3), (tmp_path / "two.db", 2)):
        client = MlflowClient(f"sqlite:///{path}")
        assert schema_revision(path) == head_revision()
        experiment = client.get_experiment_by_name("shared")
        assert len(client.search_runs([experiment.experiment_id])) == runs


def test_a_store_migrated_without_template_appears_only_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Templates off: MLflow migrates a file beside the store, which then replaces it; stopped midway (here: an
    interrupt raised by the migration), no store file is left, so the next run starts clean instead of failing on a
    half-migrated schema forever."""
    import mlflow.tracking

    monkeypatch.setenv(TEMPLATES_ENV, "off")
    store = tmp_path / "stopped.db"
    real = mlflow.tracking.MlflowClient

    class Interrupted:
        def __init__(self, uri: str) -> None:
            assert uri.endswith(".partial")  # the migrations never run on the store's own file
            real(uri).search_experiments(max_results=1)
            raise KeyboardInterrupt

    monkeypatch.setattr(mlflow.tracking, "MlflowClient", Interrupted)
    with pytest.raises(KeyboardInterrupt):
        prepare_sqlite_store(f"sqlite:///{store}")
    assert not store.exists() and list(tmp_path.glob("*.partial")) == []
    monkeypatch.setattr(mlflow.tracking, "MlflowClient", real)
    prepare_sqlite_store(f"sqlite:///{store}")
    assert [name for _, name, _, _ in experiments(store)] == ["Default"]
    assert schema_revision(store) == head_revision()

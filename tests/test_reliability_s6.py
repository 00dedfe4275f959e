"""Issue 29, the rest: a store at MLflow's head that lacks a table or a column is refused by the preflight; runs that
cannot be ended at the moment of a store fault are retried at exit and named when they stay open; a damaged image
whose header is fine is refused before tracking, its decoding cached."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import SMALL, run_cli


def head_store(path: Path, *statements: str) -> None:
    """A store at the installed MLflow's head (a copy of ptlab's template), then ``statements`` run on it."""
    from ptlab.tracking.store_template import template_path

    template = template_path()
    assert template is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, path)
    with sqlite3.connect(path) as connection:
        for statement in statements:
            connection.execute(statement)


INCOMPLETE = {
    "table": (["DROP TABLE webhooks"], "lacks MLflow's table webhooks;"),
    "column": (["ALTER TABLE runs DROP COLUMN deleted_time"], "lacks MLflow's column runs.deleted_time;"),
    "both": (
        ["DROP TABLE latest_metrics", "DROP TABLE experiment_tags", "ALTER TABLE params DROP COLUMN value"],
        "lacks MLflow's tables experiment_tags, latest_metrics and column params.value;",
    ),
}


@pytest.mark.parametrize("kind", sorted(INCOMPLETE))
def test_a_store_at_the_head_lacking_a_table_or_column_is_refused_in_one_line(tmp_path: Path, kind: str) -> None:
    """Exit 2, one line naming the file, what is missing and the fix; the store untouched, no output folder."""
    statements, message = INCOMPLETE[kind]
    store = tmp_path / "stores" / "mlflow.db"
    head_store(store, *statements)
    before = store.read_bytes()
    done = run_cli([*SMALL, f"logger.tracking_uri=sqlite:///{store}", f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip()
    assert line.startswith(f"ptlab: logger.tracking_uri='sqlite:///{store}' is not allowed: {store} is an MLflow store"), line
    assert message in line and "\n" not in line, line
    assert line.endswith("restore it from a backup or point logger.tracking_uri at a new file"), line
    assert store.read_bytes() == before and sorted(p.name for p in store.parent.iterdir()) == ["mlflow.db"]
    assert not (tmp_path / "out").exists()


def test_the_schema_reference_without_a_template_is_mlflows_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Templates off: MLflow's SQLAlchemy models are the reference; a complete store passes, one without a table
    does not; the template and the models agree on every table of the models (the template may hold more)."""
    from ptlab.errors import ConfigError
    from ptlab.store_checks import check_sqlite_store, expected_schema, mlflow_revisions

    head = mlflow_revisions()[1]
    store = tmp_path / "mlflow.db"
    head_store(store)
    expected_schema.cache_clear()
    from_template = expected_schema(head)
    monkeypatch.setenv("PTLAB_STORE_TEMPLATES", "off")
    expected_schema.cache_clear()
    try:
        from_models = expected_schema(head)
        assert set(from_models) <= set(from_template) and len(from_models) >= 40
        assert all(from_models[table] <= from_template[table] for table in from_models)
        check_sqlite_store(f"sqlite:///{store}", store, "x")
        with sqlite3.connect(store) as connection:
            connection.execute("DROP TABLE inputs")
        with pytest.raises(ConfigError, match="lacks MLflow's table inputs;"):
            check_sqlite_store(f"sqlite:///{store}", store, "x")
    finally:
        expected_schema.cache_clear()


@pytest.mark.parametrize("value", ["", "off", "OFF", "rel/templates", "~/t"])
def test_the_preflight_finds_the_templates_where_tracking_keeps_them(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """``ptlab.store_checks.template_folder`` repeats ``ptlab.tracking.store_template.template_dir`` (the preflight
    cannot import tracking): both read the same folder."""
    from ptlab.store_checks import template_folder
    from ptlab.tracking.store_template import template_dir

    monkeypatch.setenv("PTLAB_STORE_TEMPLATES", value)
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere/cache")
    assert template_folder() == template_dir()
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert template_folder() == template_dir()

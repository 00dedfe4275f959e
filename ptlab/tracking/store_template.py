"""New SQLite tracking stores copied from a pre-migrated template instead of migrated one by one.

A new MLflow SQLite store runs MLflow's whole migration history (about 70 alembic scripts: 1.4-6 s, more
than the default pipeline trains). ``new_store_from_template`` copies a template instead: an empty database
that MLflow's own migration scripts brought to their head once, kept in a per-user cache folder
(``ptlab.paths.store_template_dir``) under a key of the installed MLflow (its version and the names and sizes of its migration
scripts, ``template_key``). The template is built the way MLflow creates a store's tables (its initial
models, then ``alembic upgrade heads`` over MLflow's installed ``db_migrations`` scripts), checked to be at the
head revision that alembic reads from those scripts, and holds no rows but ``alembic_version``: MLflow itself
adds its ``Default`` experiment (with the opening process's artifact root) the first time the copy is opened,
as it does for a store it migrates. Every open of a store checks its revision against MLflow's head
(``_verify_schema``), so a copy that does not match fails loudly; ``prepare_sqlite_store`` then removes it and
lets MLflow migrate. Templates are built under a file lock and moved into place atomically; copies are made
under the store's own lock (``prepare_sqlite_store``).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sqlite3
from pathlib import Path

from filelock import FileLock

from ptlab.paths import store_template_dir

log = logging.getLogger(__name__)


def migrations_dir() -> Path:
    """MLflow's installed alembic scripts (``mlflow/store/db_migrations``), found without importing MLflow."""
    spec = importlib.util.find_spec("mlflow")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("mlflow is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "store" / "db_migrations"


def template_key() -> str:
    """``mlflow-<version>-<digest>``: the installed MLflow's version and a digest of its migration scripts (names
    and contents: a patched or reinstalled MLflow with other scripts gets another template)."""
    digest = hashlib.sha256()
    for script in sorted((migrations_dir() / "versions").glob("*.py")):
        digest.update(script.name.encode() + b"\0" + script.read_bytes())
    return f"mlflow-{importlib.metadata.version('mlflow')}-{digest.hexdigest()[:12]}"


def head_revision() -> str:
    """The single head revision of MLflow's installed migration scripts, as alembic reads them."""
    from alembic.script import ScriptDirectory

    heads = ScriptDirectory(str(migrations_dir())).get_heads()
    if len(heads) != 1:
        raise RuntimeError(f"MLflow's migration scripts have {len(heads)} heads: {heads}")
    return heads[0]


def schema_revision(path: Path) -> str | None:
    """The revision in a SQLite store's ``alembic_version`` table (``None``: no such table or not one row)."""
    connection = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        rows = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    except sqlite3.DatabaseError:
        return None
    finally:
        connection.close()
    return rows[0][0] if len(rows) == 1 else None


def build_template(path: Path) -> str:
    """Write an empty store at MLflow's migration head to ``path`` (created afresh); returns the head revision.

    The steps of MLflow's own first use of an empty database (``mlflow.store.db.utils._initialize_tables``):
    the tables of MLflow's initial models, then alembic's ``upgrade heads`` over MLflow's migration scripts."""
    import sqlalchemy
    from alembic import command
    from alembic.config import Config
    from mlflow.store.tracking.dbmodels.initial_models import Base as InitialBase

    path.unlink(missing_ok=True)
    url = f"sqlite:///{path}"
    engine = sqlalchemy.create_engine(url)
    try:
        InitialBase.metadata.create_all(engine)
        config = Config(str(migrations_dir() / "alembic.ini"))
        config.set_main_option("script_location", str(migrations_dir()))
        config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
        with engine.begin() as connection:
            config.attributes["connection"] = connection
            command.upgrade(config, "heads")
    finally:
        engine.dispose()
    head = head_revision()
    found = schema_revision(path)
    if found != head:
        raise RuntimeError(f"the template store is at revision {found}, MLflow's head is {head}")
    return head


def template_path(folder: Path | None = None) -> Path | None:
    """The template of the installed MLflow, built first if missing (once per user and MLflow version; parallel
    processes wait on a file lock); ``None`` when templates are off."""
    folder = folder or store_template_dir()
    if folder is None:
        return None
    key = template_key()
    found = sorted(folder.glob(f"{key}-*.db"))
    if found:
        return found[0]
    folder.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder / f"{key}.lock"), timeout=300):
        found = sorted(folder.glob(f"{key}-*.db"))
        if found:
            return found[0]
        partial = folder / f"{key}.{os.getpid()}.partial"
        try:
            head = build_template(partial)
            path = folder / f"{key}-{head}.db"
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        log.info("built the MLflow store template %s", path)
    return path


def template_revision(template: Path) -> str:
    """The head revision a template was built at (checked then against alembic's reading of MLflow's scripts),
    from its name ``<key>-<revision>.db``."""
    return template.stem.rsplit("-", 1)[1]


def new_store_from_template(path: Path) -> bool:
    """Create the new SQLite store ``path`` as a copy of the template; ``False`` (nothing written) when templates
    are off or the template cannot be made (MLflow then migrates the store itself). Call under the store's lock."""
    try:
        template = template_path()
        if template is None:
            return False
        expected = template_revision(template)
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        try:
            shutil.copyfile(template, partial)
            found = schema_revision(partial)
            if found != expected:
                discard_template()
                raise RuntimeError(f"the copy is at revision {found}, not at MLflow's head {expected}")
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
    except Exception as err:  # any failure: MLflow migrates the store as without a template
        log.warning(
            "ptlab: the MLflow store template was not used (%s); migrating the new store",
            str(err).splitlines()[0] if str(err) else type(err).__name__,
        )
        return False
    return True


def discard_template() -> None:
    """Remove the installed MLflow's template (MLflow rejected a copy of it); the next new store rebuilds it."""
    folder = store_template_dir()
    if folder is not None:
        for template in folder.glob(f"{template_key()}-*.db"):
            template.unlink(missing_ok=True)

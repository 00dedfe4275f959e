"""Preflight checks of the tracking store: that it opens, is an MLflow store, and has the experiment usable.

Nothing here creates a file of the user's. A SQLite store is read with ``sqlite3`` (its table names,
``PRAGMA quick_check`` on files up to ``QUICK_CHECK_BYTES``, its schema revision against the head of the installed
MLflow's migration scripts, the experiment's lifecycle stage); a store at an older revision, which MLflow migrates
when it opens it, is first migrated by MLflow on a temporary copy (the one case that imports MLflow here), so a store
that an older MLflow or ptlab left half-migrated is refused in one line instead of failing in MLflow; an HTTP
store is asked once, with a short timeout, through MLflow's REST API (``experiments/get-by-name``, with the
credentials MLflow itself reads: ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` or
``MLFLOW_TRACKING_TOKEN``); another database store needs its SQLAlchemy driver importable.

A store at the head revision (or migrated there on the copy) must hold every table and column of MLflow's schema at
that revision (``check_schema_complete``): the reference is the pre-migrated store template that ptlab keeps per
MLflow version (``ptlab.tracking.store_template``; an empty store MLflow's own migrations brought to the head), read
with ``sqlite3``, or, where no template exists yet, MLflow's SQLAlchemy models (``Base.metadata``, about 2 s to
import).
"""

from __future__ import annotations

import base64
import functools
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import sqlite3
import ssl
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from ptlab.errors import ConfigError, restore_hint
from ptlab.paths import store_template_dir

MLFLOW_TABLES = frozenset({"experiments", "runs", "alembic_version"})
"""Tables every MLflow SQL store has (a SQLite file with tables but not these belongs to something else)."""
QUICK_CHECK_BYTES = 256 << 20
"""SQLite stores up to this size get ``PRAGMA quick_check`` (about 0.1 s per 10 MB); larger ones only their
table names."""
PROBE_TIMEOUT_S = 5.0
"""Seconds the one reachability request to an HTTP tracking server may take."""
MEMORY_NAMES = ("", ":memory:")
MIGRATION_TRY_BYTES = 256 << 20
"""A SQLite store at an older schema revision up to this size has its migration tried on a copy first."""
FIX = "restore it from a backup or point logger.tracking_uri at a new file"


TRACKING_SECONDS_ENV = {"PTLAB_CLOSE_RETRY_S": 0.0, "PTLAB_HEARTBEAT_S": None}
"""Environment variables of tracking that hold seconds, with the least value allowed (``None``: above 0); the names
are those of ``ptlab.tracking.faults`` and ``ptlab.tracking.heartbeat`` (a test keeps them equal)."""


def check_tracking_environment(environ: Mapping[str, str]) -> None:
    """``TRACKING_SECONDS_ENV`` that are set hold a finite number of seconds in range (one line naming the variable)."""
    for name, least in TRACKING_SECONDS_ENV.items():
        if name not in environ:
            continue
        allowed = f"a number of seconds >= {least:g}" if least is not None else "a number of seconds > 0"
        try:
            value = float(environ[name])
        except ValueError:
            value = math.nan
        if not math.isfinite(value) or (value < least if least is not None else value <= 0):
            raise ConfigError(f"{name}={environ[name]!r} (environment) is not allowed: must be {allowed}")


def _refuse(uri: str, why: str) -> ConfigError:
    return ConfigError(f"logger.tracking_uri={uri!r} is not allowed: {why}")


def check_sqlite_store(uri: str, path: Path, experiment_name: str | None) -> None:
    """An existing SQLite file is an MLflow store (or empty), not corrupt, and ``experiment_name`` in it is
    not deleted."""
    if path.name in MEMORY_NAMES:
        raise _refuse(
            uri,
            "an in-memory SQLite store is gone when the command ends (and MLflow would write files "
            "named :memory: beside it); use a file, e.g. sqlite:///mlflow.db",
        )
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=20)
    except sqlite3.Error as err:
        raise _refuse(uri, f"{path} cannot be opened ({err})") from None
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and {"experiments", "runs"} <= tables and "alembic_version" not in tables:
            raise _refuse(
                uri,
                f"{path} has MLflow's tables but no schema revision (no alembic_version table), so "
                f"MLflow cannot tell how to open it; {FIX}",
            )
        if tables and not MLFLOW_TABLES <= tables:
            shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
            raise _refuse(
                uri,
                f"{path} is a SQLite database of something else (tables {shown}), not an MLflow "
                "store; point logger.tracking_uri at a new file",
            )
        if path.stat().st_size <= QUICK_CHECK_BYTES:
            result = connection.execute("PRAGMA quick_check(1)").fetchone()[0]
            if result != "ok":
                raise _refuse(uri, f"{path} is a damaged SQLite database ({result}); restore it from a backup or use a new file")
        if tables:
            check_schema_revision(uri, path, connection)
        if experiment_name is not None and tables:
            row = connection.execute(
                "SELECT experiment_id, lifecycle_stage FROM experiments WHERE name = ?", (experiment_name,)
            ).fetchone()
            if row is not None and row[1] == "deleted":
                raise ConfigError(
                    f"logger.experiment_name={experiment_name!r} is not allowed: that experiment is "
                    f"deleted in {path.name}; {restore_hint(str(row[0]), uri)}"
                )
    except sqlite3.DatabaseError as err:
        if "malformed" in str(err):
            raise _refuse(
                uri, f"{path} is a damaged SQLite database ({err}); restore it from a backup or use a new file"
            ) from None
        raise _refuse(uri, f"{path} is not a readable SQLite database ({err})") from None
    finally:
        connection.close()


@functools.cache
def mlflow_revisions() -> tuple[frozenset[str], str | None]:
    """The schema revisions of the installed MLflow's migration scripts and their single head (``None`` when they
    have none or several), read from the scripts' ``revision``/``down_revision`` lines without importing MLflow."""
    spec = importlib.util.find_spec("mlflow")
    if spec is None or not spec.submodule_search_locations:
        return frozenset(), None
    versions = Path(next(iter(spec.submodule_search_locations))) / "store" / "db_migrations" / "versions"
    revisions, parents = set(), set()
    for script in versions.glob("*.py"):
        text = script.read_text(errors="replace")
        found = re.search(r"^revision\b[^=\n]*=\s*['\"](\w+)['\"]", text, re.MULTILINE)
        down = re.search(r"^down_revision\b[^=\n]*=(.*)$", text, re.MULTILINE)
        if found:
            revisions.add(found.group(1))
        if down:
            parents.update(re.findall(r"['\"](\w+)['\"]", down.group(1)))
    heads = revisions - parents
    return frozenset(revisions), next(iter(heads)) if len(heads) == 1 else None


def check_schema_revision(uri: str, path: Path, connection: sqlite3.Connection) -> None:
    """An MLflow SQLite store's schema revision is one the installed MLflow knows; below its head (MLflow migrates
    such a store when it opens it), the migration must succeed on a copy (``try_migration``)."""
    rows = connection.execute("SELECT version_num FROM alembic_version").fetchall()
    if len(rows) != 1:
        raise _refuse(
            uri, f"{path} is an MLflow store without one schema revision (alembic_version holds {len(rows)} rows); {FIX}"
        )
    revision = rows[0][0]
    known, head = mlflow_revisions()
    if head is None:
        return
    if revision == head:
        check_schema_complete(uri, path, connection, head)
        return
    if revision not in known:
        raise _refuse(
            uri,
            f"{path} is an MLflow store at schema revision {revision}, which the installed MLflow "
            "does not know (a newer MLflow wrote it); upgrade MLflow here, or point "
            "logger.tracking_uri at a new file",
        )
    try_migration(uri, path, revision, head, os.stat(path).st_mtime_ns)


@functools.cache
def try_migration(uri: str, path: Path, revision: str, head: str, stamp: int) -> None:
    """MLflow's migration of a store from ``revision`` to ``head``, run on a temporary copy (once per file version,
    ``stamp``; stores above ``MIGRATION_TRY_BYTES`` are left to MLflow): a store left half-migrated (a migration
    stopped midway: "duplicate column name") is refused with the error MLflow would raise."""
    if path.stat().st_size > MIGRATION_TRY_BYTES:
        return
    from mlflow.tracking import MlflowClient

    quiet = {name: logging.getLogger(name).level for name in ("mlflow", "alembic")}
    with tempfile.TemporaryDirectory(prefix="ptlab-store-") as folder:
        copy = Path(folder) / path.name
        source = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=20)
        target = sqlite3.connect(copy)
        try:
            source.backup(target)
        finally:
            source.close()
            target.close()
        try:
            for name in quiet:
                logging.getLogger(name).setLevel(logging.CRITICAL)
            MlflowClient(f"sqlite:///{copy}").search_experiments(max_results=1)
            migrated = sqlite3.connect(f"{copy.as_uri()}?mode=ro", uri=True)
            try:
                missing = missing_schema(migrated, head)
            finally:
                migrated.close()
        except Exception as err:  # whatever MLflow raises here, it raises on the store itself
            first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)[:160]
            raise _refuse(
                uri,
                f"{path} is an MLflow store at schema revision {revision} that the installed MLflow "
                f"cannot migrate to {head} ({type(err).__name__}: {first}): an older MLflow or ptlab left "
                f"it half-migrated; {FIX}",
            ) from None
        finally:
            for name, level in quiet.items():
                logging.getLogger(name).setLevel(level)
    if missing:
        raise _refuse(uri, f"{path} is an MLflow store at schema revision {revision} that, migrated to {head}, {missing}; {FIX}")


def sqlite_schema(connection: sqlite3.Connection) -> dict[str, frozenset[str]]:
    """A SQLite database's tables and each one's columns (hidden and generated columns included)."""
    tables = [row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    return {
        table: frozenset(row[1] for row in connection.execute(f'PRAGMA table_xinfo("{table}")'))
        for table in tables
        if not table.startswith("sqlite_")
    }


@functools.cache
def expected_schema(head: str) -> dict[str, frozenset[str]]:
    """The tables and columns of an MLflow store at ``head``: ptlab's store template of the
    installed MLflow at that revision (``mlflow-<version>-<digest>-<head>.db``; a few ms), else MLflow's SQLAlchemy
    models (tracking and model registry; about 2 s, once per process)."""
    folder = store_template_dir()
    version = importlib.metadata.version("mlflow")
    for template in sorted(folder.glob(f"mlflow-{version}-*-{head}.db")) if folder and folder.is_dir() else []:
        try:
            connection = sqlite3.connect(f"{template.as_uri()}?mode=ro", uri=True)
            try:
                found = sqlite_schema(connection)
            finally:
                connection.close()
        except sqlite3.Error:
            continue
        if MLFLOW_TABLES <= found.keys():
            return found
    import mlflow.store.model_registry.dbmodels.models  # noqa: F401 - registers the registry's tables on Base
    from mlflow.store.tracking.dbmodels.models import Base

    return {table.name: frozenset(column.name for column in table.columns) for table in Base.metadata.sorted_tables}


def missing_schema(connection: sqlite3.Connection, head: str) -> str:
    """What a store at ``head`` lacks of MLflow's schema at ``head`` ("" when nothing): missing tables, then the
    missing columns of the tables it has, named (the first few)."""
    expected = expected_schema(head)
    found = sqlite_schema(connection)
    tables = sorted(set(expected) - set(found))
    columns = sorted(f"{table}.{column}" for table in set(expected) & set(found) for column in expected[table] - found[table])
    parts = []
    for kind, names in (("table", tables), ("column", columns)):
        if names:
            shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
            parts.append(f"{kind}{'s' if len(names) > 1 else ''} {shown}")
    return f"lacks MLflow's {' and '.join(parts)}" if parts else ""


def check_schema_complete(uri: str, path: Path, connection: sqlite3.Connection, head: str) -> None:
    """A store at MLflow's head revision holds every table and column of MLflow's schema at it (a store that lost a
    table would fail at its first write there, after the run opened)."""
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime_ns, head)
    missing = _CHECKED.get(key)
    if missing is None:
        missing = _CHECKED[key] = missing_schema(connection, head)
    if missing:
        raise _refuse(uri, f"{path} is an MLflow store at schema revision {head} that {missing}; {FIX}")


_CHECKED: dict[tuple[Path, int, int, str], str] = {}
"""``missing_schema`` of each version of a store file (size, mtime) this process checked: a sweep checks it per job."""


def _auth_headers() -> dict[str, str]:
    """The credentials MLflow's REST client sends, from the same environment variables."""
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    token = os.environ.get("MLFLOW_TRACKING_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def check_http_store(uri: str, experiment_name: str | None, timeout: float = PROBE_TIMEOUT_S) -> None:
    """One request to the server: it answers as MLflow, accepts the credentials, and the experiment is not
    deleted."""
    name = experiment_name or "default"
    query = urllib.parse.urlencode({"experiment_name": name})
    url = f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?{query}"
    request = urllib.request.Request(url, headers=_auth_headers())
    insecure = os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() in ("1", "true")
    context = ssl._create_unverified_context() if insecure and uri.startswith("https") else None
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            body = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        if err.code in (401, 403):
            raise _refuse(
                uri,
                f"the server refused the credentials (HTTP {err.code}); set "
                "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD",
            ) from None
        try:
            code = json.loads(err.read() or b"{}").get("error_code")
        except ValueError:
            code = None
        if err.code == 404 and code == "RESOURCE_DOES_NOT_EXIST":
            return
        raise _refuse(uri, f"the server did not answer as an MLflow tracking server (HTTP {err.code} on its REST API)") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise _refuse(uri, f"no MLflow server answered within {timeout:g} s ({reason}); start it or fix the address") from None
    experiment = body.get("experiment", {}) if isinstance(body, dict) else {}
    if experiment.get("lifecycle_stage") == "deleted":
        raise ConfigError(
            f"logger.experiment_name={name!r} is not allowed: that experiment is deleted on "
            f"{uri}; {restore_hint(str(experiment.get('experiment_id')), uri)}"
        )


def check_database_driver(uri: str) -> None:
    """The SQLAlchemy driver of a database URI (``postgresql://`` needs psycopg2) can be imported."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(uri).get_dialect().import_dbapi()
    except ImportError as err:
        raise _refuse(
            uri,
            f"its database driver (the Python module {err.name or str(err)}) is not installed "
            "here; install it or use another store",
        ) from None
    except (ArgumentError, NoSuchModuleError, ValueError) as err:
        raise _refuse(uri, str(err).splitlines()[0]) from None

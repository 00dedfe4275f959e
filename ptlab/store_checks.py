"""Preflight checks of the tracking store: that it opens, is an MLflow store, and has the experiment usable.

Nothing here imports MLflow or creates a file. A SQLite store is read with ``sqlite3`` (its table names,
``PRAGMA quick_check`` on files up to ``QUICK_CHECK_BYTES``, the experiment's lifecycle stage); an HTTP
store is asked once, with a short timeout, through MLflow's REST API (``experiments/get-by-name``, with the
credentials MLflow itself reads: ``MLFLOW_TRACKING_USERNAME``/``MLFLOW_TRACKING_PASSWORD`` or
``MLFLOW_TRACKING_TOKEN``); another database store needs its SQLAlchemy driver importable.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
import ssl
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from ptlab.errors import ConfigError, restore_hint

MLFLOW_TABLES = frozenset({"experiments", "runs", "alembic_version"})
"""Tables every MLflow SQL store has (a SQLite file with tables but not these belongs to something else)."""
QUICK_CHECK_BYTES = 256 << 20
"""SQLite stores up to this size get ``PRAGMA quick_check`` (about 0.1 s per 10 MB); larger ones only their
table names."""
PROBE_TIMEOUT_S = 5.0
"""Seconds the one reachability request to an HTTP tracking server may take."""
MEMORY_NAMES = ("", ":memory:")


def _refuse(uri: str, why: str) -> ConfigError:
    return ConfigError(f"logger.tracking_uri={uri!r} is not allowed: {why}")


def check_sqlite_store(uri: str, path: Path, experiment_name: str | None) -> None:
    """An existing SQLite file is an MLflow store (or empty), not corrupt, and ``experiment_name`` in it is
    not deleted."""
    if path.name in MEMORY_NAMES:
        raise _refuse(uri, "an in-memory SQLite store is gone when the command ends (and MLflow would write files "
                           "named :memory: beside it); use a file, e.g. sqlite:///mlflow.db")
    if not path.is_file() or path.stat().st_size == 0:
        return
    try:
        connection = sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True, timeout=20)
    except sqlite3.Error as err:
        raise _refuse(uri, f"{path} cannot be opened ({err})") from None
    try:
        tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if tables and not MLFLOW_TABLES <= tables:
            shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
            raise _refuse(uri, f"{path} is a SQLite database of something else (tables {shown}), not an MLflow "
                               "store; point logger.tracking_uri at a new file")
        if path.stat().st_size <= QUICK_CHECK_BYTES:
            result = connection.execute("PRAGMA quick_check(1)").fetchone()[0]
            if result != "ok":
                raise _refuse(uri, f"{path} is a damaged SQLite database ({result}); restore it from a backup or "
                                   "use a new file")
        if experiment_name is not None and tables:
            row = connection.execute("SELECT experiment_id, lifecycle_stage FROM experiments WHERE name = ?",
                                     (experiment_name,)).fetchone()
            if row is not None and row[1] == "deleted":
                raise ConfigError(f"logger.experiment_name={experiment_name!r} is not allowed: that experiment is "
                                  f"deleted in {path.name}; {restore_hint(str(row[0]), uri)}")
    except sqlite3.DatabaseError as err:
        if "malformed" in str(err):
            raise _refuse(uri, f"{path} is a damaged SQLite database ({err}); restore it from a backup or use a "
                               "new file") from None
        raise _refuse(uri, f"{path} is not a readable SQLite database ({err})") from None
    finally:
        connection.close()


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
            raise _refuse(uri, f"the server refused the credentials (HTTP {err.code}); set "
                               "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD") from None
        try:
            code = json.loads(err.read() or b"{}").get("error_code")
        except ValueError:
            code = None
        if err.code == 404 and code == "RESOURCE_DOES_NOT_EXIST":
            return
        raise _refuse(uri, f"the server did not answer as an MLflow tracking server (HTTP {err.code} on its REST "
                           "API)") from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise _refuse(uri, f"no MLflow server answered within {timeout:g} s ({reason}); start it or fix the "
                           "address") from None
    experiment = body.get("experiment", {}) if isinstance(body, dict) else {}
    if experiment.get("lifecycle_stage") == "deleted":
        raise ConfigError(f"logger.experiment_name={name!r} is not allowed: that experiment is deleted on "
                          f"{uri}; {restore_hint(str(experiment.get('experiment_id')), uri)}")


def check_database_driver(uri: str) -> None:
    """The SQLAlchemy driver of a database URI (``postgresql://`` needs psycopg2) can be imported."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        make_url(uri).get_dialect().import_dbapi()
    except ImportError as err:
        raise _refuse(uri, f"its database driver (the Python module {err.name or str(err)}) is not installed "
                           "here; install it or use another store") from None
    except (ArgumentError, NoSuchModuleError, ValueError) as err:
        raise _refuse(uri, str(err).splitlines()[0]) from None

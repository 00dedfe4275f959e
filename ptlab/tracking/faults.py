"""Tracking that survives parallel jobs and kills.

- SQLite store shared by parallel jobs: ``prepare_sqlite_store`` creates the tables under a file
  lock (two jobs starting on a new database would both run MLflow's migrations) and switches it to WAL
  journaling (readers never block the writer; the setting is stored in the file, so it is done once)
  on top of MLflow's own 20 s ``busy_timeout``; ``RetryingClient`` retries a call that still fails
  with "database is locked" (SQLite returns that at once, without waiting, when two writers would
  deadlock), with exponential backoff and jitter. WAL needs a local disk: for jobs on several
  machines, use an MLflow server (``logger.tracking_uri=http://host:5000``) instead of a shared file.
- Kills: ``signals_as_interrupt`` turns SIGTERM (``kill``, SLURM preemption or time limit) and
  SIGINT (Ctrl-C) into a ``Terminated`` exception, a ``KeyboardInterrupt``, so ``MLflowTracker``
  marks the runs KILLED, instead of the process dying with its runs left RUNNING.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import signal
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType
from typing import Any

from filelock import FileLock

from ptlab.errors import StoreError, Terminated
from ptlab.processes import exit_at_once, in_sweep_worker
from ptlab.tracking.store_template import discard_template, new_store_from_template

log = logging.getLogger(__name__)
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
"""MLflow logs every SQL error of its store with a traceback before raising it; ptlab reports the raised error (a
store fault as one ``StoreError`` line), so that log would only repeat it over dozens of lines."""

LOCKED_MESSAGES = ("database is locked", "database table is locked")
SQLITE_PREFIX = "sqlite:///"


def is_locked_error(err: BaseException) -> bool:
    """True for SQLite's transient "database is locked" (as MLflow or sqlite3 raise it; MLflow is not imported
    here: this module loads before it, and an ``MlflowException`` exists only once MLflow is loaded)."""
    exceptions = sys.modules.get("mlflow.exceptions")
    kinds = (sqlite3.OperationalError,) + ((exceptions.MlflowException,) if exceptions is not None else ())
    return isinstance(err, kinds) and any(message in str(err) for message in LOCKED_MESSAGES)


class _Writes:
    """How deep this process is inside tracking writes, and a signal that arrived meanwhile."""

    depth = 0
    deferred: str | None = None


@contextlib.contextmanager
def tracking_write(raise_deferred: bool | None = True) -> Iterator[None]:
    """A block that writes to the store: a SIGTERM or SIGINT that arrives inside it is held until the
    block is done (never raised half-way through a transaction, which would leave SQLite locked for
    the handler's own writes, or between creating a run and recording its id), then raised as
    ``Terminated``. ``raise_deferred=False`` drops it (the block is already marking the runs of an
    interrupted pipeline); ``None`` keeps it for the next write's end (a context manager's
    ``__enter__``, whose exception would skip its ``__exit__``)."""
    _Writes.depth += 1
    try:
        yield
    finally:
        _Writes.depth -= 1
    if _Writes.depth == 0 and _Writes.deferred is not None and raise_deferred is not None:
        name, _Writes.deferred = _Writes.deferred, None
        if raise_deferred:
            raise Terminated(f"signal {name}")


STORE_FAULTS = {
    "database or disk is full": "its disk is full",
    "no space left on device": "its disk is full",
    "database disk image is malformed": "its SQLite file is damaged",
    "file is not a database": "its file is not a SQLite database",
    "disk i/o error": "a disk I/O error",
    "unable to open database file": "its database file cannot be opened",
    "max retries exceeded": "the server does not answer",
    "connection refused": "the server does not answer",
    "connection aborted": "the server does not answer",
    "read timed out": "the server does not answer",
    "failed to establish a new connection": "the server does not answer",
    "duplicate column name": "an older MLflow or ptlab left its schema half-migrated (restore it from a backup or use "
    "a new file)",
    "can't locate revision": "a newer MLflow wrote its schema (upgrade MLflow or use a new file)",
    "no such table": "a table of its schema is missing (restore it from a backup or use a new file)",
}
"""Markers of a store that failed (lower-case text of the error or its causes) and what they mean."""
UNREACHABLE = "the server does not answer"


def store_fault(err: BaseException | None) -> str | None:
    """What failed when ``err`` (or an exception it was raised from) is a store fault, else ``None``."""
    seen = 0
    while err is not None and seen < 8:
        if isinstance(err, StoreError):
            return str(err)
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return STORE_FAULTS["no space left on device"]
        text = str(err).lower()
        for marker, meaning in STORE_FAULTS.items():
            if marker in text:
                return meaning
        err, seen = err.__cause__ or err.__context__, seen + 1
    return None


LEFT_NOTE = "runs this command left RUNNING are marked FAILED by the next ptlab command on this store"
"""The end of a store fault's line when which runs stay RUNNING is not known yet (a write failed mid-run)."""


def left_note(left: list[str]) -> str:
    """What a store fault's line says of the runs once the command tried to end them: none left, or which."""
    if not left:
        return "no run of this command was left RUNNING"
    return (
        f"run(s) {', '.join(left)} stay RUNNING (the store cannot be written now): the next ptlab command on this "
        "store, or python -m ptlab.tracking.stale, marks them FAILED"
    )


def store_error(err: BaseException, tracking_uri: str = "", left: list[str] | None = None) -> StoreError:
    """One line for a store fault: the store, what failed, the first line of the error, and who cleans up (``left``:
    the runs still RUNNING after the command tried to end them; ``None``: not known yet)."""
    note = LEFT_NOTE if left is None else left_note(left)
    if isinstance(err, StoreError):
        text = str(err)
        return err if left is None else StoreError(text.removesuffix(LEFT_NOTE).rstrip("; ") + f"; {note}")
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)[:160]
    where = f"logger.tracking_uri={tracking_uri!r}: " if tracking_uri else ""
    return StoreError(f"{where}the tracking store failed, {store_fault(err)} ({type(err).__name__}: {first}); {note}")


CLOSE_RETRY_ENV = "PTLAB_CLOSE_RETRY_S"
"""Seconds a command that could not end its runs keeps trying at exit (default ``CLOSE_RETRY_S``)."""
CLOSE_RETRY_S = 5.0
QUICK_HTTP = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}
"""MLflow's HTTP settings while the runs are ended at exit: one try of 2 s per call (a dead server is not waited for)."""


def close_retry_s() -> float:
    """``PTLAB_CLOSE_RETRY_S`` (seconds, >= 0), else ``CLOSE_RETRY_S``."""
    try:
        return max(0.0, float(os.environ.get(CLOSE_RETRY_ENV, CLOSE_RETRY_S)))
    except ValueError:
        return CLOSE_RETRY_S


@contextlib.contextmanager
def quick_http_requests() -> Iterator[None]:
    """``QUICK_HTTP`` in the environment inside the block (MLflow reads it per request), the previous values after."""
    previous = {name: os.environ.get(name) for name in QUICK_HTTP}
    os.environ.update(QUICK_HTTP)
    try:
        yield
    finally:
        for name, value in previous.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def free_sqlite_journal(tracking_uri: str) -> None:
    """Give back the disk space a SQLite store's write-ahead log holds (``PRAGMA wal_checkpoint(TRUNCATE)``: the
    committed pages move into the database, the log is cut to 0 bytes). After a write failed on a full disk, the
    log still holds the pages of that failed transaction; cutting it leaves room for the few pages that end the
    runs. Best effort: a store that is busy or cannot be opened is left as it is."""
    path = sqlite_path(tracking_uri)
    if path is None or not path.is_file():
        return
    try:
        connection = sqlite3.connect(path, timeout=2)
        try:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        finally:
            connection.close()
    except sqlite3.Error:
        pass


def with_retries(
    call: Callable[..., Any], attempts: int = 8, base_delay: float = 0.2, tracking_uri: str = ""
) -> Callable[..., Any]:
    """``call`` retried on ``is_locked_error`` up to ``attempts`` times, sleeping ~0.2, 0.4, 0.8 ... s;
    each attempt is a ``tracking_write``. A store fault (``store_fault``) is raised as one-line ``StoreError``."""

    def retrying(*args: Any, **kwargs: Any) -> Any:
        for attempt in range(attempts):
            try:
                with tracking_write():
                    return call(*args, **kwargs)
            except Exception as err:
                if store_fault(err) and not is_locked_error(err):
                    raise store_error(err, tracking_uri) from err
                if not is_locked_error(err) or attempt == attempts - 1:
                    raise
                delay = base_delay * 2**attempt * (1 + random.random())
                log.warning("ptlab: tracking store busy (%s); retrying in %.1f s", str(err).splitlines()[0], delay)
                time.sleep(delay)
        raise AssertionError("unreachable")

    return retrying


class RetryingClient:
    """An ``MlflowClient`` whose methods are retried on "database is locked"."""

    def __init__(self, client: Any, attempts: int = 8) -> None:
        self._client, self._attempts = client, attempts

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._client, name)
        uri = str(getattr(self._client, "tracking_uri", ""))
        return with_retries(value, self._attempts, tracking_uri=uri) if callable(value) else value


def sqlite_path(tracking_uri: str) -> Path | None:
    """The database file of an absolute ``sqlite:///`` URI; ``None`` for any other store."""
    if not tracking_uri.startswith(SQLITE_PREFIX):
        return None
    return Path(tracking_uri[len(SQLITE_PREFIX) :])


def prepare_sqlite_store(tracking_uri: str, wal: bool = True) -> str | None:
    """Create an SQLite tracking database's tables under a file lock (MLflow's own first-use set-up is
    not safe when two jobs start on a new file at once; a new file is a copy of the pre-migrated template,
    ``ptlab.tracking.store_template``) and, with ``wal``, switch it to WAL journaling (once; kept in the
    file). Returns the journal mode in effect, ``None`` for a non-SQLite store."""
    path = sqlite_path(tracking_uri)
    if path is None:
        return None
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock", timeout=300):
            new = not path.exists() or path.stat().st_size == 0
            from_template = new and new_store_from_template(path)
            if new and not from_template:
                migrate_aside(path)
            try:
                MlflowClient(tracking_uri).search_experiments(max_results=1)
            except MlflowException:
                if from_template:  # not at MLflow's head after all: drop the copy and the template (rebuilt next time)
                    discard_template()
                    path.unlink(missing_ok=True)
                raise
            connection = sqlite3.connect(path, timeout=60)
            try:
                mode = connection.execute("PRAGMA journal_mode").fetchone()[0]
                if wal and mode.lower() != "wal":
                    mode = connection.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            finally:
                connection.close()
    except Exception as err:
        if store_fault(err):
            raise store_error(err, tracking_uri) from err
        raise
    return str(mode).lower()


def migrate_aside(path: Path) -> None:
    """MLflow's migrations of a new store, run on a file beside ``path`` that then replaces it: a run stopped during
    the ~135 migrations (SQLite's schema changes are not one transaction) leaves no half-migrated store behind, which
    MLflow could never open again ("duplicate column name")."""
    from mlflow.tracking import MlflowClient

    partial = path.with_name(f"{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial")  # MLflow caches by URI
    try:
        MlflowClient(f"sqlite:///{partial}").search_experiments(max_results=1)
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


class _Signals:
    """The stop signals this process received inside ``signals_as_interrupt``."""

    received: list[str] = []


@contextlib.contextmanager
def signals_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM and SIGINT raise ``Terminated`` (held until a store write is done, see
    ``tracking_write``); the previous handlers come back after it (a reused worker of a parallel
    launcher keeps its own handling between jobs). Put the tracker inside this block, so its exit,
    which marks the runs, runs under these handlers too, and ``signal_exits_as_terminated`` inside the
    tracker.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _Signals.received = []
    _Writes.deferred = None

    def handle(signum: int, frame: FrameType | None) -> None:
        _Signals.received.append(signal.Signals(signum).name)
        if len(_Signals.received) > 1:  # the first one's Terminated is unwinding (and marking the runs): let it
            return
        if _Writes.depth > 0:  # inside a store write: raised when the write is done (tracking_write)
            _Writes.deferred = _Signals.received[-1]
            return
        raise Terminated(f"signal {_Signals.received[-1]}")

    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        with signal_exits_as_terminated():
            yield
    finally:
        _Writes.deferred = None  # a reused worker's next job starts clean
        stopped_worker = bool(_Signals.received) and in_sweep_worker()
        for signum, handler in previous.items():  # a stopped sweep worker: exit_quietly_on_stop's handler at once
            signal.signal(signum, exit_at_once if stopped_worker else handler)


@contextlib.contextmanager
def signal_exits_as_terminated() -> Iterator[None]:
    """Lightning turns a ``KeyboardInterrupt`` during ``fit`` into ``sys.exit(1)``; a ``SystemExit`` that
    follows a signal is raised here as ``Terminated`` again, so a tracker around this block marks its
    runs KILLED, naming the signal."""
    try:
        yield
    except SystemExit as err:
        if _Signals.received:
            raise Terminated(f"signal {_Signals.received[0]}") from err
        raise

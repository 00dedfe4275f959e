"""A heartbeat for runs whose process the store's other users cannot see (a tracking server or a database server).

``ptlab.tracking.stale`` ends a run whose process is gone by looking the process up, which only works on the
process's own host. A run on a shared server whose process died elsewhere, or that could not be ended because the
server was down when its process exited, would stay RUNNING for good. So every run ptlab opens on such a store is
created with the tag ``ptlab.heartbeat`` = ``<unix time>:<interval s>``, and a daemon thread of the process renews it
on one open run of each store every ``PTLAB_HEARTBEAT_S`` seconds (default 30; a failed beat is tried again after
at most 5 s). All runs of one process share its ``ptlab.process`` tag, so the newest beat of any of them speaks for
all: ``python -m ptlab.tracking.stale`` (by hand, or ``--watch`` beside the server, ``docker/compose.yaml``) ends
RUNNING runs whose process's newest beat is older than ``MISSED_BEATS`` intervals. SQLite stores are local files:
their runs are judged by the process tag alone, and nothing beats on them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from ptlab.tracking.faults import sqlite_path

log = logging.getLogger(__name__)

HEARTBEAT_TAG = "ptlab.heartbeat"
HEARTBEAT_ENV = "PTLAB_HEARTBEAT_S"
HEARTBEAT_S = 30.0
MISSED_BEATS = 4
"""A process whose newest beat is older than this many of its intervals is taken to be gone."""
RETRY_S = 5.0


def heartbeat_s() -> float:
    """``PTLAB_HEARTBEAT_S`` (seconds, > 0), else ``HEARTBEAT_S``."""
    try:
        value = float(os.environ.get(HEARTBEAT_ENV, HEARTBEAT_S))
    except ValueError:
        return HEARTBEAT_S
    return value if value > 0 else HEARTBEAT_S


def beats_on(tracking_uri: str) -> bool:
    """Whether runs on ``tracking_uri`` get a heartbeat: every store but a local SQLite file."""
    return sqlite_path(tracking_uri) is None


def beat(interval: float, now: float | None = None) -> str:
    """A heartbeat tag's value: the time and the interval of the next beat."""
    return f"{time.time() if now is None else now:.1f}:{interval:g}"


def beat_tags(tracking_uri: str) -> dict[str, str]:
    """The tags a new run on ``tracking_uri`` is created with: its first beat, or none where nothing beats."""
    return {HEARTBEAT_TAG: beat(heartbeat_s())} if beats_on(tracking_uri) else {}


def beat_time(value: str) -> tuple[float, float] | None:
    """The (time, interval) of a heartbeat tag's value; ``None`` when it is not one."""
    try:
        stamp, interval = (float(part) for part in value.split(":"))
    except ValueError:
        return None
    return (stamp, interval) if interval > 0 else None


def stopped(value: str, now: float) -> bool:
    """Whether the beat ``value`` is older than ``MISSED_BEATS`` of its intervals at ``now``."""
    parsed = beat_time(value)
    return parsed is not None and now - parsed[0] > MISSED_BEATS * parsed[1]


class _Beating:
    """This process's open runs by store, and the thread that beats on the first of each."""

    lock = threading.Lock()
    """Guards ``runs`` (held for moments only: a run's end never waits for a beat to a server that does not answer)."""
    calling = threading.Lock()
    """Held while a beat is written and around ``fork``: a child never inherits a client half-way through a call."""
    runs: dict[str, list[str]] = {}
    thread: threading.Thread | None = None
    wake = threading.Event()


def start_beating(tracking_uri: str, run_id: str) -> None:
    """Keep ``run_id`` (created with ``beat_tags``) among the runs the heartbeat thread speaks for."""
    with _Beating.lock:
        _Beating.runs.setdefault(tracking_uri, []).append(run_id)
        if _Beating.thread is None or not _Beating.thread.is_alive():
            _Beating.thread = threading.Thread(target=_beat_forever, name="ptlab-heartbeat", daemon=True)
            _Beating.thread.start()


def stop_beating(run_id: str) -> None:
    """``run_id`` ended: the next beat of its store goes to another open run (none left: no beat)."""
    with _Beating.lock:
        for runs in _Beating.runs.values():
            if run_id in runs:
                runs.remove(run_id)


def _beat_forever() -> None:
    from mlflow.tracking import MlflowClient

    clients: dict[str, Any] = {}
    wait = heartbeat_s()
    while not _Beating.wake.wait(wait):
        interval = wait = heartbeat_s()
        with _Beating.lock:
            targets = [(uri, runs[0]) for uri, runs in _Beating.runs.items() if runs]
        for uri, run_id in targets:
            try:
                with _Beating.calling:
                    clients.setdefault(uri, MlflowClient(uri)).set_tag(run_id, HEARTBEAT_TAG, beat(interval))
            except Exception as err:  # noqa: BLE001 - a store that does not answer now: tried again soon
                log.debug("ptlab: heartbeat on %s failed: %s", uri, err)
                wait = min(interval, RETRY_S)


def _before_fork() -> None:
    _Beating.calling.acquire()
    _Beating.lock.acquire()


def _after_fork_in_parent() -> None:
    _Beating.lock.release()
    _Beating.calling.release()


def _after_fork_in_child() -> None:
    """A forked child has none of its parent's runs and no thread."""
    _Beating.lock.release()
    _Beating.calling.release()
    _Beating.runs = {}
    _Beating.thread = None
    _Beating.wake = threading.Event()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)

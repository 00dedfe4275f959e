"""Runs left RUNNING by a process that is gone (SIGKILL, a crashed node) are marked FAILED.

Every run ptlab opens carries ``ptlab.process`` = ``host:pid:start ticks:boot id:pid namespace``: the process's
start time from ``/proc`` (so a reused pid is not mistaken for the original) and the inode of its PID namespace
(``/proc/self/ns/pid``: containers and ``unshare --pid`` have their own, and the same pid there is another
process). Any ptlab command that opens an experiment calls ``mark_vanished``: a RUNNING run whose process this
process can see, on this host, in its own PID namespace and since the same boot, and which no longer exists or is
another process now, becomes FAILED with ``ptlab.error=process vanished``. Runs of other hosts, other PID
namespaces (other containers sharing the hostname), or a process whose ``/proc`` shows another namespace's pids,
are left alone: their processes cannot be seen from here. Tags of older ptlab versions (four fields, no
namespace) are judged as before, by host, pid, start time and boot. ``python -m ptlab.tracking.stale`` does the
same on demand for every experiment of a store, and also ends runs whose heartbeat stopped (``ptlab.tracking.heartbeat``:
runs on a server, whose processes may live on other hosts); with ``--watch`` it does so every few seconds, beside a
tracking server.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any

from ptlab.tracking.heartbeat import HEARTBEAT_TAG, MISSED_BEATS, beat_time

PROCESS_TAG = "ptlab.process"
ERROR_TAG = "ptlab.error"
VANISHED = "process vanished"
STOPPED = "heartbeat stopped"


def _start_ticks(pid: int) -> str | None:
    """The start time of process ``pid`` in clock ticks after boot (``None`` when there is none)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def pid_namespace() -> str:
    """The inode of this process's PID namespace (``""`` where ``/proc`` does not tell)."""
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        return ""


def proc_shows_own_namespace() -> bool:
    """Whether ``/proc`` shows this process's PID namespace (false under ``unshare --pid`` without
    ``--mount-proc``: its pids are the parent namespace's, so none can be judged)."""
    try:
        return int(os.readlink("/proc/self")) == os.getpid()
    except (OSError, ValueError):
        return False


@cache
def process_tag() -> str:
    """This process as ``host:pid:start ticks:boot id:pid namespace``."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid) or ''}:{_boot_id()}:{pid_namespace()}"


def is_vanished(tag: str) -> bool:
    """Whether the process a ``ptlab.process`` tag names is known to be gone (same host and PID namespace only)."""
    parts = tag.split(":")
    if len(parts) not in (4, 5) or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    _, pid, ticks, boot = parts[:4]
    if boot and boot != _boot_id():  # the host rebooted since: every process of then is gone
        return True
    if len(parts) == 5 and (parts[4] != pid_namespace() or not parts[4] or not proc_shows_own_namespace()):
        return False
    current = _start_ticks(int(pid))
    return current is None or (bool(ticks) and current != ticks)


def running_runs(client: Any, experiment_ids: list[str]) -> list[Any]:
    """The RUNNING runs of ``experiment_ids``."""
    return client.search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=50000)


def vanished_runs(runs: Iterable[Any]) -> list[Any]:
    """The runs among ``runs`` whose process this host sees gone (``is_vanished``)."""
    return [run for run in runs if is_vanished(run.data.tags.get(PROCESS_TAG, ""))]


def stopped_runs(runs: Iterable[Any], now: float, since: float = 0.0) -> list[Any]:
    """The runs among ``runs`` (RUNNING) whose process's newest heartbeat, over all its runs (one ``ptlab.process``
    tag), is more than ``MISSED_BEATS`` of its intervals old at ``now``, counted from ``since`` at the earliest (a
    watcher that could not reach the store until ``since`` gives live processes that long to beat again). Runs
    without a heartbeat (SQLite stores, older ptlab versions) are never among them."""
    runs = list(runs)
    newest: dict[str, tuple[float, float]] = {}
    for run in runs:
        key = run.data.tags.get(PROCESS_TAG) or run.info.run_id
        parsed = beat_time(run.data.tags.get(HEARTBEAT_TAG, ""))
        if parsed is not None and (key not in newest or parsed[0] > newest[key][0]):
            newest[key] = parsed
    found = []
    for run in runs:
        parsed = newest.get(run.data.tags.get(PROCESS_TAG) or run.info.run_id)
        if parsed is not None and now - max(parsed[0], since) > MISSED_BEATS * parsed[1]:
            found.append(run)
    return found


def dead_runs(runs: Iterable[Any], now: float, since: float = 0.0) -> dict[str, str]:
    """Run id -> why, for the runs among ``runs`` (RUNNING) whose process vanished (this host) or whose heartbeat
    stopped (any host, ``stopped_runs``)."""
    runs = list(runs)
    dead = {run.info.run_id: VANISHED for run in vanished_runs(runs)}
    for run in stopped_runs(runs, now, since):
        dead.setdefault(run.info.run_id, STOPPED)
    return dead


def _mark_failed(client: Any, dead: dict[str, str]) -> None:
    for run_id, why in dead.items():
        client.set_tag(run_id, ERROR_TAG, why)
        client.set_terminated(run_id, "FAILED")


def mark_vanished(client: Any, experiment_ids: list[str]) -> int:
    """Mark the RUNNING runs of ``experiment_ids`` whose process vanished FAILED; returns how many. (A command judges
    processes it can see only; heartbeats are judged by ``mark_stale``.)"""
    if not experiment_ids:
        return 0
    dead = {run.info.run_id: VANISHED for run in vanished_runs(running_runs(client, experiment_ids))}
    _mark_failed(client, dead)
    return len(dead)


def mark_stale(client: Any, experiment_ids: list[str], since: float = 0.0) -> tuple[int, int]:
    """Mark RUNNING runs of ``experiment_ids`` FAILED whose process vanished (this host) or whose heartbeat stopped
    (any host); returns (vanished, stopped)."""
    if not experiment_ids:
        return 0, 0
    dead = dead_runs(running_runs(client, experiment_ids), time.time(), since)
    _mark_failed(client, dead)
    vanished = sum(why == VANISHED for why in dead.values())
    return vanished, len(dead) - vanished


def sweep_store(client: Any, since: float = 0.0) -> tuple[int, int]:
    """One pass over every experiment of the store: (vanished, stopped) runs marked FAILED."""
    return mark_stale(client, [e.experiment_id for e in client.search_experiments()], since)


def marked(counts: tuple[int, int], tracking_uri: str) -> str:
    """What a pass marked, in words."""
    return f"ptlab: marked {counts[0]} vanished run(s) and {counts[1]} run(s) whose heartbeat stopped FAILED in {tracking_uri}"


def main(argv: list[str] | None = None) -> int:
    """``python -m ptlab.tracking.stale [--tracking-uri URI] [--watch SECONDS]``: mark every RUNNING run of the store
    whose process vanished or whose heartbeat stopped FAILED; with ``--watch``, again every SECONDS until stopped."""
    from mlflow.tracking import MlflowClient

    from ptlab.tracking.base import resolve_tracking_uri

    parser = argparse.ArgumentParser(prog="python -m ptlab.tracking.stale", description=main.__doc__)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="default: %(default)s")
    parser.add_argument("--watch", type=float, default=0.0, metavar="SECONDS", help="repeat every SECONDS (> 0)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # no "View run" line per run it ends
    if not args.watch >= 0 or args.watch == float("inf"):
        print(f"ptlab: --watch={args.watch:g} is not allowed: must be > 0 (seconds), or 0 for one pass", file=sys.stderr)
        return 2
    client = MlflowClient(resolve_tracking_uri(args.tracking_uri))
    if not args.watch:
        print(marked(sweep_store(client), args.tracking_uri))
        return 0
    return watch(client, args.tracking_uri, args.watch)


def watch(client: Any, tracking_uri: str, every: float) -> int:
    """Pass over the store every ``every`` seconds until SIGINT/SIGTERM; a pass that cannot reach the store is one
    line, and after it the heartbeats are counted from the first pass that could (``stopped_runs``' ``since``)."""
    import signal

    signal.signal(signal.SIGTERM, signal.default_int_handler)
    since, reachable = 0.0, True
    try:
        while True:
            started = time.time()
            try:
                counts = sweep_store(client, since if reachable else started)
            except Exception as err:  # noqa: BLE001 - the store is down: said once, tried again
                if reachable:
                    print(f"ptlab: {tracking_uri} cannot be read ({str(err).splitlines()[0][:160]}); trying again", flush=True)
                reachable = False
            else:
                if not reachable:
                    since, reachable = started, True
                if any(counts):
                    print(marked(counts, tracking_uri), flush=True)
            time.sleep(every)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())

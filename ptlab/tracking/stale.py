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
same on demand for every experiment of a store.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from functools import cache
from pathlib import Path
from typing import Any

PROCESS_TAG = "ptlab.process"
ERROR_TAG = "ptlab.error"
VANISHED = "process vanished"


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


def mark_vanished(client: Any, experiment_ids: list[str]) -> int:
    """Mark the RUNNING runs of ``experiment_ids`` whose process vanished FAILED; returns how many."""
    if not experiment_ids:
        return 0
    runs = client.search_runs(experiment_ids, filter_string="attributes.status = 'RUNNING'", max_results=50000)
    marked = 0
    for run in runs:
        tag = run.data.tags.get(PROCESS_TAG)
        if tag and is_vanished(tag):
            client.set_tag(run.info.run_id, ERROR_TAG, VANISHED)
            client.set_terminated(run.info.run_id, "FAILED")
            marked += 1
    return marked


def main(argv: list[str] | None = None) -> int:
    """``python -m ptlab.tracking.stale [--tracking-uri URI]``: mark every vanished run of the store FAILED."""
    from mlflow.tracking import MlflowClient

    from ptlab.tracking.base import resolve_tracking_uri

    parser = argparse.ArgumentParser(prog="python -m ptlab.tracking.stale", description=main.__doc__)
    parser.add_argument("--tracking-uri", default="sqlite:///mlflow.db", help="default: %(default)s")
    args = parser.parse_args(argv)
    client = MlflowClient(resolve_tracking_uri(args.tracking_uri))
    ids = [e.experiment_id for e in client.search_experiments()]
    print(f"ptlab: marked {mark_vanished(client, ids)} vanished run(s) FAILED in {args.tracking_uri}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

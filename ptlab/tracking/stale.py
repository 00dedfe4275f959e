"""Runs left RUNNING by a process that is gone (SIGKILL, a crashed node) are marked FAILED.

Every run ptlab opens carries ``ptlab.process`` = ``host:pid:start ticks:boot id`` (the process's
start time from ``/proc``, so a reused pid is not mistaken for the original). Any ptlab command that
opens an experiment calls ``mark_vanished``: a RUNNING run of this host whose process no longer
exists, or is another process now, becomes FAILED with ``ptlab.error=process vanished``. Runs of other
hosts are left alone (their processes cannot be seen from here). ``python -m ptlab.tracking.stale``
does the same on demand for every experiment of a store.
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


@cache
def process_tag() -> str:
    """This process as ``host:pid:start ticks:boot id``."""
    pid = os.getpid()
    return f"{socket.gethostname()}:{pid}:{_start_ticks(pid) or ''}:{_boot_id()}"


def is_vanished(tag: str) -> bool:
    """Whether the process a ``ptlab.process`` tag names is known to be gone (same host only)."""
    parts = tag.split(":")
    if len(parts) != 4 or parts[0] != socket.gethostname() or not parts[1].isdigit():
        return False
    _, pid, ticks, boot = parts
    if boot and boot != _boot_id():
        return True
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

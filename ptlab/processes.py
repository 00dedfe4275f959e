"""A sweep's parent shuts its worker processes down when it is stopped (SIGTERM, Ctrl-C).

joblib's loky workers outlive a parent killed by a signal and go on running their cells. Under
``-m``, ``forward_stop_signals`` makes SIGTERM and SIGINT to the parent stop its workers first: each
worker gets the signal (a worker inside a pipeline marks its runs KILLED, ``ptlab.tracking.faults``),
again every second while it lives (an idle worker then exits), and SIGKILL after ``grace`` seconds;
then the parent stops with ``Terminated`` (exit 143 or 130). Linux ``/proc`` tells the process tree;
elsewhere nothing is forwarded.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

from ptlab.errors import Terminated

PR_SET_PDEATHSIG = 1
SWEEP_PID_ENV = "PTLAB_SWEEP_PID"
"""Set by the sweep's parent (``ptlab.cli``): its workers find their parent by it and die with it."""


def die_with_parent(parent: int) -> None:
    """Ask Linux to SIGKILL this process when its parent ends (``prctl(PR_SET_PDEATHSIG)``); exit at once if the
    parent already has. Elsewhere nothing happens."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:
        os._exit(1)


def bind_sweep_worker() -> None:
    """In a worker process of a sweep (a joblib/loky worker started by the sweep's parent), die with the parent: a
    SIGKILL of the sweep then leaves no worker running cells for nobody (and their resource trackers, left without
    users, clean up and exit)."""
    parent = os.environ.get(SWEEP_PID_ENV)
    if parent and int(parent) != os.getpid() and os.getppid() == int(parent):
        die_with_parent(int(parent))


def in_sweep_worker() -> bool:
    """Whether this process is a worker that a sweep's parent started (not the parent, not a single run)."""
    parent = os.environ.get(SWEEP_PID_ENV)
    return bool(parent) and int(parent) != os.getpid()


def exit_at_once(signum: int, frame: FrameType | None) -> None:
    """A stop-signal handler: exit with the shell's code for ``signum`` (143, 130) without unwinding."""
    os._exit(128 + signum)


def exit_quietly_on_stop() -> None:
    """In a sweep worker whose job a stop signal ended: a later SIGTERM/SIGINT (the parent repeats them until its
    workers are gone) exits at once, instead of raising ``KeyboardInterrupt`` wherever the worker is (inside a
    garbage-collection callback it prints an "Exception ignored" traceback). Outside a sweep worker nothing changes."""
    if in_sweep_worker():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, exit_at_once)


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children first), from ``/proc``."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, queue = [], [pid]
    while queue:
        for child in parents.get(queue.pop(0), []):
            found.append(child)
            queue.append(child)
    return found


def ignores(pid: int, signum: int) -> bool:
    """Whether process ``pid`` ignores ``signum`` (``SigIgn`` of ``/proc/<pid>/status``), as the resource
    trackers of multiprocessing and loky do: waiting for those to stop would only wait."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    mask = next((line.split()[1] for line in status.splitlines() if line.startswith("SigIgn:")), "0")
    return bool(int(mask, 16) >> (signum - 1) & 1)


def _signal(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signum)


def stop_descendants(signum: int, grace: float = 30.0, poll: float = 1.0) -> int:
    """Send ``signum`` to every descendant that does not ignore it until none is left (at most ``grace`` s), then
    SIGKILL; returns how many were killed. The resource trackers of multiprocessing and loky, which ignore it, are
    left to exit when the parent closes their pipe: killed, the parent's shutdown would start a new one and it would
    print a ``KeyError`` traceback for every semaphore it never saw registered."""
    me = os.getpid()
    deadline = time.monotonic() + grace
    while (alive := [p for p in descendants(me) if not ignores(p, signum)]) and time.monotonic() < deadline:
        _signal(alive, signum)
        time.sleep(poll)
        _reap()
    alive = [p for p in descendants(me) if not ignores(p, signum)]  # a resource tracker exits with its last user
    _signal(alive, signal.SIGKILL)
    _reap()
    return len(alive)


def _reap() -> None:
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


@contextlib.contextmanager
def forward_stop_signals(grace: float = 30.0) -> Iterator[None]:
    """Within the block, SIGTERM/SIGINT stop this process's workers (see the module docstring) and then
    raise ``Terminated`` here."""

    def handle(signum: int, frame: FrameType | None) -> None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the shutdown itself is not interrupted
        stop_descendants(signum, grace)
        raise Terminated(f"signal {signal.Signals(signum).name}")

    with stop_signal_handler(handle):
        yield


@contextlib.contextmanager
def stop_signal_handler(handle: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """``handle`` for SIGTERM and SIGINT within the block; the previous handlers after it."""
    previous = {signum: signal.signal(signum, handle) for signum in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

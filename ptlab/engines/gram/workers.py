"""The worker processes of a batched sweep: forked, single-threaded, and gone when the sweep is.

- A worker dies with its parent: Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), set before it
  takes any work, so a SIGKILL of the sweep leaves no worker computing cells for nobody.
- A worker takes SIGTERM's default action (it ends, silently) and ignores SIGINT (a Ctrl-C reaches the whole process
  group; the parent decides): it neither inherits the parent's handlers nor prints tracebacks.
- In the parent, SIGTERM and SIGINT raise ``Terminated`` at once while the pool runs, so that the pool is
  terminated (its workers get SIGTERM) and joined before the signal goes on up, and the sweep ends with 143 / 130.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Iterator
from multiprocessing.pool import Pool
from types import FrameType

import torch

from ptlab.errors import Terminated
from ptlab.processes import die_with_parent, stop_signal_handler


def _init_worker(parent: int) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    die_with_parent(parent)
    torch.set_num_threads(1)


@contextlib.contextmanager
def stop_signals_raise() -> Iterator[None]:
    """Within the block (main thread only), SIGTERM and SIGINT raise ``Terminated`` here at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(signum: int, frame: FrameType | None) -> None:
        raise Terminated(f"signal {signal.Signals(signum).name}")

    with stop_signal_handler(handle):
        yield


@contextlib.contextmanager
def worker_pool(processes: int) -> Iterator[Pool]:
    """A fork pool of ``processes`` single-threaded workers (module docstring), terminated and joined on the way
    out, whatever the way."""
    pool = multiprocessing.get_context("fork").Pool(processes, initializer=_init_worker, initargs=(os.getpid(),))
    try:
        with stop_signals_raise():
            yield pool
            pool.close()
    finally:
        pool.terminate()
        pool.join()

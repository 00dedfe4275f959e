"""The worker processes of a batched sweep: forked, single-threaded, and gone when the sweep is; or submitit jobs.

- A worker dies with its parent: Linux's parent-death signal (``prctl(PR_SET_PDEATHSIG, SIGKILL)``), set before it
  takes any work, so a SIGKILL of the sweep leaves no worker computing cells for nobody.
- A worker takes SIGTERM's default action (it ends, silently) and ignores SIGINT (a Ctrl-C reaches the whole process
  group; the parent decides): it neither inherits the parent's handlers nor prints tracebacks.
- In the parent, SIGTERM and SIGINT raise ``Terminated`` at once while the pool runs, so that the pool is
  terminated (its workers get SIGTERM) and joined before the signal goes on up, and the sweep ends with 143 / 130.

``submitit_map`` runs the chunks as submitit jobs instead (``hydra.launcher.executor=submitit_local`` or
``submitit_slurm``): one job a chunk, submitted at once (a job array on SLURM), results read back in order; training
only, the parent tracks. SIGTERM or SIGINT in the parent, or any error while it waits, cancels every job not yet done
(``Job.cancel``: scancel on SLURM, SIGINT to a local job's process).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from multiprocessing.pool import Pool
from pathlib import Path
from types import FrameType
from typing import Any

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


SUBMITIT_EXECUTORS = {"submitit_local": "local", "submitit_slurm": "slurm"}
"""``hydra.launcher.executor`` -> submitit's cluster name (``pool`` is ``worker_pool``)."""


def _run_in_job(function: Callable[[Any], Any], item: Any, threads: int) -> Any:
    """``function(item)`` in a submitit job, on ``threads`` torch threads (the job's CPUs)."""
    torch.set_num_threads(threads)
    return function(item)


def submitit_map(
    executor: str, folder: str | Path, options: Mapping[str, Any]
) -> Callable[[Callable[[Any], Any], Sequence[Any]], Iterator[Any]]:
    """A ``ChunkMap`` (``ptlab.engines.gram.batching``) that runs each item as a submitit job of ``executor``
    (``SUBMITIT_EXECUTORS``) with its logs and pickles under ``folder`` and ``options`` as
    ``submitit.AutoExecutor.update_parameters`` takes them (``timeout_min``, ``cpus_per_task``, ``gpus_per_node``,
    ``mem_gb``, ``slurm_partition``, ...; ``None`` values are left unset)."""

    def run(function: Callable[[Any], Any], items: Sequence[Any]) -> Iterator[Any]:
        import submitit

        auto = submitit.AutoExecutor(folder=str(folder), cluster=SUBMITIT_EXECUTORS[executor])
        parameters = {key: value for key, value in options.items() if value is not None}
        auto.update_parameters(**parameters)
        threads = int(parameters.get("cpus_per_task", 1))
        jobs: list[Any] = []
        try:
            with stop_signals_raise():
                with auto.batch():
                    for item in items:
                        jobs.append(auto.submit(_run_in_job, function, item, threads))
                for job in jobs:
                    yield job.result()
        finally:
            for job in jobs:
                if not job.done():
                    job.cancel(check=False)

    return run

"""The one driver: a single run, a batched sweep's run per cell and a grid's cells all go through ``drive``.

The layout builds the jobs (``PipelineJob``: a spec or a gram cell, and the recipe of a job trained stage by stage)
and a ``Recorder`` (how its results are tracked: live on the run's own tracker, as a run per cell written a chunk at
a time, or as rows of one grid run). ``drive`` does the rest, the same for all three: it skips what the recorder's
store already holds (resume), opens each job's record (its params and the theory's prediction), has the engine
train the jobs (``Engine.run``: stage by stage or batched), hands each result to the recorder as it comes back, and
decides the outcome: a diverged pipeline is tracked FAILED by its recorder, the others are kept, and the command ends
with the first error's one line and a non-zero exit (``raise_failures``); a stopped drive ends the runs it opened.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from ptlab.engines.base import Engine, PipelineJob, PipelineResult
from ptlab.errors import DivergenceError


class Recorder(Protocol):
    """How a layout tracks its jobs' results (``ptlab.pipeline.run.LiveRecorder``, ``ptlab.pipeline.batched``'s
    ``RunsRecorder`` and ``GridRecorder``)."""

    def finished(self, index: int) -> bool:
        """Whether job ``index`` is already finished in the store (resume): the driver does not train it."""
        ...

    def open(self, index: int) -> Any:
        """Open job ``index``'s record (params, config, the theory's prediction) before it trains; returns the
        tracker a recipe tracks into as it trains (``None``: the job is tracked when its result comes back)."""
        ...

    def record(self, index: int, result: PipelineResult) -> None:
        """Track job ``index``'s result and write its summary; a result with an ``error`` is tracked FAILED (a live
        recorder raises the error, so that the run's own tracker closes its runs FAILED with it)."""
        ...

    def flush(self) -> None:
        """Write what ``record`` kept since the last flush (called after each batch the engine returns)."""
        ...

    def abandon(self, status: str) -> None:
        """End the records opened and not yet written, with ``status`` (KILLED after a signal, else FAILED)."""
        ...

    def close(self) -> None:
        """Write what the layout writes once every job is in (the grid's table and run), failed ones included."""
        ...


def drive(jobs: Sequence[PipelineJob], engine: Engine, recorder: Recorder, **options: Any) -> list[int]:
    """Train and record ``jobs`` (module docstring); ``options`` go to ``engine.run``. Returns the indices trained now
    (the others were finished); raises ``raise_failures``' error when a pipeline diverged."""
    todo = [index for index in range(len(jobs)) if not recorder.finished(index)]
    errors: list[DivergenceError] = []
    try:
        opened = []
        for index in todo:
            tracker = recorder.open(index)
            job = jobs[index]
            opened.append(PipelineJob(job.spec, tracker if job.recipe is not None else None, job.recipe, job.cell))
        for batch in engine.run(opened, **options):
            for position, result in batch:
                if result.error is not None:
                    errors.append(result.error)
                recorder.record(todo[position], result)
            recorder.flush()
    except BaseException as err:
        recorder.abandon("KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
        raise
    recorder.close()
    raise_failures(errors, len(jobs))
    return todo


def raise_failures(errors: Sequence[BaseException], total: int) -> None:
    """End a command whose pipelines failed as a single run ends: the first error's one line, exit 1 (the other
    pipelines are tracked and kept; their runs, and the failed ones, are in MLflow)."""
    if not errors:
        return
    more = f" ({len(errors)} of {total} cells failed)" if len(errors) > 1 else ""
    raise SystemExit(f"ptlab: {errors[0]}{more}")

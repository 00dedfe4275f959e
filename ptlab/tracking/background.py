"""Tracking overlapped with training: an ``MLflowTracker`` in a helper process, fed in order.

Loading MLflow (~1-1.5 s), preparing a new SQLite store (~0.5 s) and opening the runs cost about as long as the
default pipeline trains, and a thread cannot overlap them: both are Python holding the GIL. So a single run
(``runs_in_background``) starts a helper process (``warm_up``, before torch loads) that imports MLflow while the
main process imports torch; ``BackgroundTracker`` sends it every ``Tracker`` call without waiting, in order, and
the helper replays them on a real ``MLflowTracker`` (the same writes, so the same params, metrics, tags,
artifacts and statuses). The main process waits only for what it must read (the run ids for ``summary.json``),
for ``log_artifact`` (its file may be temporary) and at the end, where it hands the helper its block's exception
so that the runs end FINISHED, FAILED or KILLED as ``MLflowTracker.__exit__`` decides.

A failure in the helper (a store that cannot be opened, a server that is down) closes its runs there (as
``MLflowTracker.__exit__`` does), skips the calls after it and is raised in the main process at its next wait,
as the same exception (the one-line ``StoreError`` or ``ConfigError``). The helper runs in its own session (a
Ctrl-C or SIGTERM reaches the main process, which tells it how the runs end) and ends when the main process's
pipe closes; if that process died without closing its runs, the helper marks them FAILED.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

from ptlab.errors import StoreError
from ptlab.tracking.base import Curves, as_json, resolve_tracking_uri
from ptlab.tracking.faults import LEFT_NOTE, left_note, quick_http_requests, store_fault, tracking_write

VANISHED_ERROR = "the ptlab process ended without closing its runs"
"""``ptlab.error`` of runs whose main process died (SIGKILL) before ``BackgroundTracker.__exit__``."""


def now_ms() -> int:
    """The wall time in ms since the epoch (MLflow's run times), taken where a call is made."""
    return time.time_ns() // 1_000_000


def runs_in_background(kind: str, task: str, multirun: bool, skip_finished: str) -> bool:
    """Whether a pipeline tracks through a helper process: MLflow tracking of one synthetic run (not a multirun's
    job: a reused worker loads MLflow once for all its jobs; not ``resume.skip_finished=always``, which reads the
    store before training; not an image task, whose Lightning logger writes from this process), and only while this
    process has not loaded MLflow yet (loading it is the cost the helper takes off the run's critical path). The
    caller checks that this is the rank that tracks (DDP rank 0)."""
    return (
        kind == "mlflow"
        and task == "synthetic"
        and not multirun
        and skip_finished != "always"
        and (_Warm.helper is not None or "mlflow" not in sys.modules)
    )


class _Helper:
    """The helper process and the two pipes to it (requests in, replies out), as pickles."""

    def __init__(self) -> None:
        request_read, request_write = os.pipe()
        reply_read, reply_write = os.pipe()
        root = str(Path(__file__).resolve().parents[2])
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "ptlab.tracking.background", str(request_read), str(reply_write)],
                pass_fds=(request_read, reply_write),
                start_new_session=True,
                stdin=subprocess.DEVNULL,
                env={**os.environ, "PYTHONPATH": path},
            )
        finally:
            os.close(request_read)
            os.close(reply_write)
        self.requests: BinaryIO = os.fdopen(request_write, "wb")
        self.replies: BinaryIO = os.fdopen(reply_read, "rb")

    def send(self, *message: Any) -> None:
        pickle.dump(message, self.requests, protocol=pickle.HIGHEST_PROTOCOL)
        self.requests.flush()

    def receive(self) -> tuple[Any, ...]:
        return pickle.load(self.replies)

    def close(self) -> None:
        """Close the pipes (the helper ends) and wait for it."""
        for pipe in (self.requests, self.replies):
            try:
                pipe.close()
            except OSError:
                pass
        self.process.wait()


class _Warm:
    """A helper started ahead of its tracker (``warm_up``), taken by the next ``BackgroundTracker``."""

    helper: _Helper | None = None


def warm_up(kind: str, task: str, multirun: bool, skip_finished: str, tracking_uri: str = "", wal: bool = True) -> None:
    """Start the helper now, if the run will track through one, so that MLflow loads while torch does; with
    ``tracking_uri``, it prepares that store next (``prepare_sqlite_store``: call this only after the preflight
    has accepted the config, as the CLI does, so that bad input still writes nothing)."""
    if _Warm.helper is None and runs_in_background(kind, task, multirun, skip_finished):
        _Warm.helper = _Helper()
        if tracking_uri:
            _Warm.helper.send("prepare", resolve_tracking_uri(tracking_uri), wal)


def discard_warm() -> None:
    """End a helper that no tracker took (the run stopped before tracking: bad input, an error); it wrote nothing."""
    helper, _Warm.helper = _Warm.helper, None
    if helper is not None:
        helper.close()


def portable(err: BaseException) -> BaseException:
    """``err`` if it survives pickling (to cross the pipe), else a ``RuntimeError`` with its type and text."""
    try:
        pickle.loads(pickle.dumps(err))
    except Exception:  # noqa: BLE001 - any exception class that does not pickle
        return RuntimeError(f"{type(err).__name__}: {err}")
    return err


class _Children(Mapping[str, str]):
    """``Tracker.children`` of a ``BackgroundTracker``: which stages were started is known at once; a run's id
    is asked of the helper only when it is read."""

    def __init__(self, tracker: BackgroundTracker) -> None:
        self._tracker = tracker
        self._names: list[str] = []

    def __contains__(self, stage: object) -> bool:
        return stage in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)

    def __getitem__(self, stage: str) -> str:
        if stage not in self._names:
            raise KeyError(stage)
        return self._tracker.state()["children"][stage]


class BackgroundTracker:
    """``Tracker`` whose ``MLflowTracker`` (same arguments) runs in a helper process; calls return at once."""

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        run_name: str,
        artifact_location: str | None = None,
        tags: Mapping[str, str] | None = None,
        description: str = "",
        wal: bool = True,
    ) -> None:
        """``wal``: prepare a SQLite store as ``prepare_sqlite_store(uri, wal=wal)`` does, in the helper."""
        self.tracking_uri = resolve_tracking_uri(tracking_uri)
        self._arguments = {
            "tracking_uri": self.tracking_uri,
            "experiment_name": experiment_name,
            "run_name": run_name,
            "artifact_location": artifact_location,
            "tags": dict(tags or {}),
            "description": description,
        }
        self._wal = wal
        self.children = _Children(self)
        self._helper: _Helper | None = None
        self._failure: BaseException | None = None
        self._lost_pid: int | None = None
        """The pid of a helper that ended unexpectedly: its runs are ended by this process at exit (``_end_lost``)."""

    @property
    def experiment_id(self) -> str:
        return self.state()["experiment_id"]

    @property
    def parent_run_id(self) -> str:
        return self.state()["parent_run_id"]

    def __enter__(self) -> BackgroundTracker:
        helper, _Warm.helper = _Warm.helper, None
        self._helper = helper or _Helper()
        with tracking_write(raise_deferred=None):  # a signal is held until the message is whole (as in MLflowTracker)
            self._send(self._helper, "open", self._arguments, list(sys.argv), self._wal, now_ms())
        return self

    def _call(self, name: str, *args: Any) -> None:
        """Send one call (a signal is raised after the message is whole, never half-way through it)."""
        if self._helper is None:
            raise RuntimeError("BackgroundTracker used outside its with-block")
        with tracking_write():
            self._send(self._helper, "call", name, args, now_ms())

    def state(self) -> dict[str, Any]:
        """Wait until the helper has replayed every call sent so far; its run ids, or its failure raised here."""
        if self._failure is not None:
            raise self._failure
        if self._helper is None:
            raise RuntimeError("BackgroundTracker used outside its with-block")
        with tracking_write():  # a signal is raised after the reply is read, never half-way through it
            self._send(self._helper, "state")
            reply = self._receive(self._helper)
        if reply[0] == "failed":
            self._failure = reply[1]
            raise reply[1]
        return reply[1]

    def _send(self, helper: _Helper, *message: Any) -> None:
        try:
            helper.send(*message)
        except OSError as err:  # a broken pipe: the helper is gone
            raise self._lost(helper) from err

    def _receive(self, helper: _Helper) -> tuple[Any, ...]:
        try:
            return helper.receive()
        except (EOFError, OSError, pickle.UnpicklingError) as err:
            raise self._lost(helper) from err

    def _lost(self, helper: _Helper) -> StoreError:
        """The helper's unexpected end (killed, crashed) as a one-line ``StoreError``, raised from then on."""
        try:
            code = helper.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            code = None
        self._lost_pid = helper.process.pid
        self._failure = StoreError(
            f"logger.tracking_uri={self.tracking_uri!r}: the tracking process ended unexpectedly (exit code {code}); " + LEFT_NOTE
        )
        return self._failure

    def _end_lost(self, exc: BaseException | None) -> None:
        """After the helper ended unexpectedly: end its RUNNING runs from this process (FAILED, ``ptlab.error=process
        vanished``, as the next command would: ``mark_vanished``), then raise the failure naming the runs still
        RUNNING. MLflow loads here only in this case; an HTTP store gets one 2 s try per call."""
        from mlflow.tracking import MlflowClient

        from ptlab.tracking.stale import PROCESS_TAG, mark_vanished, process_tag

        failure = self._failure
        host = process_tag().split(":", 1)[0]
        left: list[str] | None = None
        try:
            with quick_http_requests():
                client = MlflowClient(self.tracking_uri)
                experiment = client.get_experiment_by_name(self._arguments["experiment_name"])
                if experiment is not None:
                    mark_vanished(client, [experiment.experiment_id])
                    mine = f"tags.`{PROCESS_TAG}` LIKE '{host}:{self._lost_pid}:%' and attributes.status = 'RUNNING'"
                    left = [run.info.run_id for run in client.search_runs([experiment.experiment_id], filter_string=mine)]
                else:
                    left = []
        except Exception:  # noqa: BLE001 - the store cannot be read either: the line says the next command ends them
            left = None
        if left is not None and failure is not None:
            self._failure = StoreError(str(failure).removesuffix(LEFT_NOTE).rstrip("; ") + "; " + left_note(left))
            raise self._failure from exc

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        """Hand the helper the block's exception, so that it closes the runs as ``MLflowTracker.__exit__`` does, and
        raise what that raised (a ``StoreError``), or the helper's own earlier failure."""
        helper, self._helper = self._helper, None
        if helper is None:
            return
        try:
            if self._failure is not None:  # raised in the block already; the helper closed its runs then
                return
            with tracking_write(raise_deferred=exc_type is None):
                self._send(helper, "exit", None if exc is None else _exception_message(exc), now_ms())
                reply = self._receive(helper)
        finally:
            helper.close()
            if self._lost_pid is not None:  # the helper ended unexpectedly: its runs are ended from here
                with tracking_write(raise_deferred=False):
                    self._end_lost(exc)
        if reply[0] == "failed":  # the helper failed earlier, unseen: that error is what stopped tracking
            raise reply[1] from exc
        if reply[0] == "raised":
            raise reply[1] from exc

    def start_stage(self, stage: str) -> None:
        if stage not in self.children._names:
            self.children._names.append(stage)
        self._call("start_stage", stage)

    def end_stage(self, stage: str, status: str = "FINISHED") -> None:
        self._call("end_stage", stage, status)

    def stage_logger(self, stage: str) -> Any:
        """A Lightning logger on the child run of ``stage`` (the run started first; this process loads MLflow)."""
        from ptlab.tracking.lightning import BufferedMLFlowLogger

        if stage not in self.children:
            self.start_stage(stage)
        return BufferedMLFlowLogger(
            experiment_name=self._arguments["experiment_name"], tracking_uri=self.tracking_uri, run_id=self.children[stage]
        )

    def log_params(self, params: Mapping[str, Any], stage: str | None = None) -> None:
        """Values as the strings ``MLflowTracker`` stores (plain data crosses the pipe)."""
        self._call("log_params", {key: str(value) for key, value in params.items()}, stage)

    def log_metrics(self, metrics: Mapping[str, float], stage: str | None = None, step: int = 0) -> None:
        self._call("log_metrics", {key: float(value) for key, value in metrics.items()}, stage, int(step))

    def log_curves(self, curves: Curves, stage: str | None = None) -> None:
        self._call(
            "log_curves", {key: [(int(step), float(value)) for step, value in points] for key, points in curves.items()}, stage
        )

    def set_tags(self, tags: Mapping[str, Any], stage: str | None = None) -> None:
        self._call("set_tags", {key: str(value) for key, value in tags.items()}, stage)

    def log_dict(self, data: Any, artifact_file: str, stage: str | None = None) -> None:
        """As ``MLflowTracker.log_dict``: the JSON text (made here) as a text artifact."""
        self._call("log_text", as_json(data), artifact_file, stage)

    def log_text(self, text: str, artifact_file: str, stage: str | None = None) -> None:
        self._call("log_text", text, artifact_file, stage)

    def log_artifact(self, path: str | Path, artifact_path: str | None = None, stage: str | None = None) -> None:
        """Stored before this returns: the file may be a temporary one."""
        self._call("log_artifact", str(path), artifact_path, stage)
        self.state()


def _exception_message(exc: BaseException) -> tuple[Any, ...]:
    """The block's exception for the helper: itself when it pickles, else its class name and text; with what
    ``store_fault`` finds in it here (pickling drops the ``__cause__`` chain that it reads)."""
    fault = store_fault(exc)
    try:
        copy = pickle.loads(pickle.dumps(exc))
    except Exception:  # noqa: BLE001 - an exception class that does not pickle: its name and text stand in
        return ("standin", type(exc).__name__, isinstance(exc, KeyboardInterrupt), str(exc), fault)
    return ("exception", copy, fault)


def _rebuilt(message: tuple[Any, ...]) -> BaseException:
    """The block's exception in the helper, as ``MLflowTracker.__exit__`` reads it (class name, text, fault)."""
    if message[0] == "exception":
        exc, fault = message[1], message[2]
    else:
        _, name, interrupt, text, fault = message
        exc = type(name, (KeyboardInterrupt if interrupt else Exception,), {})(text)
    if fault is not None and store_fault(exc) is None:
        exc.__cause__ = StoreError(fault)
    return exc


def serve(requests: BinaryIO, replies: BinaryIO) -> None:
    """The helper's loop: replay each request in order on an ``MLflowTracker``; after a failure, close the runs
    (``MLflowTracker.__exit__``), skip the calls and report it at the next ``state`` or ``exit``."""
    from ptlab.tracking import mlflow as tracking  # the import this process exists to take off the critical path
    from ptlab.tracking.faults import prepare_sqlite_store

    tracker: Any = None
    failure: BaseException | None = None
    prepared: tuple[str, bool] | None = None

    def reply(*message: Any) -> None:
        pickle.dump(message, replies, protocol=pickle.HIGHEST_PROTOCOL)
        replies.flush()

    def fail(err: BaseException) -> BaseException:
        """Close the open runs as ``MLflowTracker.__exit__`` does for ``err``; what it raised, else ``err``."""
        nonlocal tracker
        opened, tracker = tracker, None
        if opened is not None:
            try:
                opened.__exit__(type(err), err, err.__traceback__)
            except BaseException as raised:  # noqa: BLE001 - the one-line error to report instead
                return portable(raised)
        return portable(err)

    while True:
        try:
            message = pickle.load(requests)
        except (EOFError, OSError, pickle.UnpicklingError):
            if tracker is not None:  # the main process died (SIGKILL) before closing its runs
                fail(RuntimeError(VANISHED_ERROR))
            return
        kind = message[0]
        if kind == "prepare":
            try:
                prepare_sqlite_store(message[1], wal=message[2])
                prepared = (message[1], message[2])
            except Exception as err:  # noqa: BLE001 - reported at the next state or exit (a StoreError line)
                failure = portable(err)
        elif kind == "open" and failure is None:
            _, arguments, argv, wal, at = message
            sys.argv = argv  # MLflow's run context (source name, git commit) reads the main process's argv
            try:
                if prepared != (arguments["tracking_uri"], wal):
                    prepare_sqlite_store(arguments["tracking_uri"], wal=wal)
                opened = tracking.MLflowTracker(**arguments)
                opened.clock_ms = at  # runs start and end when the run's own process made the call
                tracker = opened.__enter__()
            except Exception as err:  # noqa: BLE001 - reported at the next state or exit; as in MLflowTracker, a
                failure = portable(err)  # failed __enter__ leaves nothing open (and its store faults are StoreErrors)
        elif kind == "call" and failure is None:
            _, name, args, at = message
            try:
                tracker.clock_ms = at
                getattr(tracker, name)(*args)
            except Exception as err:  # noqa: BLE001 - reported at the next state or exit
                failure = fail(err)
        elif kind == "state":
            if failure is not None:
                reply("failed", failure)
            else:
                reply(
                    "state",
                    {
                        "experiment_id": tracker.experiment_id,
                        "parent_run_id": tracker.parent_run_id,
                        "children": dict(tracker.children),
                    },
                )
        elif kind == "exit":
            if failure is not None:
                reply("failed", failure)
                return
            exc = None if message[1] is None else _rebuilt(message[1])
            opened, tracker = tracker, None
            opened.clock_ms = message[2]
            try:
                opened.__exit__(None if exc is None else type(exc), exc, None)
            except BaseException as raised:  # noqa: BLE001 - the one-line error of a store fault
                reply("raised", portable(raised))
            else:
                reply("done")
            return


def main(argv: list[str]) -> None:
    """``python -m ptlab.tracking.background <request fd> <reply fd>`` (started by ``_Helper``)."""
    import logging
    import signal

    for signum in (signal.SIGINT, signal.SIGTERM):  # the main process decides how the runs end
        signal.signal(signum, signal.SIG_IGN)
    # Warnings (a busy store retried, a failed close) on stderr in the format of the run's own console log.
    logging.basicConfig(format="[%(asctime)s][%(name)s][%(levelname)s] - %(message)s", level=logging.WARNING)
    with os.fdopen(int(argv[0]), "rb") as requests, os.fdopen(int(argv[1]), "wb") as replies:
        try:
            serve(requests, replies)
        except BrokenPipeError:  # the main process is gone
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # every write is committed and reported: skip tearing down MLflow's modules (~0.7 s)


if __name__ == "__main__":
    main(sys.argv[1:])


__all__ = ["BackgroundTracker", "discard_warm", "runs_in_background", "warm_up"]

"""Tracking through a helper process (``ptlab.tracking.background``): the same store content as ``MLflowTracker``,
the same statuses and one-line errors on failure, and a default run whose own process never loads MLflow."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from ptlab.errors import StoreError, Terminated
from ptlab.tracking.background import VANISHED_ERROR, BackgroundTracker, runs_in_background
from ptlab.tracking.faults import prepare_sqlite_store, signals_as_interrupt
from ptlab.tracking.mlflow import MLflowTracker
from tests.conftest import REPO, SMALL

VOLATILE_TAGS = ("ptlab.process",)
"""Tags that name the process that wrote the run (the helper's, in the background)."""


def store_content(uri: str) -> list[dict[str, Any]]:
    """Every run of a store, comparable across stores: run ids replaced by run names, timestamps left out."""
    client = MlflowClient(uri)
    content = []
    for experiment in client.search_experiments():
        runs = client.search_runs([experiment.experiment_id], order_by=["attributes.run_name"])
        names = {run.info.run_id: run.info.run_name for run in runs}
        for run in runs:
            tags = {key: names.get(value, value) for key, value in run.data.tags.items() if key not in VOLATILE_TAGS}
            curves = {
                key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics
            }
            artifacts = {}
            for item in client.list_artifacts(run.info.run_id):
                text = Path(client.download_artifacts(run.info.run_id, item.path)).read_text()
                artifacts[item.path] = re.sub(r"[0-9a-f]{32}", "<run id>", text)
            content.append(
                {
                    "experiment": experiment.name,
                    "experiment_tags": experiment.tags,
                    "name": run.info.run_name,
                    "status": run.info.status,
                    "params": run.data.params,
                    "tags": tags,
                    "metrics": curves,
                    "artifacts": artifacts,
                }
            )
    return content


def pipeline_calls(tracker: Any, picture: Path) -> dict[str, Any]:
    """A pipeline's tracker calls (every method of the protocol), in a pipeline's order."""
    tracker.log_params({"seed": 0, "train.lr": 0.01, "long": "x" * 7000})
    tracker.log_text("seed: 0\n", "config.yaml")
    tracker.set_tags({"ptlab.cache": "miss"})
    for stage, steps in (("upstream", 30), ("transfer", 20)):
        tracker.start_stage(stage)
        assert stage in tracker.children
        tracker.log_curves(
            {
                "train/loss": [(s, 1.0 / (s + 1)) for s in range(steps)],
                "test/acc": [(s, 0.5 + s / 100) for s in range(0, steps, 10)],
            },
            stage=stage,
        )
        tracker.log_metrics({"final/test_acc": 0.934, "final/train_loss": 0.1618588}, stage=stage, step=steps)
        tracker.log_dict([{"copied": 20, "total": 40}], "transfer_plan.json", stage=stage)
        tracker.end_stage(stage)
    tracker.log_artifact(picture)
    tracker.log_metrics({"transfer_test_acc": 0.934})
    return {
        "parent": tracker.parent_run_id,
        "experiment": tracker.experiment_id,
        "upstream": tracker.children.get("upstream"),
        "missing": tracker.children.get("scratch", ""),
    }


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "decomposition.png"
    path.write_bytes(b"not really a png")
    return path


def two_stores(tmp_path: Path, body: Callable[[Any], None]) -> tuple[str, str]:
    """``body(tracker)`` run on an ``MLflowTracker`` and on a ``BackgroundTracker``, each on a new store."""
    uris = []
    for kind in ("inline", "background"):
        uri = f"sqlite:///{tmp_path / kind / 'mlflow.db'}"
        if kind == "inline":
            prepare_sqlite_store(uri)
            tracker: Any = MLflowTracker(uri, "exp", "cell", tags={"ptlab.config_hash": "abc"}, description="preset")
        else:
            tracker = BackgroundTracker(uri, "exp", "cell", tags={"ptlab.config_hash": "abc"}, description="preset")
        body(tracker)
        uris.append(uri)
    return uris[0], uris[1]


def test_the_helper_stores_exactly_what_mlflow_tracker_stores(tmp_path: Path, picture: Path) -> None:
    """Every call of the protocol, through both trackers: equal runs (names, statuses, params, tags, every metric
    point, artifacts), and the run ids the pipeline reads are the helper's real ones."""
    seen: dict[str, dict[str, Any]] = {}

    def body(tracker: Any) -> None:
        with tracker:
            seen[type(tracker).__name__] = pipeline_calls(tracker, picture)

    inline, background = two_stores(tmp_path, body)
    assert store_content(background) == store_content(inline)
    ids = seen["BackgroundTracker"]
    client = MlflowClient(background)
    parent = client.get_run(ids["parent"])
    assert parent.info.experiment_id == ids["experiment"] and parent.info.status == "FINISHED"
    assert client.get_run(ids["upstream"]).data.tags["mlflow.parentRunId"] == ids["parent"]
    assert ids["missing"] == ""
    assert [r.info.status for r in client.search_runs([ids["experiment"]])] == ["FINISHED"] * 3


@pytest.mark.parametrize("error", [RuntimeError("diverged at step 3"), Terminated("signal SIGTERM"), KeyboardInterrupt()])
def test_a_failed_block_ends_the_runs_as_mlflow_tracker_does(tmp_path: Path, picture: Path, error: BaseException) -> None:
    """An exception in the block: the open stage and the parent end FAILED (KILLED for an interrupt), with the same
    ``ptlab.error`` tag, and the exception itself propagates."""

    def body(tracker: Any) -> None:
        with pytest.raises(type(error)), tracker:
            tracker.log_params({"seed": 0})
            tracker.start_stage("upstream")
            raise error

    inline, background = two_stores(tmp_path, body)
    content = store_content(background)
    assert content == store_content(inline)
    status = "KILLED" if isinstance(error, KeyboardInterrupt) else "FAILED"
    assert [run["status"] for run in content] == [status, status]


def test_an_exception_that_does_not_pickle_is_recorded_by_its_name_and_text(tmp_path: Path) -> None:
    class Local(Exception):  # a local class cannot be pickled
        pass

    def body(tracker: Any) -> None:
        with pytest.raises(Local), tracker:
            raise Local("no pickle")

    inline, background = two_stores(tmp_path, body)
    assert store_content(background) == store_content(inline)
    assert store_content(background)[0]["tags"]["ptlab.error"] == "Local: no pickle"


def test_a_store_that_cannot_be_opened_is_the_same_one_line_error(tmp_path: Path) -> None:
    """A store file that is not a database: the helper's failure is raised here (at the first read of a run id) as
    the very ``StoreError`` that preparing the store raises in this process; nothing is written."""
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not a SQLite database, not at all" * 100)
    uri = f"sqlite:///{bad}"
    with pytest.raises(StoreError) as inline:
        prepare_sqlite_store(uri)
    tracker = BackgroundTracker(uri, "exp", "cell")
    with pytest.raises(StoreError) as background, tracker:
        tracker.log_params({"seed": 0})
        tracker.start_stage("upstream")
        tracker.log_metrics({"x": 1.0}, stage="upstream")
        _ = tracker.parent_run_id
    assert str(background.value) == str(inline.value)
    assert "\n" not in str(background.value) and "its file is not a SQLite database" in str(background.value)


def test_a_failure_seen_only_at_the_end_is_raised_by_exit(tmp_path: Path) -> None:
    """A write that fails in the helper (a stage never started) while this process reads nothing: ``__exit__``
    raises it, and the runs the helper opened end FAILED, none RUNNING."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = BackgroundTracker(uri, "exp", "cell")
    with pytest.raises(KeyError, match="never started"), tracker:
        tracker.log_metrics({"x": 1.0}, stage="never started")
    runs = MlflowClient(uri).search_runs(["1"])
    assert [(r.info.status, r.data.tags["ptlab.error"]) for r in runs] == [("FAILED", "KeyError: 'never started'")]


def test_a_server_that_is_down_is_the_same_one_line_error() -> None:
    """No server at the address: the helper's ``MLflowTracker`` fails as in-process (one ``StoreError`` line, after
    MLflow's bounded retries), raised here at the first read."""
    from tests.tracking.test_remote_tracking import free_port

    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(StoreError) as inline, MLflowTracker(url, "exp", "cell"):
        pass
    tracker = BackgroundTracker(url, "exp", "cell")
    with pytest.raises(StoreError) as background, tracker:
        tracker.log_params({"seed": 0})
        _ = tracker.experiment_id
    assert str(background.value) == str(inline.value)
    assert str(background.value).startswith(f"logger.tracking_uri='{url}': the tracking store failed, the server does not answer")


KILLED_MID_RUN = """
import os, signal, sys
from ptlab.tracking.background import BackgroundTracker
tracker = BackgroundTracker(sys.argv[1], "exp", "cell")
tracker.__enter__()
tracker.start_stage("upstream")
print(tracker.parent_run_id, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_main_process_killed_mid_run_leaves_no_run_running(tmp_path: Path) -> None:
    """SIGKILL to the main process (nothing can run there): the helper sees its pipe close and ends the runs FAILED
    with ``ptlab.error`` saying why, at once (not only when the next command finds them)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = subprocess.run(
        [sys.executable, "-c", KILLED_MID_RUN, uri],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    client = MlflowClient(uri)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        runs = client.search_runs(["1"])
        if len(runs) == 2 and all(r.info.status != "RUNNING" for r in runs):
            break
        time.sleep(0.2)
    assert sorted((r.data.tags["ptlab.stage"], r.info.status, r.data.tags.get("ptlab.error", "")) for r in runs) == [
        ("pipeline", "FAILED", f"RuntimeError: {VANISHED_ERROR}"),
        ("upstream", "FAILED", ""),
    ]


def test_a_helper_that_dies_is_one_line_and_its_runs_are_ended_here(tmp_path: Path) -> None:
    """The helper killed mid-run: the next call or read here raises one ``StoreError`` line; at exit this process
    ends the helper's runs FAILED (``process vanished``, as the next command would) and the line says none is left."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tracker = BackgroundTracker(uri, "exp", "cell")
    with pytest.raises(StoreError) as error, tracker:
        tracker.start_stage("upstream")
        parent = tracker.parent_run_id
        assert tracker._helper is not None
        tracker._helper.process.kill()
        tracker._helper.process.wait()
        tracker.log_metrics({"x": 1.0}, stage="upstream")
        _ = tracker.parent_run_id
    assert str(error.value) == (
        f"logger.tracking_uri={uri!r}: the tracking process ended unexpectedly (exit code -9); "
        "no run of this command was left RUNNING"
    )
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_run(parent).info.experiment_id])
    assert [(r.info.status, r.data.tags["ptlab.error"]) for r in runs] == [("FAILED", "process vanished")] * 2


def test_a_sigterm_in_the_block_ends_the_helpers_runs_killed(tmp_path: Path) -> None:
    """Under ``signals_as_interrupt`` (as a pipeline runs), SIGTERM to this process: the helper, in its own session,
    does not get it; it is told, and ends the open stage and the parent KILLED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(Terminated), signals_as_interrupt():
        tracker = BackgroundTracker(uri, "exp", "cell")
        with tracker:
            tracker.start_stage("upstream")
            os.kill(os.getpid(), signal.SIGTERM)  # raised here: the block ends KILLED
    assert {r.info.status for r in MlflowClient(uri).search_runs(["1"])} == {"KILLED"}


@pytest.mark.parametrize(
    ("overrides", "multirun", "expected"),
    [
        ((), False, True),
        ((), True, False),
        (("logger=none",), False, False),
        (("resume.skip_finished=always",), False, False),
        (("task=cifar10",), False, False),
    ],
)
def test_which_runs_track_in_the_background(
    make_cfg: Callable[..., Any], overrides: tuple[str, ...], multirun: bool, expected: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A single synthetic run with MLflow, while MLflow is not loaded yet; never a multirun's job (a reused worker
    loads MLflow once for all its jobs) or a run that reads the store first."""
    cfg = make_cfg(*overrides, small=False)
    args = (cfg.logger.kind, cfg.task.name, multirun, cfg.resume.skip_finished)
    monkeypatch.delitem(sys.modules, "mlflow")
    assert runs_in_background(*args) is expected
    monkeypatch.setitem(sys.modules, "mlflow", MlflowClient)  # loaded already: nothing to take off the path
    assert runs_in_background(*args) is False


PROBE = """
import sys
import ptlab.cli, ptlab.pipeline.run, ptlab.pipeline.synthetic, ptlab.pipeline.record, ptlab.tracking.background
print(sorted(name for name in sys.modules if name.split(".")[0] in ("mlflow", "sqlalchemy", "alembic")))
"""


def test_the_pipeline_modules_load_without_mlflow() -> None:
    done = subprocess.run(
        [sys.executable, "-c", PROBE],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
    )
    assert done.stdout.strip() == "[]"


INLINE = """
import runpy, sys
import mlflow  # loaded before the run: the pipeline tracks in this process, as before the helper existed
sys.argv = ["ptlab", *sys.argv[1:]]
runpy.run_module("ptlab", run_name="__main__", alter_sys=True)
"""


def test_a_default_run_tracks_through_the_helper_the_same_store_as_in_process(tmp_path: Path) -> None:
    """The CLI (small default pipeline): the main process never imports MLflow (``-X importtime``), and the store
    equals that of the same run tracked in-process, but for the store's own path in ``summary.json``."""
    args = [*SMALL, "hydra.run.dir=out", "cache.enabled=false", "logger.tracking_uri=sqlite:///mlflow.db"]
    for kind in ("background", "inline"):
        (tmp_path / kind).mkdir()
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "ptlab", *args],
        cwd=tmp_path / "background",
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    imported = [line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")]
    assert "torch" in imported and not [name for name in imported if name.startswith("mlflow")]
    inline = subprocess.run(
        [sys.executable, "-c", INLINE, *args], cwd=tmp_path / "inline", capture_output=True, text=True, timeout=600, env=env
    )
    assert inline.returncode == 0, inline.stderr[-3000:]
    contents = [store_content(f"sqlite:///{tmp_path / kind / 'mlflow.db'}") for kind in ("background", "inline")]
    for content in contents:
        for run in content:
            if "summary.json" in run["artifacts"]:
                run["artifacts"]["summary.json"] = run["artifacts"]["summary.json"].replace(str(tmp_path), "")
                run["artifacts"]["summary.json"] = re.sub(r"/(background|inline)/", "/", run["artifacts"]["summary.json"])
    assert contents[0] == contents[1]
    assert len(contents[0]) == 4 and {run["status"] for run in contents[0]} == {"FINISHED"}


def test_a_helper_no_tracker_took_ends_without_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``warm_up`` starts the helper before torch loads; a run that stops before tracking (bad input found by the
    pipeline's own checks, an error) leaves it to ``discard_warm``: it ends at once, and no store exists."""
    from ptlab.tracking import background

    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "mlflow")
    background.warm_up("mlflow", "synthetic", False, "multirun")
    helper = background._Warm.helper
    assert helper is not None and helper.process.poll() is None
    background.discard_warm()
    assert helper.process.returncode == 0 and background._Warm.helper is None
    assert list(tmp_path.iterdir()) == []


def test_run_times_are_those_of_the_run_not_of_the_helper(tmp_path: Path) -> None:
    """The helper writes runs late (after MLflow loaded) and fast (replaying queued calls): it creates and ends them
    at the times the run's own process made the calls, so start times and durations in the MLflow UI are the run's."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    before = time.time_ns() // 1_000_000  # MLflow stores whole milliseconds
    tracker = BackgroundTracker(uri, "times", "seed=0")
    with tracker:
        time.sleep(0.6)
        tracker.start_stage("upstream")
        time.sleep(0.8)
        tracker.end_stage("upstream")
        ids = tracker.parent_run_id, tracker.children["upstream"]
        time.sleep(0.3)
    after = time.time_ns() // 1_000_000 + 1
    client = MlflowClient(uri)
    parent, child = (client.get_run(run_id) for run_id in ids)
    assert before <= parent.info.start_time <= before + 300
    assert 800 <= child.info.end_time - child.info.start_time <= 1300
    assert 550 <= child.info.start_time - parent.info.start_time <= 1000
    assert parent.info.end_time - parent.info.start_time >= 1700 and parent.info.end_time <= after

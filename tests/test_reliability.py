"""Off the happy path: a signal to the report, a tracking server that is down or dies, a store that is damaged
or full, a cache entry that is not a file or cannot be written, and stale marking across PID namespaces."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import SMALL, run_cli


@pytest.mark.parametrize(("signum", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_to_the_report_ends_its_run_killed(
    make_cfg, tracking_uri: str, tmp_path: Path, monkeypatch, capsys, signum: str, code: int
) -> None:
    """The signal arrives while the report run is open (sent from inside its first artifact upload)."""
    from ptlab.pipeline import run_pipeline
    from ptlab.report.cli import main as report_main
    from ptlab.tracking.mlflow import MLflowTracker

    run_pipeline(make_cfg("logger.experiment_name=fig1c_tiny"), tmp_path / "run")
    upload = MLflowTracker.log_artifact

    def interrupted(self, *args, **kwargs):
        upload(self, *args, **kwargs)
        os.kill(os.getpid(), getattr(signal, signum))
        time.sleep(5)  # the handler raises here
        raise AssertionError("the signal was not handled")

    monkeypatch.setattr(MLflowTracker, "log_artifact", interrupted)
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert report_main(["fig1c_tiny", "--tracking-uri", tracking_uri, "--out", str(tmp_path / "r")]) == code
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"ptlab.report: stopped by signal {signum}; its MLflow run is marked KILLED"
    )
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("fig1c_tiny")
    [report] = client.search_runs([experiment.experiment_id], "tags.`ptlab.stage` = 'report'")
    assert report.info.status == "KILLED"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored


def test_a_tracking_server_that_is_down_fails_the_first_write_fast_with_one_line() -> None:
    """Past the preflight (``run_pipeline`` from Python): MLflow's retries are bounded (ptlab's defaults of its
    HTTP environment variables), the error is one ``StoreError`` line."""
    from ptlab.errors import StoreError
    from ptlab.tracking.base import HTTP_REQUEST_DEFAULTS
    from ptlab.tracking.mlflow import MLflowTracker

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(StoreError) as raised, MLflowTracker(f"http://127.0.0.1:{port}", "down", "run"):
        pass
    took = time.monotonic() - started
    assert took < 30, took
    message = str(raised.value)
    assert "\n" not in message and "the tracking store failed, the server does not answer" in message
    assert {name: os.environ[name] for name in HTTP_REQUEST_DEFAULTS} == HTTP_REQUEST_DEFAULTS


class _Silent(BaseHTTPRequestHandler):
    """A server that accepts connections and never answers (a hung tracking server)."""

    def do_GET(self) -> None:
        time.sleep(60)

    do_POST = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.mark.slow
def test_a_hung_tracking_server_fails_within_the_bounded_time() -> None:
    """Each try waits MLFLOW_HTTP_REQUEST_TIMEOUT (5 s), three tries: about 15-20 s, not MLflow's 120 s x 8."""
    from ptlab.errors import StoreError
    from ptlab.tracking.mlflow import MLflowTracker

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Silent)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    started = time.monotonic()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        with pytest.raises(StoreError, match="the server does not answer"), MLflowTracker(url, "hung", "run"):
            pass
        took = time.monotonic() - started
    finally:
        server.shutdown()
    assert 5 <= took < 30, took


def test_store_faults_are_recognised_in_real_errors(tmp_path: Path) -> None:
    import errno
    import sqlite3

    from ptlab.tracking.faults import store_fault

    (tmp_path / "junk.db").write_bytes(os.urandom(4096))
    with pytest.raises(sqlite3.DatabaseError) as raised:
        sqlite3.connect(tmp_path / "junk.db").execute("SELECT * FROM sqlite_master")
    assert store_fault(raised.value) == "its file is not a SQLite database"
    assert store_fault(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))) == "its disk is full"
    try:
        try:
            raise OSError(errno.ENOSPC, "disk")
        except OSError as err:
            raise RuntimeError("wrapped") from err
    except RuntimeError as err:
        assert store_fault(err) == "its disk is full"
    assert store_fault(ValueError("a bug")) is None


def on_small_disk(tmp_path: Path, code: str, runs: list[list[str]], size: str = "3M") -> subprocess.CompletedProcess:
    """Run ``code`` (a script taking the disk's path, then each of ``runs``' arguments, one process each) with a
    ``size`` tmpfs mounted at ``tmp_path/disk`` in a mount namespace of its own; skips where that is not allowed."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    disk = tmp_path / "disk"
    disk.mkdir()
    script = tmp_path / "script.py"
    script.write_text(code)
    command = f"mount -t tmpfs -o size={size} tmpfs {disk} || exit 99; " + " && ".join(
        f"{sys.executable} {script} {disk} {' '.join(args)}" for args in runs
    )
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", command],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)},
    )
    if done.returncode == 99 or (done.returncode and "unshare:" in done.stderr):
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr[-3000:]
    return done


FULL_DISK = """
import os, sys
from mlflow.tracking import MlflowClient
from ptlab.errors import StoreError
from ptlab.tracking.faults import prepare_sqlite_store
from ptlab.tracking.mlflow import MLflowTracker
disk, leave = sys.argv[1], int(sys.argv[2])
uri = f"sqlite:///{disk}/mlflow.db"
client = MlflowClient(uri)
if leave < 0:  # the next command, another process
    with MLflowTracker(uri, "full", "next"):
        pass
    experiment = client.get_experiment_by_name("full").experiment_id
    print("AFTER", sorted(r.info.status for r in client.search_runs([experiment])))
    sys.exit(0)
prepare_sqlite_store(uri)
tracker = MLflowTracker(uri, "full", "run", artifact_location=f"file://{disk}/art")
try:
    with tracker:
        tracker.start_stage("upstream")
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        with open(f"{disk}/fill", "wb") as handle:
            handle.write(b"x" * max(free - leave, 0))
        tracker.log_params({f"p{i}": "v" * 500 for i in range(2000)})
except StoreError as err:
    print("ERROR", str(err).count(chr(10)), str(err))
os.remove(f"{disk}/fill")
print("STATUS", sorted(r.info.status for r in client.search_runs([tracker.experiment_id])))
"""


@pytest.mark.parametrize(("leave", "status"), [(256 << 10, ["FAILED", "FAILED"]), (0, ["FAILED", "FAILED"])])
def test_a_full_store_disk_gives_one_line_and_no_run_left_running(tmp_path: Path, leave: int, status: list[str]) -> None:
    """A 3 MB tmpfs holds the store (needs ``unshare --mount``, root): with a little space left the runs end FAILED
    at once; with none the write-ahead log of the failed write is cut at exit and they end FAILED too."""
    done = on_small_disk(tmp_path, FULL_DISK, [[str(leave)], ["-1"]])
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert lines["ERROR"].startswith("0 logger.tracking_uri=") and "its disk is full" in lines["ERROR"]
    assert lines["STATUS"] == str(status)
    assert lines["AFTER"] == "['FAILED', 'FAILED', 'FINISHED']"


def test_a_cache_entry_that_is_a_folder_is_retrained(tmp_path: Path) -> None:
    import torch

    from ptlab.pipeline.cache import CacheEntry, UpstreamCache, spec_key

    cache = UpstreamCache(tmp_path)
    spec = {"stage": "test"}
    (cache.path(spec_key(spec)) / "inner").mkdir(parents=True)
    calls = []

    def create() -> CacheEntry:
        calls.append(1)
        return CacheEntry({"w": torch.arange(3.0)}, {"final": {"acc": 1.0}}, {})

    _entry, hit = cache.get_or_create(spec, create)
    assert not hit and calls == [1] and cache.path(spec_key(spec)).is_file()
    again, hit = cache.get_or_create(spec, create)
    assert hit and calls == [1] and torch.equal(again.state_dict["w"], torch.arange(3.0))


FULL_CACHE = """
import logging, os, sys
import torch
from ptlab.pipeline.cache import CacheEntry, UpstreamCache
logging.basicConfig(level=logging.WARNING, format="%(message)s")
disk = sys.argv[1]
cache = UpstreamCache(disk)
free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
with open(f"{disk}/fill", "wb") as handle:
    handle.write(b"x" * free)
entry, hit = cache.get_or_create({"stage": "test"}, lambda: CacheEntry({"w": torch.ones(100000)}, {"final": {}}, {}))
print("TRAINED", hit, float(entry.state_dict["w"].sum()), sorted(os.listdir(disk)))
"""


def test_a_full_cache_disk_keeps_the_trained_upstream(tmp_path: Path) -> None:
    done = on_small_disk(tmp_path, FULL_CACHE, [[]], size="1M")
    assert "TRAINED False 100000.0" in done.stdout, done.stdout + done.stderr[-2000:]
    left = done.stdout.strip().split(" ", 3)[3]
    assert ".tmp" not in left and ".ptc'" not in left, left  # no half-written entry left
    assert "ptlab cache: could not store" in done.stderr and "going on without caching it" in done.stderr


LIVE_RUN = """
import sys, time
from ptlab.tracking.mlflow import MLflowTracker
with MLflowTracker(sys.argv[1], "live", "run"):
    print("open", flush=True)
    time.sleep(120)
"""


def _unshare_pid() -> list[str]:
    """``unshare --pid --fork --mount-proc`` where this machine permits it, else skip."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare")
    probe = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"], check=False, capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"unshare --pid not permitted here: {probe.stderr.strip()[:200]}")
    return ["unshare", "--pid", "--fork", "--mount-proc"]


@pytest.mark.parametrize("inside", ["run", "marker"])
def test_stale_marking_never_hits_a_live_run_of_another_pid_namespace(tmp_path: Path, inside: str) -> None:
    """A live run opened in one PID namespace is left RUNNING by ``python -m ptlab.tracking.stale`` in another
    (the run inside and the marker outside, and the other way round); once its process is gone, a marker in its
    namespace (here: the host's) marks it FAILED."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    script = tmp_path / "live.py"
    script.write_text(LIVE_RUN)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    prefix = _unshare_pid()
    live = subprocess.Popen(
        [*(prefix if inside == "run" else []), sys.executable, str(script), uri],
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        assert live.stdout.readline().strip() == "open"
        marker = [*(prefix if inside == "marker" else []), sys.executable, "-m", "ptlab.tracking.stale", "--tracking-uri", uri]
        done = subprocess.run(marker, check=False, capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "marked 0 vanished run(s)" in done.stdout
        client = MlflowClient(uri)
        [run] = client.search_runs([client.get_experiment_by_name("live").experiment_id])
        assert run.info.status == "RUNNING"
    finally:
        os.killpg(live.pid, signal.SIGKILL)
        live.wait()
    if inside == "marker":  # the run was the host's: a host marker now sees its process gone
        done = subprocess.run(marker[len(prefix) :], check=False, capture_output=True, text=True, env=env, timeout=120)
        assert "marked 1 vanished run(s)" in done.stdout, done.stdout + done.stderr[-2000:]


class _BasicAuth(BaseHTTPRequestHandler):
    """MLflow's REST answers behind basic auth (alice / secret): 401 without the user, else the experiment
    lookup's 404 RESOURCE_DOES_NOT_EXIST (an experiment to be created), an empty experiment search."""

    def do_GET(self) -> None:
        import base64
        import json

        good = "Basic " + base64.b64encode(b"alice:secret").decode()
        if self.headers.get("Authorization") != good:
            code, body = 401, {"error_code": "UNAUTHENTICATED"}
        elif "experiments/search" in self.path:
            code, body = 200, {"experiments": []}
        else:
            code, body = 404, {"error_code": "RESOURCE_DOES_NOT_EXIST"}
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:
        pass


def test_the_preflight_sends_mlflows_credentials_and_refuses_a_401(tmp_path: Path, monkeypatch) -> None:
    """The probe sends MLFLOW_TRACKING_USERNAME/PASSWORD as MLflow's client does; without them: exit 2, one line,
    nothing written. docker/check_runs.py --refused passes against the same server."""
    from ptlab.store_checks import check_http_store

    server = ThreadingHTTPServer(("127.0.0.1", 0), _BasicAuth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
        monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
        done = run_cli([*SMALL, f"logger.tracking_uri={url}"], cwd=tmp_path)
        assert done.returncode == 2 and done.stderr.strip() == (
            f"ptlab: logger.tracking_uri='{url}' is not allowed: the server refused the credentials (HTTP 401); "
            "set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
        ), done.stderr
        assert list(tmp_path.iterdir()) == []
        monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
        monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "secret")
        check_http_store(url, "new")  # accepted: the experiment does not exist yet
        check_runs = Path(__file__).resolve().parent.parent / "docker" / "check_runs.py"
        done = subprocess.run(
            [sys.executable, str(check_runs), "--refused", url], check=False, capture_output=True, text=True, timeout=60
        )
        assert done.returncode == 0, done.stderr[-2000:]
        assert done.stdout.count("HTTP 401") == 2
    finally:
        server.shutdown()


def start_server(root: Path, port: int) -> subprocess.Popen:
    """A real ``mlflow server`` on ``root``'s SQLite store (the same store each time it is started)."""
    from tests.tracking.test_remote_tracking import wait_until_healthy

    log = root / f"server-{time.monotonic_ns()}.log"
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
        "--backend-store-uri",
        f"sqlite:///{root / 'server.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        str(root / "artifacts"),
    ]
    with log.open("w") as out:
        process = subprocess.Popen(
            command,
            cwd=root,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        )
    wait_until_healthy(f"http://127.0.0.1:{port}", process, log)
    return process


@pytest.mark.slow
def test_a_tracking_server_that_dies_mid_run_fails_within_30_s_and_the_next_command_closes_the_runs(tmp_path: Path) -> None:
    """The server is SIGKILLed while a Lightning pipeline trains; the pipeline's next write fails and it exits 1
    with one line within 30 s of that write (MLflow's own defaults: about 8 minutes); its runs stay RUNNING on
    the server (it cannot be told), and the next command, once the server is back, marks them FAILED."""
    from tests.tracking.test_remote_tracking import free_port, stop_process_group

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    slow = [
        "engine=lightning",
        "task.d=300",
        "train.upstream_steps=400",
        "train.downstream_steps=400",
        "train.eval_every=100",
        "hydra.run.dir=out",
        "cache.dir=cache",
        f"logger.tracking_uri={url}",
        "logger.experiment_name=dies",
    ]
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    pipeline = subprocess.Popen(
        [sys.executable, "-m", "ptlab", *slow],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    client = MlflowClient(url)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and pipeline.poll() is None:
            experiment = client.get_experiment_by_name("dies")
            if experiment and len(client.search_runs([experiment.experiment_id])) >= 2:
                break
            time.sleep(1)
        assert pipeline.poll() is None, pipeline.communicate()[1][-2000:]
        stop_process_group(server)
        killed = time.monotonic()
        _, stderr = pipeline.communicate(timeout=600)
        took = time.monotonic() - killed
        lines = stderr.strip().splitlines()
        assert pipeline.returncode == 1, stderr[-3000:]
        assert lines[-1].startswith(
            f"ptlab: logger.tracking_uri='{url}': the tracking store failed, the server does not answer"
        ), stderr[-3000:]
        assert "Traceback" not in stderr
        print(f"exit {took:.1f} s after the server died: {lines[-1]}")
        assert took < 60, took  # the next write (the stage's end, seconds away) plus about 20 s of bounded retries
        server = start_server(tmp_path, port)
        assert {r.info.status for r in client.search_runs([experiment.experiment_id])} == {"RUNNING"}
        done = run_cli(
            [*SMALL, f"logger.tracking_uri={url}", "logger.experiment_name=dies", "hydra.run.dir=next", "cache.dir=cache"],
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        runs = client.search_runs([experiment.experiment_id])
        assert not [r for r in runs if r.info.status == "RUNNING"]
        assert sum(r.data.tags.get("ptlab.error") == "process vanished" for r in runs) >= 2
    finally:
        if pipeline.poll() is None:
            pipeline.kill()
        stop_process_group(server)


FULL_RUN_DIR = """
import os, subprocess, sys
disk = sys.argv[1]
free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
with open(f"{disk}/fill", "wb") as handle:
    handle.write(b"x" * (free - (1 << 20)))
done = subprocess.run([sys.executable, "-m", "ptlab", "task.d=300", f"hydra.run.dir={disk}/out",
                       f"logger.tracking_uri=sqlite:///{sys.argv[2]}/mlflow.db", f"cache.dir={sys.argv[2]}/cache"],
                      capture_output=True, text=True)
print("EXIT", done.returncode)
print("ERR", done.stderr.strip())
print("LEFT", sorted(os.listdir(disk)), sorted(os.listdir(sys.argv[2])))
"""


def test_an_output_folder_on_a_full_disk_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    done = on_small_disk(tmp_path, FULL_RUN_DIR, [[str(elsewhere)]], size="8M")
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert lines["EXIT"] == "2", done.stdout
    assert lines["ERR"].startswith(f"ptlab: hydra.run.dir='{tmp_path / 'disk' / 'out'}' is not allowed: ")
    assert "is on a disk with 1.0 MB free (at least 16.0 MB needed)" in lines["ERR"] and "\n" not in lines["ERR"]
    assert lines["LEFT"] == "['fill'] []"


FULL_BULK = """
import os, sys
from ptlab.errors import StoreError
from ptlab.tracking.bulk import BulkRunWriter
disk = sys.argv[1]
writer = BulkRunWriter(f"sqlite:///{disk}/mlflow.db", "bulk", artifact_location=f"file://{disk}/art")
trackers = []
for cell in range(50):
    with writer.tracker(f"cell {cell}", {"ptlab.stage": "pipeline"}) as tracker:
        tracker.log_params({f"p{i}": "v" * 400 for i in range(100)})
    trackers.append(tracker)
free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
with open(f"{disk}/fill", "wb") as handle:
    handle.write(b"x" * free)
try:
    writer.write(trackers)
except StoreError as err:
    print("ERROR", str(err).count(chr(10)), str(err))
os.remove(f"{disk}/fill")
import sqlite3
print("ROWS", sqlite3.connect(f"{disk}/mlflow.db").execute("SELECT count(*) FROM runs").fetchone()[0])
"""


def test_a_full_disk_under_the_batched_sweeps_bulk_writer_is_one_line_and_writes_no_run(tmp_path: Path) -> None:
    done = on_small_disk(tmp_path, FULL_BULK, [[]], size="3M")
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert lines["ERROR"].startswith("0 logger.tracking_uri=") and "its disk is full" in lines["ERROR"], done.stdout
    assert lines["ROWS"] == "0"  # one transaction: no run half-written, none RUNNING

"""Issue 29, the rest: a store at MLflow's head that lacks a table or a column is refused by the preflight; runs that
cannot be ended at the moment of a store fault are retried at exit and named when they stay open; a damaged image
whose header is fine is refused before tracking, its decoding cached."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest

from tests.conftest import SMALL, run_cli


def head_store(path: Path, *statements: str) -> None:
    """A store at the installed MLflow's head (a copy of ptlab's template), then ``statements`` run on it."""
    from ptlab.tracking.store_template import template_path

    template = template_path()
    assert template is not None
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, path)
    with sqlite3.connect(path) as connection:
        for statement in statements:
            connection.execute(statement)


INCOMPLETE = {
    "table": (["DROP TABLE webhooks"], "lacks MLflow's table webhooks;"),
    "column": (["ALTER TABLE runs DROP COLUMN deleted_time"], "lacks MLflow's column runs.deleted_time;"),
    "both": (
        ["DROP TABLE latest_metrics", "DROP TABLE experiment_tags", "ALTER TABLE params DROP COLUMN value"],
        "lacks MLflow's tables experiment_tags, latest_metrics and column params.value;",
    ),
}


@pytest.mark.parametrize("kind", sorted(INCOMPLETE))
def test_a_store_at_the_head_lacking_a_table_or_column_is_refused_in_one_line(tmp_path: Path, kind: str) -> None:
    """Exit 2, one line naming the file, what is missing and the fix; the store untouched, no output folder."""
    statements, message = INCOMPLETE[kind]
    store = tmp_path / "stores" / "mlflow.db"
    head_store(store, *statements)
    before = store.read_bytes()
    done = run_cli([*SMALL, f"logger.tracking_uri=sqlite:///{store}", f"hydra.run.dir={tmp_path / 'out'}"], cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip()
    assert line.startswith(f"ptlab: logger.tracking_uri='sqlite:///{store}' is not allowed: {store} is an MLflow store"), line
    assert message in line and "\n" not in line, line
    assert line.endswith("restore it from a backup or point logger.tracking_uri at a new file"), line
    assert store.read_bytes() == before and sorted(p.name for p in store.parent.iterdir()) == ["mlflow.db"]
    assert not (tmp_path / "out").exists()


def test_the_schema_reference_without_a_template_is_mlflows_models(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Templates off: MLflow's SQLAlchemy models are the reference; a complete store passes, one without a table
    does not; the template and the models agree on every table of the models (the template may hold more)."""
    from ptlab.errors import ConfigError
    from ptlab.store_checks import check_sqlite_store, expected_schema, mlflow_revisions

    head = mlflow_revisions()[1]
    store = tmp_path / "mlflow.db"
    head_store(store)
    expected_schema.cache_clear()
    from_template = expected_schema(head)
    monkeypatch.setenv("PTLAB_STORE_TEMPLATES", "off")
    expected_schema.cache_clear()
    try:
        from_models = expected_schema(head)
        assert set(from_models) <= set(from_template) and len(from_models) >= 40
        assert all(from_models[table] <= from_template[table] for table in from_models)
        check_sqlite_store(f"sqlite:///{store}", store, "x")
        with sqlite3.connect(store) as connection:
            connection.execute("DROP TABLE inputs")
        with pytest.raises(ConfigError, match="lacks MLflow's table inputs;"):
            check_sqlite_store(f"sqlite:///{store}", store, "x")
    finally:
        expected_schema.cache_clear()


@pytest.mark.parametrize("value", ["", "off", "OFF", "rel/templates", "~/t"])
def test_the_preflight_finds_the_templates_where_tracking_keeps_them(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    """The preflight's store check and the tracking's templates read one folder (``ptlab.paths.store_template_dir``)."""
    from ptlab.paths import store_template_dir as template_dir

    monkeypatch.setenv("PTLAB_STORE_TEMPLATES", value)
    monkeypatch.setenv("XDG_CACHE_HOME", "/somewhere/cache")
    expected = {"": Path("/somewhere/cache/ptlab/mlflow-stores"), "off": None, "OFF": None}.get(value, Path(value).expanduser())
    assert template_dir() == expected
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert template_dir() == (Path.home() / ".cache/ptlab/mlflow-stores" if value == "" else expected)


FOLDER = [
    "task=image_folder",
    "model=resnet18_small",
    "upstream_model=resnet18_small",
    "task.task2_classes=[ant,bee]",
    "task.k=1",
    "task.n2=4",
    "task.n1_ratio=1",
]


def image_folder(root: Path, per_class: int = 6, suffix: str = ".jpg") -> None:
    """Three classes of small random images (``suffix`` picks the format)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("ant", "bee", "cat"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / name / f"{i}{suffix}")


def truncated_jpeg(path: Path) -> None:
    """A JPEG whose header (SOI, tables, SOF, SOS) is intact and whose scan data stops half-way."""
    data = path.read_bytes()
    scan = data.index(b"\xff\xda")
    path.write_bytes(data[: scan + (len(data) - scan) // 2])


def png_with_bad_pixels(path: Path) -> None:
    """A PNG whose compressed pixel data is damaged but whose chunk CRCs are recomputed, so ``verify`` passes."""
    import struct
    import zlib

    data = bytearray(path.read_bytes())
    start = data.index(b"IDAT") - 4
    length = struct.unpack(">I", data[start : start + 4])[0]
    body = bytearray(data[start + 8 : start + 8 + length])
    body[2:10] = b"\xff" * 8  # the deflate stream's first block header and data
    data[start + 8 : start + 8 + length] = body
    data[start + 8 + length : start + 12 + length] = struct.pack(">I", zlib.crc32(b"IDAT" + bytes(body)))
    path.write_bytes(bytes(data))


def test_damaged_pixels_are_not_caught_by_the_header_checks(tmp_path: Path) -> None:
    """The two damaged files pass PIL's header checks (``unreadable_image``) and fail to decode, as the loader would."""
    from PIL import Image

    from ptlab.build_checks import undecodable_image, unreadable_image

    image_folder(tmp_path / "jpg")
    image_folder(tmp_path / "png", suffix=".png")
    jpeg, png = tmp_path / "jpg" / "bee" / "3.jpg", tmp_path / "png" / "cat" / "2.png"
    truncated_jpeg(jpeg)
    png_with_bad_pixels(png)
    for path in (jpeg, png):
        assert unreadable_image(path) is None
        assert undecodable_image(path) is not None
        with pytest.raises(OSError), Image.open(path) as image:
            image.convert("RGB")  # torchvision's ImageFolder loader
    assert undecodable_image(tmp_path / "jpg" / "bee" / "2.jpg") is None


@pytest.mark.parametrize(
    ("suffix", "damage", "name", "message"),
    [
        (".jpg", truncated_jpeg, "bee/3.jpg", "(OSError: image file is truncated"),
        (".png", png_with_bad_pixels, "cat/2.png", "(OSError:"),
    ],
)
def test_an_image_with_damaged_pixels_is_refused_before_tracking(tmp_path: Path, suffix, damage, name, message) -> None:
    """One line naming the file, exit 2, nothing written (no store, output or cache folder)."""
    root = tmp_path / "images"
    image_folder(root, suffix=suffix)
    damage(root / name)
    args = [*FOLDER, f"task.root={root}", "hydra.run.dir=out", "cache.dir=cache", "logger.tracking_uri=sqlite:///mlflow.db"]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 2, done.stderr[-2000:]
    line = done.stderr.strip()
    assert line.startswith(f"ptlab: task.root='{root}' is not allowed: {name} is not a readable image {message}"), line
    assert line.endswith("remove or replace it") and "\n" not in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_decoded_files_are_remembered_by_path_size_and_mtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first check decodes every file, the second none; a file rewritten (new mtime) or added is decoded again,
    and a damaged one rewritten in place is found even though the folder was checked before."""
    import os

    from ptlab import build_checks
    from ptlab.errors import ConfigError

    root, cache = tmp_path / "images", tmp_path / "cache"
    image_folder(root)
    files = sorted(root.rglob("*.jpg"))
    decoded: list[Path] = []
    real = build_checks.undecodable_image
    monkeypatch.setattr(build_checks, "undecodable_image", lambda path: decoded.append(path) or real(path))
    build_checks.check_decodable(root, files, "images", cache)
    assert sorted(decoded) == files and not cache.exists()  # remembered once the preflight accepted the command
    build_checks.write_decoded()
    assert len(list((cache / "image-checks").iterdir())) == 1
    decoded.clear()
    build_checks.check_decodable(root, files, "images", cache)
    assert decoded == []
    truncated_jpeg(files[4])
    os.utime(files[4], ns=(files[4].stat().st_atime_ns, files[4].stat().st_mtime_ns + 10**9))
    with pytest.raises(ConfigError, match=f"{files[4].relative_to(root)} is not a readable image"):
        build_checks.check_decodable(root, files, "images", cache)
    assert decoded == [files[4]]
    files[4].unlink()
    decoded.clear()
    build_checks._DECODED_HERE.clear()  # a new process
    build_checks.check_decodable(root, [f for f in files if f != files[4]], "images", None)
    assert len(decoded) == len(files) - 1  # no cache: every file decoded


def test_the_preflight_remembers_decoded_files_only_for_an_accepted_command(tmp_path: Path, monkeypatch) -> None:
    """A refused command (a later check fails: N2 too large) leaves no cache folder; an accepted one writes the
    record, and the next preflight (a new process: its own caches empty) decodes nothing."""
    from ptlab import build_checks
    from ptlab.cli import preflight

    root = tmp_path / "images"
    image_folder(root)
    monkeypatch.chdir(tmp_path)
    args = [*FOLDER, f"task.root={root}", "hydra.run.dir=out", "cache.dir=cache", "logger.tracking_uri=sqlite:///mlflow.db"]
    error = preflight([*args, "task.n2=100"])
    assert error is not None and "task.n2=100 is not allowed" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]
    assert preflight(args) is None
    assert len(list((tmp_path / "cache" / "image-checks").glob("*.json"))) == 1
    build_checks.folder_counts.cache_clear()
    build_checks._DECODED_HERE.clear()  # a new process
    decoded: list[Path] = []
    monkeypatch.setattr(build_checks, "undecodable_image", lambda path: decoded.append(path))
    assert preflight(args) is None and decoded == []


FULL_DISK_AT_EXIT = """
import os, sys, threading, time
from mlflow.tracking import MlflowClient
from ptlab.errors import StoreError
from ptlab.tracking.faults import prepare_sqlite_store
from ptlab.tracking.mlflow import MLflowTracker
disk, journal, frees_after = sys.argv[1], sys.argv[2], float(sys.argv[3])
uri = f"sqlite:///{disk}/mlflow.db"
prepare_sqlite_store(uri, wal=journal == "wal")
tracker = MLflowTracker(uri, "full", "run", artifact_location=f"file://{disk}/art")
start = None
try:
    with tracker:
        tracker.start_stage("upstream")
        free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
        with open(f"{disk}/fill", "wb") as handle:
            handle.write(b"x" * free)
        if frees_after >= 0:  # the disk frees while the command ends its runs (another program's file removed)
            threading.Timer(frees_after, os.remove, [f"{disk}/fill"]).start()
        start = time.monotonic()
        tracker.log_params({f"p{i}": "v" * 500 for i in range(2000)})
except StoreError as err:
    print("ERROR", str(err).count(chr(10)), str(err))
print("TOOK", f"{time.monotonic() - start:.1f}")
time.sleep(max(frees_after, 0))
if os.path.exists(f"{disk}/fill"):
    os.remove(f"{disk}/fill")
client = MlflowClient(uri)
print("STATUS", sorted(r.info.status for r in client.search_runs([tracker.experiment_id])))
print("TAG", client.get_run(tracker.parent_run_id).data.tags.get("ptlab.error", "none").split(":")[0])
"""


@pytest.mark.parametrize(("journal", "frees_after"), [("wal", -1), ("delete", 1.0), ("delete", -1)])
def test_runs_are_ended_at_exit_when_the_store_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, journal: str, frees_after: float
) -> None:
    """A store on a full 3 MB tmpfs (``unshare --mount``, root), 0 bytes left when a write fails. WAL journal: the log
    of the failed write is cut at exit and the runs end FAILED. Rollback journal (no log to cut), the disk freed 1 s
    later (another file removed) or never: the runs end FAILED, written with the journal in memory, at once."""
    from tests.test_reliability import on_small_disk

    monkeypatch.setenv("PTLAB_CLOSE_RETRY_S", "2")
    done = on_small_disk(tmp_path, FULL_DISK_AT_EXIT, [[journal, str(frees_after)]])
    lines = dict(line.split(" ", 1) for line in done.stdout.strip().splitlines())
    assert lines["ERROR"].startswith("0 logger.tracking_uri=") and "its disk is full" in lines["ERROR"], done.stdout
    assert lines["STATUS"] == "['FAILED', 'FAILED']" and lines["TAG"] == "StoreError", done.stdout
    assert lines["ERROR"].endswith("; no run of this command was left RUNNING"), lines["ERROR"]
    assert float(lines["TOOK"]) < 15, lines["TOOK"]


@pytest.mark.slow
def test_runs_on_a_server_that_died_are_named_and_ended_when_it_is_back(tmp_path: Path, monkeypatch) -> None:
    """A real ``mlflow server`` is killed while a tracker has a stage open. It stays dead: the exit waits at most the
    retry window (2 s of one-try calls) and the line names both runs and who ends them. Started again within the
    window: the runs end FAILED."""
    import threading
    import time

    from mlflow.tracking import MlflowClient

    from ptlab.errors import StoreError
    from ptlab.tracking.mlflow import MLflowTracker
    from tests.test_reliability import start_server
    from tests.tracking.test_remote_tracking import free_port, stop_process_group

    monkeypatch.setenv("PTLAB_CLOSE_RETRY_S", "2")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    restarted: list = []
    try:
        for back in (False, True):
            tracker = MLflowTracker(url, "dies", "run")
            with pytest.raises(StoreError) as error, tracker:
                tracker.start_stage("upstream")
                stop_process_group(server)
                if back:  # back 1 s into the retry window
                    monkeypatch.setenv("PTLAB_CLOSE_RETRY_S", "60")
                    threading.Timer(1.0, lambda: restarted.append(start_server(tmp_path, port))).start()
                start = time.monotonic()
                tracker.log_params({"a": 1})
            took = time.monotonic() - start
            line = str(error.value)
            print(f"server {'back' if back else 'dead'}: the write and the exit took {took:.1f} s: {line}")
            ids = [tracker.children["upstream"], tracker.parent_run_id]
            if not back:
                assert "the server does not answer" in line and "\n" not in line
                assert f"run(s) {', '.join(ids)} stay RUNNING" in line and "python -m ptlab.tracking.stale" in line
                assert took < 30, took  # the failed write's bounded retries (about 3 s) and the 2 s window
                server = start_server(tmp_path, port)
            else:
                assert line.endswith("; no run of this command was left RUNNING"), line
                server = restarted[0]
                statuses = {MlflowClient(url).get_run(run_id).info.status for run_id in ids}
                assert statuses == {"FAILED"}, statuses
    finally:
        for started in {id(s): s for s in (server, *restarted)}.values():  # a restart the timer made is stopped too
            stop_process_group(started)


@pytest.mark.parametrize("record", ["not json {", "[1, 2]", '{"ant/0.jpg": "x"}'])
def test_a_damaged_record_of_decoded_files_only_costs_a_decoding(tmp_path: Path, record: str, monkeypatch) -> None:
    """A record that is not the mapping it should be: every file is decoded again and the record rewritten."""
    import json

    from ptlab import build_checks

    root, cache = tmp_path / "images", tmp_path / "cache"
    image_folder(root)
    files = sorted(root.rglob("*.jpg"))
    path = build_checks._decoded_record(root, cache)
    path.parent.mkdir(parents=True)
    path.write_text(record)
    decoded: list[Path] = []
    monkeypatch.setattr(build_checks, "_DECODED_HERE", {})
    monkeypatch.setattr(build_checks, "undecodable_image", lambda file: decoded.append(file))
    build_checks.check_decodable(root, files, "images", cache)
    build_checks.write_decoded()
    assert sorted(decoded) == files
    assert sorted(json.loads(path.read_text())) == sorted(str(f.relative_to(root)) for f in files)


@pytest.mark.slow
def test_runs_a_dead_server_kept_running_are_ended_by_the_watcher_once_it_is_back(tmp_path: Path, monkeypatch) -> None:
    """A real ``mlflow server`` is killed while a tracker beats every 0.5 s; the command exits with its runs named
    RUNNING (nothing can write to a dead server). ``python -m ptlab.tracking.stale --watch 0.5``, running beside the
    server throughout, ends both FAILED (``heartbeat stopped``) within a few seconds of the server's return, with no
    ptlab command run meanwhile."""
    import signal
    import time

    from mlflow.tracking import MlflowClient

    from ptlab.errors import StoreError
    from ptlab.tracking.mlflow import MLflowTracker
    from tests.test_reliability import start_server
    from tests.tracking.test_heartbeat import start_watcher
    from tests.tracking.test_remote_tracking import free_port, stop_process_group

    monkeypatch.setenv("PTLAB_CLOSE_RETRY_S", "1")
    monkeypatch.setenv("PTLAB_HEARTBEAT_S", "0.5")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(tmp_path, port)
    watcher = start_watcher(url, 0.5)
    try:
        tracker = MLflowTracker(url, "dies", "run")
        with pytest.raises(StoreError) as error, tracker:
            tracker.start_stage("upstream")
            time.sleep(1.5)  # a few beats
            stop_process_group(server)
            tracker.log_params({"a": 1})
        ids = [tracker.children["upstream"], tracker.parent_run_id]
        assert f"run(s) {', '.join(ids)} stay RUNNING" in str(error.value)
        server = start_server(tmp_path, port)
        back = time.monotonic()
        client = MlflowClient(url)
        while {client.get_run(r).info.status for r in ids} != {"FAILED"} and time.monotonic() - back < 30:
            time.sleep(0.2)
        took = time.monotonic() - back
        print(f"ended by the watcher {took:.1f} s after the server was back")
        assert {client.get_run(r).info.status for r in ids} == {"FAILED"}, took
        assert {client.get_run(r).data.tags.get("ptlab.error") for r in ids} == {"heartbeat stopped"}
    finally:
        watcher.send_signal(signal.SIGTERM)
        out, err = watcher.communicate(timeout=30)
        stop_process_group(server)
    assert "cannot be read" in out and "1 run(s) whose heartbeat stopped" not in out, out
    assert "2 run(s) whose heartbeat stopped FAILED" in out and err == "", (out, err[-2000:])

"""ptlab against a real MLflow tracking server over HTTP.

One ``mlflow server`` (SQLite backend, artifacts proxied by the server into a temporary folder) is
started for the module and always stopped, its whole process group, at the end. A pipeline logged
to it must give exactly what the same pipeline logs to a local SQLite store: the same runs, metric
histories and artifacts, and the report must read them back.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from ptlab.config import ConfigError
from ptlab.pipeline import run_pipeline
from ptlab.report import ReportError, make_report
from ptlab.transfer.selection import count_for
from tests.conftest import SMALL, run_cli

STAGES = {"upstream", "transfer", "scratch"}
STARTUP_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group (the server and its uvicorn worker), then SIGKILL whatever
    of it is left after 15 s."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=15)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def wait_until_healthy(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"mlflow server did not answer within {STARTUP_TIMEOUT_S} s: {log.read_text()[-2000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """``(url, artifacts folder)`` of a running ``mlflow server`` on 127.0.0.1."""
    root = tmp_path_factory.mktemp("mlflow_server")
    artifacts, log = root / "artifacts", root / "server.log"
    url = f"http://127.0.0.1:{(port := free_port())}"
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
        f"sqlite:///{root / 'mlflow.db'}",
        "--serve-artifacts",
        "--artifacts-destination",
        str(artifacts),
    ]
    # The server's background job runner (GenAI jobs) is not used by ptlab: leave it off.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with log.open("w") as out:
        process = subprocess.Popen(command, cwd=root, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        wait_until_healthy(url, process, log)
        yield url, artifacts
    finally:
        stop_process_group(process)


def remote_cfg(make_cfg: Callable[..., DictConfig], url: str, experiment: str, *overrides: str) -> DictConfig:
    """A small synthetic pipeline logging to the server; the later tracking_uri override wins."""
    return make_cfg("cache.enabled=false", f"logger.experiment_name={experiment}", f"logger.tracking_uri={url}", *overrides)


def child_runs(client: MlflowClient, experiment_id: str, parent_id: str) -> dict[str, Run]:
    """The child runs of ``parent_id`` by their ``ptlab.stage``."""
    runs = client.search_runs([experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {run.data.tags["ptlab.stage"]: run for run in runs}


def histories(client: MlflowClient, run_id: str) -> dict[str, list[tuple[int, float]]]:
    """Every metric's full history as sorted ``(step, value)`` points."""
    keys = client.get_run(run_id).data.metrics
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key)) for key in keys}


def test_pipeline_and_report_through_the_server(
    server: tuple[str, Path], make_cfg: Callable[..., DictConfig], tracking_uri: str, tmp_path: Path
) -> None:
    url, artifacts = server
    local = run_pipeline(make_cfg("cache.enabled=false", "logger.experiment_name=remote"), tmp_path / "local")
    remote = run_pipeline(remote_cfg(make_cfg, url, "remote"), tmp_path / "remote")
    assert remote["mlflow"]["tracking_uri"] == url

    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("remote")
    assert experiment.artifact_location.startswith("mlflow-artifacts:"), "artifacts go through the server"
    parents = client.search_runs([experiment.experiment_id], filter_string="tags.`ptlab.stage` = 'pipeline'")
    assert [p.info.run_id for p in parents] == [remote["mlflow"]["parent_run_id"]]
    parent = parents[0]
    children = child_runs(client, experiment.experiment_id, parent.info.run_id)
    assert set(children) == STAGES
    assert {run.info.status for run in [parent, *children.values()]} == {"FINISHED"}

    # Same seed, same numbers: the server holds exactly what a local store gets.
    local_client = MlflowClient(tracking_uri)
    local_children = child_runs(local_client, local["mlflow"]["experiment_id"], local["mlflow"]["parent_run_id"])
    for stage in STAGES:
        served = histories(client, children[stage].info.run_id)
        assert served == histories(local_client, local_children[stage].info.run_id)
        assert max(len(points) for points in served.values()) > 1, f"{stage} has no metric curve"
    assert parent.data.metrics["transfer_test_acc"] == remote["transfer"]["test_acc"] == local["transfer"]["test_acc"]
    assert parent.data.metrics["transfer_gain"] == pytest.approx(
        remote["transfer"]["test_acc"] - remote["scratch"]["test_acc"], abs=1e-12
    )

    # Artifacts: listed and downloaded over HTTP, stored by the server in its own folder.
    assert {"config.yaml", "summary.json"} <= {a.path for a in client.list_artifacts(parent.info.run_id)}
    transfer_id = children["transfer"].info.run_id
    assert "transfer_plan.json" in {a.path for a in client.list_artifacts(transfer_id)}
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    summary = json.loads(Path(client.download_artifacts(parent.info.run_id, "summary.json", str(downloads))).read_text())
    assert summary == json.loads((tmp_path / "remote" / "summary.json").read_text())
    plan = json.loads(Path(client.download_artifacts(transfer_id, "transfer_plan.json", str(downloads))).read_text())
    assert plan == remote["transfer"]["plan"] == local["transfer"]["plan"]
    assert all(row["copied"] == count_for(0.5, row["total"]) for row in plan)
    stored = artifacts / experiment.experiment_id / parent.info.run_id / "artifacts" / "summary.json"
    assert json.loads(stored.read_text()) == summary

    # The report reads the pipeline back from the server and stores its files there.
    paths = make_report("remote", url, tmp_path / "report")
    (table,) = [pd.read_csv(p) for p in paths if p.suffix == ".csv"]
    assert table["n"].tolist() == [1]  # seeds per cell (ptlab.report.generic.cell_stats)
    assert table["transfer_acc"].iloc[0] == remote["transfer"]["test_acc"]
    (report_run,) = client.search_runs([experiment.experiment_id], filter_string="tags.`ptlab.stage` = 'report'")
    assert {a.path for a in client.list_artifacts(report_run.info.run_id, "report")} == {f"report/{p.name}" for p in paths}


@pytest.mark.slow
def test_command_lines_against_the_server(server: tuple[str, Path], tmp_path: Path) -> None:
    """``python -m ptlab logger.tracking_uri=http://...`` and ``python -m ptlab.report --tracking-uri
    http://...``, each in its own process, the way a container runs them."""
    url, _ = server
    experiment = "remote_cli"
    done = run_cli(
        [*SMALL, "cache.enabled=false", f"logger.experiment_name={experiment}", f"logger.tracking_uri={url}", "seed=0,1", "-m"],
        tmp_path,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    summaries = [json.loads(p.read_text()) for p in sorted(tmp_path.glob("multirun/*/*/*/summary.json"))]
    assert len(summaries) == 2
    done = run_cli(
        [experiment, "--tracking-uri", url, "--out", str(tmp_path / "report")], tmp_path, module="ptlab.report", timeout=120
    )
    assert done.returncode == 0, done.stderr
    table = pd.read_csv(tmp_path / "report" / f"{experiment}.csv")
    assert table["n"].tolist() == [2]
    expected = sum(s["transfer"]["test_acc"] for s in summaries) / 2
    assert table["transfer_acc"].iloc[0] == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("layout", ["runs", pytest.param("grid", marks=pytest.mark.slow)])  # grid: also slow (suite time)
def test_batched_sweep_into_the_server(server: tuple[str, Path], tmp_path: Path, layout: str) -> None:
    """The batched gram launcher writes through MLflow's public client when the store is a server: every run ends
    FINISHED, children point at their parent, the curves, summaries and grid table arrive, and a grid rerun resumes."""
    url, _ = server
    experiment = f"remote_batched_{layout}"
    args = [
        "-m",
        "engine=gram",
        "hydra/launcher=ptlab_gram",
        "hydra/sweeper=ptlab_batched",
        *SMALL,
        "seed=0,1",
        f"hydra.launcher.tracking={layout}",
        "hydra.launcher.grid_samples=1",
        f"logger.experiment_name={experiment}",
        f"logger.tracking_uri={url}",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    done = run_cli(args, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(url)
    experiment_id = client.get_experiment_by_name(experiment).experiment_id
    runs = client.search_runs([experiment_id])
    assert runs and all(run.info.status == "FINISHED" for run in runs)
    parents = [r for r in runs if r.data.tags["ptlab.stage"] in ("pipeline", "grid_sample")]
    assert len(parents) == (2 if layout == "runs" else 1)
    for parent in parents:
        children = child_runs(client, experiment_id, parent.info.run_id)
        assert set(children) == STAGES
        assert len(client.get_metric_history(children["scratch"].info.run_id, "loss/train")) >= 1
        assert "summary.json" in {a.path for a in client.list_artifacts(parent.info.run_id)}
    if layout == "grid":
        (grid,) = [r for r in runs if r.data.tags["ptlab.stage"] == "grid"]
        assert {"results.parquet", "summaries.jsonl"} <= {a.path for a in client.list_artifacts(grid.info.run_id)}
    if layout == "grid":  # a rerun resumes through the server (the run-per-cell resume is the single runs')
        again = run_cli(args, tmp_path, timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "2 skipped (already finished)" in again.stdout


def test_unreachable_server_is_a_one_line_error(
    make_cfg: Callable[..., DictConfig], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(ConfigError, match=r"^logger\.tracking_uri='http://127\.0\.0\.1:\d+' is not allowed") as err:
        run_pipeline(remote_cfg(make_cfg, url, "nowhere"), tmp_path)
    assert "\n" not in str(err.value)
    with pytest.raises(ReportError, match="cannot read tracking URI"):
        make_report("nowhere", url, tmp_path / "report")

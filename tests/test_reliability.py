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
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import SMALL, run_cli


@pytest.mark.parametrize(("signum", "code"), [("SIGTERM", 143), ("SIGINT", 130)])
def test_a_signal_to_the_report_ends_its_run_killed(make_cfg, tracking_uri: str, tmp_path: Path, monkeypatch,
                                                    capsys, signum: str, code: int) -> None:
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
    assert capsys.readouterr().err.strip().splitlines()[-1] == (f"ptlab.report: stopped by signal {signum}; its "
                                                                 "MLflow run is marked KILLED")
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("fig1c_tiny")
    [report] = client.search_runs([experiment.experiment_id], "tags.`ptlab.stage` = 'report'")
    assert report.info.status == "KILLED"
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before  # handlers restored

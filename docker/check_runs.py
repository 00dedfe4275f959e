"""Checks through an MLflow server's REST API that one ptlab pipeline landed (docker/test-stack.sh).

Usage: check_runs.py URL EXPERIMENT TOTAL. Passes when EXPERIMENT holds TOTAL runs, all FINISHED,
among them exactly one pipeline parent (tag ``ptlab.stage=pipeline``) with its three stage runs
as children. Requests carry MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD as basic auth, as
MLflow's client does. ``check_runs.py --refused URL``: passes when the server answers 401 to a request
without credentials and to one with a wrong password. ``check_runs.py --reaped URL EXPERIMENT SECONDS``: creates
a RUNNING run of a process on another host whose heartbeat stopped 10 minutes ago and passes when the stack's
reaper has ended it FAILED (``ptlab.error=heartbeat stopped``) within SECONDS. Standard library only: it runs on
the host, outside the images.
"""

from __future__ import annotations

import base64
import json
import os
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any


def credentials(user: str | None = None, password: str | None = None) -> dict[str, str]:
    """The basic-auth header of the environment's MLflow credentials (or of those given)."""
    user = os.environ.get("MLFLOW_TRACKING_USERNAME", "") if user is None else user
    password = os.environ.get("MLFLOW_TRACKING_PASSWORD", "") if password is None else password
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()} if user else {}


def call(url: str, endpoint: str, body: dict[str, Any] | None = None, headers: dict[str, str] | None = None) -> dict[str, Any]:
    """One REST call: GET with query parameters when ``body`` is None, else POST of JSON."""
    headers = credentials() if headers is None else headers
    if body is None:
        request = urllib.request.Request(url + endpoint, headers=headers)
    else:
        request = urllib.request.Request(
            url + endpoint, data=json.dumps(body).encode(), headers={"Content-Type": "application/json", **headers}
        )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def refused(url: str) -> None:
    """Without credentials and with a wrong password, the REST API answers 401."""
    endpoint = "/api/2.0/mlflow/experiments/search?max_results=1"
    for headers in ({}, credentials(password="wrong")):
        try:
            call(url, endpoint, headers=headers)
        except urllib.error.HTTPError as err:
            assert err.code == 401, f"HTTP {err.code} without valid credentials, expected 401"
            print(f"refused ({'no' if not headers else 'wrong'} credentials): HTTP {err.code}")
            continue
        raise AssertionError(f"the server answered {endpoint} {'without' if not headers else 'with wrong'} credentials")
    call(url, endpoint)  # and with the right ones it answers


def tags(run: dict[str, Any]) -> dict[str, str]:
    return {tag["key"]: tag["value"] for tag in run["data"].get("tags", [])}


def main(url: str, experiment: str, total: int) -> None:
    query = urllib.parse.urlencode({"experiment_name": experiment})
    experiment_id = call(url, f"/api/2.0/mlflow/experiments/get-by-name?{query}")["experiment"]["experiment_id"]
    runs = call(url, "/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id], "max_results": 1000})["runs"]
    stages = {run["info"]["run_id"]: tags(run) for run in runs}
    for run in runs:
        print(run["info"]["run_id"], run["info"]["status"], stages[run["info"]["run_id"]].get("ptlab.stage"))
    parents = [run_id for run_id, tag in stages.items() if tag.get("ptlab.stage") == "pipeline"]
    assert len(parents) == 1, f"{len(parents)} pipeline parent runs, expected 1"
    children = [run_id for run_id, tag in stages.items() if tag.get("mlflow.parentRunId") == parents[0]]
    assert len(children) == 3, f"{len(children)} children of the pipeline run, expected 3"
    assert len(runs) == total, f"{len(runs)} runs in {experiment}, expected {total}"
    unfinished = [run["info"]["run_id"] for run in runs if run["info"]["status"] != "FINISHED"]
    assert not unfinished, f"runs not FINISHED: {unfinished}"


def reaped(url: str, experiment: str, seconds: float) -> None:
    """A run whose process (another host's) stopped beating 10 minutes ago is ended by the reaper within ``seconds``."""
    experiment_id = call(url, "/api/2.0/mlflow/experiments/create", {"name": experiment})["experiment_id"]
    stamp = time.time() - 600
    run_tags = {"ptlab.stage": "pipeline", "ptlab.process": "gone-host:4242:99:boot:1", "ptlab.heartbeat": f"{stamp:.1f}:30"}
    body = {"experiment_id": experiment_id, "tags": [{"key": k, "value": v} for k, v in run_tags.items()]}
    run_id = call(url, "/api/2.0/mlflow/runs/create", body)["run"]["info"]["run_id"]
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        run = call(url, f"/api/2.0/mlflow/runs/get?{urllib.parse.urlencode({'run_id': run_id})}")["run"]
        if run["info"]["status"] != "RUNNING":
            assert run["info"]["status"] == "FAILED" and tags(run).get("ptlab.error") == "heartbeat stopped", run
            print(f"reaped: run {run_id} FAILED ({tags(run)['ptlab.error']}) after {time.monotonic() - started:.0f} s")
            return
        time.sleep(2)
    raise AssertionError(f"run {run_id} still RUNNING after {seconds} s: the reaper did not end it")


if __name__ == "__main__":
    if sys.argv[1] == "--refused":
        refused(sys.argv[2])
    elif sys.argv[1] == "--reaped":
        reaped(sys.argv[2], sys.argv[3], float(sys.argv[4]))
    else:
        main(sys.argv[1], sys.argv[2], int(sys.argv[3]))

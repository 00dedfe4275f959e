"""Checks through an MLflow server's REST API that one ptlab pipeline landed (docker/test-stack.sh).

Usage: check_runs.py URL EXPERIMENT TOTAL. Passes when EXPERIMENT holds TOTAL runs, all FINISHED,
among them exactly one pipeline parent (tag ``ptlab.stage=pipeline``) with its three stage runs
as children. Standard library only: it runs on the host, outside the images.
"""

from __future__ import annotations

import json
import sys
import urllib.parse
import urllib.request
from typing import Any


def call(url: str, endpoint: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    """One REST call: GET with query parameters when ``body`` is None, else POST of JSON."""
    if body is None:
        request = urllib.request.Request(url + endpoint)
    else:
        request = urllib.request.Request(url + endpoint, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


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


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]))

"""Reading back the grid layout of a batched sweep (``ptlab.pipeline.batched``): the results tables of an
experiment's finished grid runs, as rows in the columns ``ptlab.report.runs.load_pipelines`` returns for a run
per cell, so that a report reads both layouts the same way."""

from __future__ import annotations

import tempfile

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ptlab.tracking.base import GRID_KEY_TAG, STAGE_TAG

RESULTS = "results.parquet"
"""The grid run's results table (one row per finished cell)."""
GRID_KEY = f"tags.{GRID_KEY_TAG}"


def grid_rows(client: MlflowClient, experiment_id: str) -> pd.DataFrame:
    """Every row of the experiment's ended grid runs (the latest row of each grid cell), with ``run_id``,
    ``experiment_id``, ``status`` and ``start_time`` of its grid run; empty when there is none. A row is a finished
    cell whatever its grid run's status (a grid run with diverged cells ends FAILED and holds the others); a grid
    run that ended before writing its table has no rows."""
    runs = client.search_runs(
        [experiment_id],
        f"tags.`{STAGE_TAG}` = 'grid' and attributes.status != 'RUNNING'",
        order_by=["attributes.start_time ASC"],
        max_results=1000,
    )
    frames = []
    with tempfile.TemporaryDirectory() as tmp:
        for run in runs:
            try:
                table = pd.read_parquet(client.download_artifacts(run.info.run_id, RESULTS, tmp))
            except (MlflowException, OSError):
                continue
            table["run_id"], table["experiment_id"] = run.info.run_id, experiment_id
            table["status"] = "FINISHED"
            table["start_time"] = pd.to_datetime(run.info.start_time, unit="ms", utc=True)
            frames.append(table)
    if not frames:
        return pd.DataFrame()
    return pd.concat(frames, ignore_index=True).drop_duplicates(GRID_KEY, keep="last").reset_index(drop=True)


def with_grid_rows(runs: pd.DataFrame, client: MlflowClient, experiment_id: str) -> pd.DataFrame:
    """``runs`` (one row per pipeline run) followed by the experiment's grid rows."""
    grid = grid_rows(client, experiment_id)
    if grid.empty:
        return runs
    return grid if runs.empty else pd.concat([runs, grid], ignore_index=True)

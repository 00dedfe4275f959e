"""Reading a ptlab experiment back from MLflow: its finished pipeline runs as one DataFrame."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ptlab.tracking import resolve_tracking_uri
from ptlab.pipeline.resume import CONFIG_HASH_TAG
from ptlab.tracking.mlflow import STAGE_TAG
from ptlab.tracking.stale import mark_vanished


class ReportError(RuntimeError):
    """A report that cannot be made; the message is one line saying why."""


def open_experiment(tracking_uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """The client and experiment id of ``experiment``; ``ReportError`` if the store or experiment is missing."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
        raise ReportError(f"tracking URI {tracking_uri} does not exist (no file {uri[len('sqlite:///'):]}); "
                          "run a pipeline first or pass --tracking-uri")
    client = MlflowClient(uri)
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            names = sorted(e.name for e in client.search_experiments())
            raise ReportError(f"no experiment {experiment!r} in {tracking_uri}; it has: {', '.join(names) or 'none'}")
    except MlflowException as err:
        raise ReportError(f"cannot read tracking URI {tracking_uri}: {str(err).splitlines()[0]}") from None
    mark_vanished(client, [found.experiment_id])
    return client, found.experiment_id


def load_pipelines(tracking_uri: str, experiment: str) -> pd.DataFrame:
    """One row per config: the latest FINISHED pipeline (parent) run of each ``ptlab.config_hash`` (a
    repeated pipeline is one seed, not two), with ``params.*``, ``metrics.*`` and ``tags.*`` columns."""
    _, experiment_id = open_experiment(tracking_uri, experiment)
    mlflow.set_tracking_uri(resolve_tracking_uri(tracking_uri))
    runs = mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=f"tags.`{STAGE_TAG}` = 'pipeline' and attributes.status = 'FINISHED'",
        output_format="pandas",
    )
    if runs.empty:
        raise ReportError(f"experiment {experiment!r} has no finished pipeline runs in {tracking_uri}")
    column = f"tags.{CONFIG_HASH_TAG}"
    if column in runs:
        latest = runs.sort_values("start_time").drop_duplicates(column, keep="last")
        runs = runs.loc[runs.index.isin(latest.index) | runs[column].isna()].reset_index(drop=True)
    return runs


def seed_stats(runs: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean, standard deviation and count over seeds of ``metrics``, per distinct value of ``by``."""
    frame = runs[by + metrics].copy()
    for column in by:
        frame[column] = _numeric(frame[column])
    grouped = frame.groupby(by, sort=True)[metrics].agg(["mean", "std", "count"])
    grouped.columns = [f"{metric}_{stat}" for metric, stat in grouped.columns]
    return grouped.reset_index()


def _numeric(column: pd.Series) -> pd.Series:
    try:
        return pd.to_numeric(column)
    except (TypeError, ValueError):
        return column

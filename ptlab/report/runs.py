"""Reading a ptlab experiment back from MLflow: its finished pipeline runs as one DataFrame."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ptlab.tracking import resolve_tracking_uri
from ptlab.tracking.base import CONFIG_HASH_TAG
from ptlab.tracking.grid import with_grid_rows
from ptlab.tracking.mlflow import STAGE_TAG
from ptlab.tracking.stale import mark_vanished


class ReportError(RuntimeError):
    """A report that cannot be made; the message is one line saying why."""


def open_experiment(tracking_uri: str, experiment: str) -> tuple[MlflowClient, str]:
    """The client and experiment id of ``experiment``; ``ReportError`` if the store or experiment is missing."""
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        raise ReportError(
            f"tracking URI {tracking_uri} does not exist (no file {uri[len('sqlite:///') :]}); "
            "run a pipeline first or pass --tracking-uri"
        )
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


def experiment_stores(tracking_uris: Sequence[str], experiments: Sequence[str]) -> dict[str, str]:
    """The store of each experiment: with one tracking URI, that one; with several, the one store that holds the
    experiment (``ReportError`` for an experiment in none of them or in more than one), so that experiments
    kept in several stores are read together without copying them into one."""
    uris = list(dict.fromkeys(tracking_uris))
    if len(uris) == 1:
        return {name: uris[0] for name in experiments}
    held: dict[str, list[str]] = {name: [] for name in experiments}
    for tracking_uri in uris:
        uri = resolve_tracking_uri(tracking_uri)
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
            raise ReportError(f"tracking URI {tracking_uri} does not exist (no file {uri[len('sqlite:///') :]})")
        try:
            names = {e.name for e in MlflowClient(uri).search_experiments()}
        except MlflowException as err:
            raise ReportError(f"cannot read tracking URI {tracking_uri}: {str(err).splitlines()[0]}") from None
        for name in experiments:
            if name in names:
                held[name].append(tracking_uri)
    for name, found in held.items():
        if len(found) != 1:
            where = "none" if not found else f"{len(found)} ({' and '.join(found)})"
            raise ReportError(
                f"--tracking-uri={' '.join(uris)}: experiment {name!r} is in {where} of these stores; "
                "each experiment must be in exactly one"
            )
    return {name: found[0] for name, found in held.items()}


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
    runs = with_grid_rows(runs, MlflowClient(resolve_tracking_uri(tracking_uri)), experiment_id)  # grid layout
    if runs.empty:
        raise ReportError(f"experiment {experiment!r} has no finished pipeline runs in {tracking_uri}")
    column = f"tags.{CONFIG_HASH_TAG}"
    if column in runs:
        latest = runs.sort_values("start_time").drop_duplicates(column, keep="last")
        runs = runs.loc[runs.index.isin(latest.index) | runs[column].isna()].reset_index(drop=True)
    return runs


GAIN = "metrics.transfer_gain"
RUN_ENVIRONMENT_PARAMS = (
    "params.theory.",
    "params.prediction.",
    "params.logger.",
    "params.cache.",
    "params.resume.",
    "params.devices.",
    "params.trainer.",
)
"""Params that say where or how a pipeline ran (or what the theory and the phase model predict from the others)."""
CONFIDENCE = 0.95


def swept_params(runs: pd.DataFrame) -> list[str]:
    """The ``params.*`` columns that differ between runs: the experiment's own knobs, without the seed,
    the theory's outputs and where or how runs were executed (logger, cache, resume, devices)."""
    columns = [
        c for c in runs.columns if c.startswith("params.") and c != "params.seed" and not c.startswith(RUN_ENVIRONMENT_PARAMS)
    ]
    return [c for c in columns if runs[c].astype(str).nunique() > 1]


def paired_ci(gains: pd.Series, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The t confidence interval of the mean of paired gains (transfer - scratch on the same seed);
    NaN with fewer than two seeds."""
    from scipy import stats

    values = gains.dropna().to_numpy(dtype=float)
    if len(values) < 2:
        return math.nan, math.nan
    mean, se = values.mean(), stats.sem(values)
    if se == 0:
        return mean, mean
    low, high = stats.t.interval(confidence, len(values) - 1, loc=mean, scale=se)
    return float(low), float(high)


def verdict(low: float, high: float, n: int) -> str:
    """Transfer better / worse than scratch when the paired CI excludes 0; else no detectable difference."""
    if n < 2 or math.isnan(low):
        return f"n={n}: no CI"
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no detectable difference"


def one_run_per_seed(runs: pd.DataFrame, by: list[str]) -> pd.DataFrame:
    """The latest run of each seed per group: a pipeline repeated under another config hash (other theory
    constants, an older ptlab) is still one seed."""
    if "params.seed" not in runs.columns:
        return runs
    ordered = runs.sort_values("start_time") if "start_time" in runs.columns else runs
    return ordered.drop_duplicates([*by, "params.seed"], keep="last").sort_index()


def seed_stats(runs: pd.DataFrame, by: list[str], metrics: list[str]) -> pd.DataFrame:
    """Mean, standard deviation and count over seeds of ``metrics`` per group, and for the paired gain
    (``metrics.transfer_gain``) its 95% t interval and a verdict.

    A group is the whole config minus the seed: ``by`` plus every other param that differs between
    the runs (``swept_params``), so pipelines that differ in anything but the seed (epochs, a smoke
    run's sizes) are never averaged together; ``config_label`` says what the extra columns are."""
    extra = [
        c
        for c in swept_params(runs)
        if c not in by and c not in metrics and (not by or runs.groupby(by, dropna=False)[c].nunique(dropna=False).max() > 1)
    ]
    by = [*by, *extra]
    frame = one_run_per_seed(runs, by)[by + metrics].copy()
    for column in by:
        frame[column] = _numeric(frame[column])
    grouped = frame.groupby(by, sort=True, dropna=False)
    table = grouped[metrics].agg(["mean", "std", "count"])
    table.columns = [f"{metric}_{stat}" for metric, stat in table.columns]
    table = table.reset_index()
    if GAIN in metrics:
        intervals = [paired_ci(group[GAIN]) for _, group in grouped]
        table[f"{GAIN}_ci_low"] = [low for low, _ in intervals]
        table[f"{GAIN}_ci_high"] = [high for _, high in intervals]
        table["verdict"] = [verdict(low, high, int(n)) for (low, high), n in zip(intervals, table[f"{GAIN}_count"])]
    table.attrs["config_columns"] = extra
    return table


def config_label(table: pd.DataFrame, by: list[str]) -> pd.Series:
    """For each row of a ``seed_stats`` table, the params beyond ``by`` that set its group apart
    (``"downstream_epochs=3"``), or ``""`` when there are none."""
    extra = [c for c in table.attrs.get("config_columns", []) if c not in by]
    return (
        table[extra].apply(lambda row: ", ".join(f"{c.rsplit('.', 1)[-1]}={v}" for c, v in row.items()), axis=1)
        if extra
        else pd.Series([""] * len(table), index=table.index)
    )


def _numeric(column: pd.Series) -> pd.Series:
    try:
        return pd.to_numeric(column)
    except (TypeError, ValueError):
        return column

"""Metric points written straight into the store's tables equal what MLflow's own ``log_batch`` stores."""

from __future__ import annotations

import math

import pytest
import sqlalchemy
from mlflow.entities import Metric
from mlflow.tracking import MlflowClient

from ptlab.tracking import BufferedMLFlowLogger
from ptlab.tracking.sql import MetricWriter, is_database_uri

POINTS = [
    ("loss", 0.5, 1000, 0),
    ("loss", 0.25, 1001, 1),
    ("acc", float("nan"), 1000, 0),
    ("acc", float("inf"), 1002, 2),
    ("loss", 0.5, 1000, 0),  # a duplicate point: stored once
    ("late", 3.0, 900, 5),
    ("late", 4.0, 950, 2),
]  # the latest of "late" is step 5, logged first
MORE = [("loss", 0.125, 1003, 2), ("late", 1.0, 990, 4), ("acc", -float("inf"), 1004, 3)]


def stored(client: MlflowClient, run_id: str) -> tuple[dict, dict]:
    """Every metric's history as (step, timestamp, value) and the run's latest values."""
    histories = {}
    for key in ("loss", "acc", "late"):
        histories[key] = sorted((m.step, m.timestamp, repr(m.value)) for m in client.get_metric_history(run_id, key))
    latest = {k: repr(v) for k, v in client.get_run(run_id).data.metrics.items()}
    return histories, latest


def test_metric_writer_stores_what_log_batch_stores(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("e")
    reference, direct = (client.create_run(experiment).info.run_id for _ in range(2))
    for batch in (POINTS, MORE):
        client.log_batch(reference, metrics=[Metric(*point) for point in batch])
    writer = MetricWriter(uri)
    assert writer.write(direct, POINTS) == len(POINTS) - 1
    assert writer.write(direct, MORE) == len(MORE)
    writer.close()
    assert stored(client, direct) == stored(client, reference)
    histories, latest = stored(client, direct)
    assert latest == {"loss": repr(0.125), "acc": repr(-1.7976931348623157e308), "late": repr(3.0)}
    assert any(math.isnan(float(value)) for _, _, value in histories["acc"])


def test_a_point_stored_twice_is_an_integrity_error_and_the_logger_falls_back(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    writer = MetricWriter(uri)
    logger = BufferedMLFlowLogger(experiment_name="e", tracking_uri=uri, run_name="stage")
    writer.write(logger.run_id, [("loss", 1.0, 1000, 0)])
    with pytest.raises(sqlalchemy.exc.IntegrityError):
        writer.write(logger.run_id, [("loss", 1.0, 1000, 0), ("loss", 0.5, 1001, 1)])
    writer.close()
    logger._pending.extend([("loss", 1.0, 1000, 0), ("loss", 0.5, 1001, 1)])  # MLflow skips the stored one
    logger.finalize("success")
    client = MlflowClient(uri)
    assert sorted((m.step, m.value) for m in client.get_metric_history(logger.run_id, "loss")) == [(0, 1.0), (1, 0.5)]
    assert client.get_run(logger.run_id).data.metrics == {"loss": 0.5}
    assert client.get_run(logger.run_id).info.status == "FINISHED"


def test_buffered_logger_writes_curves_to_the_tables_of_a_database_store(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logger = BufferedMLFlowLogger(experiment_name="e", tracking_uri=uri, run_name="stage")
    for step in range(2500):
        logger.log_metrics({"train/loss": 1.0 / (step + 1), "tag": "not a number"}, step=step)
    logger.finalize("success")
    history = MlflowClient(uri).get_metric_history(logger.run_id, "loss/train")  # ptlab.tracking.base.metric_name
    assert sorted(m.step for m in history) == list(range(2500))
    assert MlflowClient(uri).get_run(logger.run_id).data.metrics == {"loss/train": 1.0 / 2500}


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("sqlite:///mlflow.db", True),
        ("postgresql+psycopg2://u@h/db", True),
        ("mysql://h/db", True),
        ("http://127.0.0.1:5000", False),
        ("file:///tmp/mlruns", False),
        ("databricks", False),
    ],
)
def test_is_database_uri(uri: str, expected: bool) -> None:
    assert is_database_uri(uri) is expected


def test_mlflow_tables_are_the_ones_ptlab_writes() -> None:
    """Fails loudly when an MLflow upgrade changes a table ptlab writes rows into."""
    from types import SimpleNamespace

    from ptlab.tracking.sql import TABLES, check_tables

    check_tables()
    assert {t.__tablename__ for t in TABLES} == {"runs", "tags", "params", "metrics", "latest_metrics"}
    changed = SimpleNamespace(
        __tablename__="tags",
        __table__=SimpleNamespace(columns=[SimpleNamespace(name=n) for n in ("key", "value", "run_uuid", "new_column")]),
    )
    with pytest.raises(RuntimeError, match="changed table 'tags'"):
        check_tables((changed,))


def test_a_signal_inside_a_store_write_waits_for_the_write() -> None:
    import os
    import signal

    from ptlab.errors import Terminated
    from ptlab.tracking.faults import signals_as_interrupt, tracking_write

    steps = []
    with pytest.raises(Terminated, match="signal SIGTERM"):
        with signals_as_interrupt():
            with tracking_write():
                os.kill(os.getpid(), signal.SIGTERM)
                steps.append("write finished")
            steps.append("after the write")
    assert steps == ["write finished"]
    with signals_as_interrupt():  # a marking block drops a second signal instead of stopping half-way
        with tracking_write(raise_deferred=False):
            os.kill(os.getpid(), signal.SIGINT)
            steps.append("runs marked")
    assert steps == ["write finished", "runs marked"]

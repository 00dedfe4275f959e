"""Metric points written straight into a database-backed MLflow store, with MLflow's own tables.

MLflow's ``log_batch`` costs about 0.2 ms a metric point on SQLite (an ORM object and a latest-metric
comparison each); a synthetic pipeline logs thousands of points. ``MetricWriter`` inserts a run's
points into ``metrics`` and updates ``latest_metrics`` in one transaction, leaving the rows that
``log_batch`` leaves (NaN stored as 0 with ``is_nan``, infinities as the largest float, duplicate
points once, the latest point by (step, timestamp, value)).

MLflow has no public API for bulk writes, so this module is the one place that uses its private
table models (``mlflow.store.tracking.dbmodels``), for itself and for ``ptlab.tracking.bulk``.
pyproject.toml pins the MLflow versions they were checked against, and ``check_tables`` compares the
columns with the ones written here before any row is written: a changed schema fails loudly
instead of writing rows MLflow cannot read.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy
from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlParam, SqlRun, SqlTag

from ptlab.tracking.faults import with_retries

TESTED_MLFLOW = ">=3.17,<3.18"
"""The MLflow versions whose tables ptlab writes (pyproject.toml pins the same range)."""
TABLE_COLUMNS = {
    "runs": (
        "run_uuid",
        "name",
        "source_type",
        "source_name",
        "entry_point_name",
        "user_id",
        "status",
        "start_time",
        "end_time",
        "deleted_time",
        "source_version",
        "lifecycle_stage",
        "artifact_uri",
        "experiment_id",
    ),
    "tags": ("key", "value", "run_uuid"),
    "params": ("key", "value", "run_uuid"),
    "metrics": ("key", "value", "timestamp", "step", "is_nan", "run_uuid"),
    "latest_metrics": ("key", "value", "timestamp", "step", "is_nan", "run_uuid"),
}
"""The columns of MLflow's tables that the rows written here fill, as of ``TESTED_MLFLOW``."""
TABLES = (SqlRun, SqlTag, SqlParam, SqlMetric, SqlLatestMetric)


def check_tables(tables: tuple[Any, ...] = TABLES) -> None:
    """``RuntimeError`` naming the table when MLflow's columns differ from ``TABLE_COLUMNS``."""
    for table in tables:
        columns = tuple(column.name for column in table.__table__.columns)
        expected = TABLE_COLUMNS.get(table.__tablename__)
        if columns != expected:
            import mlflow

            raise RuntimeError(
                f"MLflow {mlflow.__version__} changed table {table.__tablename__!r} ({columns}, "
                f"ptlab writes {expected}); ptlab was tested with mlflow{TESTED_MLFLOW}"
            )


def tables_checked() -> bool:
    """Whether this MLflow's tables are the ones written here (else ptlab writes through MLflow's public client)."""
    try:
        check_tables()
    except RuntimeError:
        return False
    return True


DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
MAX_FLOAT = 1.7976931348623157e308

MetricPoint = tuple[str, float, int, int]
"""(key, value, timestamp in ms, step)."""


def is_database_uri(tracking_uri: str) -> bool:
    """True for a database-backed store (``sqlite:///...``, ``postgresql+psycopg2://...``)."""
    return tracking_uri.split(":", 1)[0].split("+", 1)[0] in DATABASE_SCHEMES


def metric_value(value: float) -> tuple[float, bool]:
    """MLflow's storage of a metric value: NaN as 0 with ``is_nan``, infinities as the largest float."""
    if math.isnan(value):
        return 0.0, True
    if math.isinf(value):
        return (MAX_FLOAT if value > 0 else -MAX_FLOAT), False
    return value, False


def metric_rows(
    run_id: str,
    points: Iterable[MetricPoint],
) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The ``metrics`` rows of ``points`` (duplicates once) and the newest row of each key."""
    rows: list[dict[str, Any]] = []
    newest: dict[str, dict[str, Any]] = {}
    seen = set()
    for key, raw, stamp, step in points:
        value, is_nan = metric_value(raw)
        identity = (key, stamp, step, value, is_nan)
        if identity in seen:
            continue
        seen.add(identity)
        row = dict(key=key, value=value, timestamp=stamp, step=step, is_nan=is_nan, run_uuid=run_id)
        rows.append(row)
        if key not in newest or _order(row) > _order(newest[key]):
            newest[key] = row
    return rows, newest


def _order(row: Mapping[str, Any]) -> tuple[int, int, float]:
    return row["step"], row["timestamp"], row["value"]


def create_engine(tracking_uri: str) -> sqlalchemy.Engine:
    """An engine on the store's database; SQLite waits up to 20 s for a lock, as MLflow's own does."""
    connect_args = {"timeout": 20} if tracking_uri.startswith("sqlite") else {}
    return sqlalchemy.create_engine(tracking_uri, connect_args=connect_args)


class MetricWriter:
    """Writes metric points of existing runs into a database-backed MLflow store."""

    def __init__(self, tracking_uri: str) -> None:
        check_tables()
        self.engine = create_engine(tracking_uri)

    def write(self, run_id: str, points: Iterable[MetricPoint]) -> int:
        """Store ``points`` of run ``run_id`` in one transaction (retried while SQLite is locked);
        ``sqlalchemy.exc.IntegrityError`` when a point is already stored. Returns the rows written."""
        rows, newest = metric_rows(run_id, points)
        if rows:
            with_retries(self._write)(run_id, rows, newest)
        return len(rows)

    def _write(self, run_id: str, rows: list[dict[str, Any]], newest: dict[str, dict[str, Any]]) -> None:
        latest = SqlLatestMetric.__table__
        with self.engine.begin() as connection:
            connection.execute(SqlMetric.__table__.insert(), rows)
            stored = {
                row.key: dict(row._mapping)
                for row in connection.execute(
                    sqlalchemy.select(latest).where(latest.c.run_uuid == run_id, latest.c.key.in_(list(newest)))
                )
            }
            replaced = [row for key, row in newest.items() if key in stored and _order(row) > _order(stored[key])]
            for row in replaced:
                connection.execute(
                    latest.update()
                    .where(latest.c.run_uuid == run_id, latest.c.key == row["key"])
                    .values(value=row["value"], timestamp=row["timestamp"], step=row["step"], is_nan=row["is_nan"])
                )
            added = [row for key, row in newest.items() if key not in stored]
            if added:
                connection.execute(latest.insert(), added)

    def close(self) -> None:
        self.engine.dispose()


def end_runs_in_place(
    tracking_uri: str, run_ids: list[str], status: str, end_time_ms: int, error: tuple[str, str] | None = None
) -> list[str]:
    """Last resort for runs a full disk keeps RUNNING on a SQLite store with a rollback journal: their status and
    end time (and ``error`` = (run id, text) as its ``ptlab.error`` tag, where there is room) written with the journal in memory
    (``PRAGMA journal_mode=MEMORY``, this connection only). MLflow's own writes need room for the journal file
    beside the database; changing a row in pages the file already holds needs none. The price: a process
    killed in the middle of these few page writes could leave the file damaged, so this is only tried once the
    ordinary write failed on a full disk. Returns the runs still RUNNING (all of them when it fails too)."""
    if not tracking_uri.startswith("sqlite:///") or not run_ids or not tables_checked():
        return run_ids
    engine = sqlalchemy.create_engine(tracking_uri, connect_args={"timeout": 2}, poolclass=sqlalchemy.pool.NullPool)
    runs, tags = SqlRun.__table__, SqlTag.__table__
    try:
        with engine.connect() as connection:
            if connection.exec_driver_sql("PRAGMA journal_mode=MEMORY").scalar() != "memory":
                return run_ids  # a WAL store keeps its log mode: free_sqlite_journal gives its room back instead
            connection.commit()  # ends SQLAlchemy's implicit transaction around the pragma
            with connection.begin():
                connection.execute(
                    runs.update()
                    .where(runs.c.run_uuid.in_(run_ids), runs.c.status == "RUNNING")
                    .values(status=status, end_time=end_time_ms)
                )
            if error is not None:
                with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError), connection.begin():
                    connection.execute(tags.delete().where(tags.c.run_uuid == error[0], tags.c.key == "ptlab.error"))
                    connection.execute(tags.insert().values(key="ptlab.error", value=error[1], run_uuid=error[0]))
            running = connection.execute(
                sqlalchemy.select(runs.c.run_uuid).where(runs.c.run_uuid.in_(run_ids), runs.c.status == "RUNNING")
            )
            still = {row.run_uuid for row in running}
    except sqlalchemy.exc.SQLAlchemyError:
        return run_ids
    finally:
        engine.dispose()
    return [run_id for run_id in run_ids if run_id in still]

"""Lightning's MLflow logger with metric points stored in bulk (image runs' live curves)."""

from __future__ import annotations

from collections.abc import Mapping
from time import time
from typing import Any

from mlflow.entities import Metric
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.utilities import rank_zero_only
from sqlalchemy.exc import IntegrityError

from ptlab.tracking.base import metric_name
from ptlab.tracking.sql import MetricPoint, MetricWriter, is_database_uri

MAX_METRICS_PER_BATCH = 1000


class BufferedMLFlowLogger(MLFlowLogger):
    """``MLFlowLogger`` that keeps metric points in memory and stores them in bulk: straight into the
    tables of a database-backed store (``ptlab.tracking.sql``), through ``log_batch`` in batches of
    1000 otherwise."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._pending: list[MetricPoint] = []
        self._writer: MetricWriter | None = None

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        stamp = int(time() * 1000)
        self._pending.extend((metric_name(k), float(v), stamp, step or 0) for k, v in metrics.items() if not isinstance(v, str))
        if len(self._pending) >= 10 * MAX_METRICS_PER_BATCH:
            self.flush()

    @rank_zero_only
    def flush(self) -> None:
        """Store every pending metric point."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        if is_database_uri(self._tracking_uri or ""):
            if self._writer is None:
                self._writer = MetricWriter(self._tracking_uri)
            try:
                self._writer.write(self.run_id, pending)
                return
            except IntegrityError:  # a point stored before: MLflow's log_batch skips what exists
                pass
        metrics = [Metric(key, value, stamp, step) for key, value, stamp, step in pending]
        for start in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self.experiment.log_batch(self.run_id, metrics=metrics[start : start + MAX_METRICS_PER_BATCH])

    def save(self) -> None:
        super().save()
        self.flush()

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        if self._initialized or self._pending:
            self.flush()
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        super().finalize(status)

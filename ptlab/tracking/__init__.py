"""Tracking: MLflow runs for pipelines and their stages."""

from ptlab.tracking.mlflow import (
    BufferedMLFlowLogger,
    NullTracker,
    PipelineTracker,
    flatten,
    make_tracker,
    resolve_tracking_uri,
)

__all__ = ["BufferedMLFlowLogger", "NullTracker", "PipelineTracker", "flatten", "make_tracker",
           "resolve_tracking_uri"]

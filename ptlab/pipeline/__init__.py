"""Pipelines: one config in, upstream/transfer/scratch trained and tracked, summary.json out."""

from ptlab.pipeline.run import run_pipeline

__all__ = ["run_pipeline"]

"""Pipelines: one config in, upstream/transfer/scratch trained and tracked, summary.json out."""

from ptlab.lazy import lazy_exports

_EXPORTS = {"run_pipeline": "ptlab.pipeline.run", "record_pipeline": "ptlab.pipeline.record"}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

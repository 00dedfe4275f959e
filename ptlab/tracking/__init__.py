"""Tracking: the ``Tracker`` interface of a pipeline and its MLflow, null and in-memory implementations.

Names load lazily (``ptlab.lazy``): ``NullTracker`` and ``MemoryTracker`` need no tracking library,
``MLflowTracker`` loads MLflow, ``BufferedMLFlowLogger`` Lightning.
"""

from ptlab.lazy import lazy_exports

_EXPORTS = {
    **{name: "ptlab.tracking.base" for name in ("Tracker", "NullTracker", "MemoryTracker", "STAGE_TAG")},
    **{name: "ptlab.tracking.mlflow" for name in ("MLflowTracker", "make_tracker", "resolve_tracking_uri")},
    "BufferedMLFlowLogger": "ptlab.tracking.lightning",
    "BulkRunWriter": "ptlab.tracking.bulk",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

"""Pipelines: one config in, upstream/transfer/scratch trained and tracked, summary.json out."""

from ptlab.lazy import lazy_exports

_EXPORTS = {"run_pipeline": "ptlab.pipeline.run", "record_pipeline": "ptlab.pipeline.record",
            "synthetic": "ptlab.pipeline.synthetic"}


def __getattr__(name: str):  # noqa: ANN202 - PEP 562
    if name == "synthetic":
        import importlib

        return importlib.import_module("ptlab.pipeline.synthetic")
    return _lazy_getattr(name)


_lazy_getattr, __dir__ = lazy_exports(__name__, {k: v for k, v in _EXPORTS.items() if k != "synthetic"})
__all__ = sorted(_EXPORTS)

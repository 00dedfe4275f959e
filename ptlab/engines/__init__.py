"""Training engines behind one interface (``ptlab.engines.base``): Lightning (the reference) and the exact
Gram engine for the synthetic model, with its batched API for sweeps. Names load lazily."""

from ptlab.lazy import lazy_exports

_EXPORTS = {
    **{name: "ptlab.engines.base" for name in ("Engine", "Stage", "StageResult", "STAGES")},
    **{
        name: "ptlab.engines.gram"
        for name in ("GramCell", "GramEngine", "GramResult", "GramStage", "iter_chunks", "reconstruct_weights", "run_cells")
    },
    "LightningEngine": "ptlab.engines.lightning",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

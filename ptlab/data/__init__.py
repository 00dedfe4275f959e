"""Data: the synthetic two-patch tasks, the image tasks and the full-batch loader (loaded lazily)."""

from ptlab.lazy import lazy_exports

_EXPORTS = {
    "FullBatchDataModule": "ptlab.data.full_batch",
    **{
        name: "ptlab.data.synthetic"
        for name in ("Directions", "PatchData", "SyntheticTransferData", "make_directions", "make_synthetic_data", "sample_task")
    },
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

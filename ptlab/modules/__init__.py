"""LightningModules: how each model family is trained by the Lightning engine (loaded lazily)."""

from ptlab.lazy import lazy_exports

_EXPORTS = {
    "FullBatchGD": "ptlab.modules.full_batch_gd",
    "logistic_loss": "ptlab.modules.full_batch_gd",
    "sign_accuracy": "ptlab.modules.full_batch_gd",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

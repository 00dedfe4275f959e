"""Models: the paper's two-layer ReLU CNN, any torchvision or timm model, timm DeiTs (loaded lazily)."""

from ptlab.lazy import lazy_exports

_EXPORTS = {
    "SmallImageResNet": "ptlab.models.torchvision_cnn",
    "SmallImageVGG": "ptlab.models.torchvision_cnn",
    "build_torchvision_cnn": "ptlab.models.torchvision_cnn",
    "TwoLayerReLUCNN": "ptlab.models.two_layer_cnn",
    "build_model": "ptlab.models.factory",
    "DEIT_MODELS": "ptlab.models.names",
    "check_model_name": "ptlab.models.name_check",
    "WeightsError": "ptlab.models.vit",
    "create_vit": "ptlab.models.vit",
    "build_timm_model": "ptlab.models.timm_model",
    "adapt_stem": "ptlab.models.stem",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

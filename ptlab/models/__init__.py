"""Models: the paper's two-layer ReLU CNN (image CNNs and ViTs join this package)."""

from ptlab.models.torchvision_cnn import SmallImageResNet, SmallImageVGG, build_torchvision_cnn
from ptlab.models.two_layer_cnn import TwoLayerReLUCNN
from ptlab.models.vit import DEIT_MODELS, WeightsError, create_vit

__all__ = ["DEIT_MODELS", "SmallImageResNet", "SmallImageVGG", "TwoLayerReLUCNN", "WeightsError",
           "build_torchvision_cnn", "create_vit"]

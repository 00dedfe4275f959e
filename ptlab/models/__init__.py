"""Models: the paper's two-layer ReLU CNN (image CNNs and ViTs join this package)."""

from ptlab.models.two_layer_cnn import TwoLayerReLUCNN

__all__ = ["TwoLayerReLUCNN"]

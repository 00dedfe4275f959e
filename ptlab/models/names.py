"""The model names ptlab builds itself (its small-image ResNets/VGGs and DeiTs), torch-free, so the
CLI's preflight can accept them without importing torchvision or timm (``ptlab.models.name_check``)."""

from __future__ import annotations

PTLAB_CNNS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "vgg11", "vgg13", "vgg16", "vgg19")
"""torchvision architectures ptlab builds in its own small-image form (ptlab.models.torchvision_cnn)."""
DEIT_MODELS = {
    "deit_base": "deit_base_patch16_224",
    "deit_small": "deit_small_patch16_224",
    "deit_tiny": "deit_tiny_patch16_224",
}
"""ptlab's DeiT names and the timm architectures they create."""

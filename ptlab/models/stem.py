"""Small-image (e.g. 32x32) stem adaptation for any CNN built by a library factory.

ImageNet CNNs downsample their input 4x (ResNet, ConvNeXt) or 2x (MobileNet, EfficientNet, RegNet)
before the first block, which leaves a 32x32 image at 1x1 or less after the later stages. The rule
here, the usual CIFAR adaptation stated for any model: the first ``Conv2d`` in module order (the
stem) gets stride 1, and the first ``MaxPool2d``, when no other strided conv is registered before
it (the stem's pool), becomes ``nn.Identity``.
Kernel sizes and paddings are kept, so every weight keeps its shape and a checkpoint of the
library's model still loads by name and shape. Transformers (a ``patch_embed``) are left alone:
they take ``img_size`` instead.
"""

from __future__ import annotations

from torch import nn


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, leaf = name.rpartition(".")
    return (model.get_submodule(path) if path else model), leaf


def adapt_stem(model: nn.Module) -> list[str]:
    """Apply the small-image rule in place; return the names of the modules it changed."""
    if hasattr(model, "patch_embed"):
        return []
    changed: list[str] = []
    stem_seen = False
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Conv2d):
            if not stem_seen:
                stem_seen = True
                if max(module.stride) > 1:
                    module.stride = (1, 1)
                    changed.append(name)
            elif max(module.stride) > 1:
                break
        elif isinstance(module, nn.MaxPool2d) and stem_seen:
            parent, leaf = _parent(model, name)
            setattr(parent, leaf, nn.Identity())
            changed.append(name)
            break
    return changed

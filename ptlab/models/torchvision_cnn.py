"""Any torchvision classification model for small (e.g. 32x32) images (``model=torchvision model.arch=<name>``).

``arch`` is any name of ``torchvision.models.list_models(module=torchvision.models)``. ResNets and VGGs
(the paper's families) are ptlab's own small-image variants with a width multiplier; every other
name is built by ``torchvision.models.get_model(arch, weights=None, num_classes=..., **options)``
(``options``: the builder's keyword arguments, e.g. ``width_mult`` of MobileNetV3) and, with
``small_input`` (default), gets the generic stem rule of ``ptlab.models.stem``. An unknown name is a
one-line ``ConfigError`` listing close names. ResNet/VGG adaptation (the usual CIFAR variants):

- ResNet: the 7x7 stride-2 stem conv becomes a 3x3 stride-1 conv and the stem max-pool is removed, so
  a 32x32 image reaches ``layer4`` at 4x4. Blocks, stages and ``fc`` are torchvision's.
- VGG (with BatchNorm, as ``vgg*_bn``): torchvision's conv/pool stack; the 7x7 adaptive pool and the
  4096-wide classifier become a 1x1 adaptive average pool and one ``Linear`` (a 32x32 image is 1x1
  after the five max-pools).
- ``width`` scales every channel count (``round(c * width)``, at least 1): ``width=0.25`` turns
  64/128/256/512 into 16/32/64/128, for fast CPU runs. ``width=1`` keeps torchvision's widths.

Weights are random (torchvision's init, drawn from torch's global RNG) unless ``weights_path`` names a
local ``state_dict`` file: every tensor whose name and shape match is loaded, the rest keep their init
(an ImageNet checkpoint thus loads all but the adapted stem and the head).
"""

from __future__ import annotations

import difflib
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn
from torchvision.models import VGG, ResNet
from torchvision.models.resnet import BasicBlock, Bottleneck
from torchvision.models.vgg import cfgs as VGG_LAYOUTS
from torchvision.models.vgg import make_layers

from ptlab.errors import ConfigError
from ptlab.models.names import PTLAB_CNNS
from ptlab.models.stem import adapt_stem
from ptlab.models.weights import read_state_dict

RESNET_LAYOUTS: dict[str, tuple[type[BasicBlock | Bottleneck], list[int]]] = {
    "resnet18": (BasicBlock, [2, 2, 2, 2]),
    "resnet34": (BasicBlock, [3, 4, 6, 3]),
    "resnet50": (Bottleneck, [3, 4, 6, 3]),
    "resnet101": (Bottleneck, [3, 4, 23, 3]),
    "resnet152": (Bottleneck, [3, 8, 36, 3]),
}
VGG_NAMES = {"vgg11": "A", "vgg13": "B", "vgg16": "D", "vgg19": "E"}
ARCHS = PTLAB_CNNS


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class SmallImageResNet(ResNet):
    """torchvision's ``ResNet`` with a 3x3 stride-1 stem, no stem max-pool, and channels scaled by ``width``."""

    def __init__(
        self, block: type[BasicBlock | Bottleneck], layers: list[int], num_classes: int, width: float = 1.0, **kwargs: Any
    ) -> None:
        self.width = width
        self._stem_width = scaled(64, width)
        super().__init__(block, layers, num_classes=num_classes, **kwargs)
        self.conv1 = nn.Conv2d(3, self._stem_width, kernel_size=3, stride=1, padding=1, bias=False)
        nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.bn1 = self._norm_layer(self._stem_width)
        self.maxpool = nn.Identity()
        self.fc = nn.Linear(scaled(512, width) * block.expansion, num_classes)

    def _make_layer(
        self, block: type[BasicBlock | Bottleneck], planes: int, blocks: int, stride: int = 1, dilate: bool = False
    ) -> nn.Sequential:
        if planes == 64:  # layer1: the stem's output width feeds it
            self.inplanes = self._stem_width
        return super()._make_layer(block, scaled(planes, self.width), blocks, stride, dilate)


class SmallImageVGG(VGG):
    """torchvision's ``VGG`` (BatchNorm) with scaled channels, a 1x1 adaptive pool and a linear head.

    ``VGG.__init__`` is skipped because it allocates the 100M-weight 4096-wide classifier that is
    replaced here anyway; the init below is torchvision's own ``init_weights`` rule.
    """

    def __init__(self, layout: str, num_classes: int, width: float = 1.0) -> None:
        nn.Module.__init__(self)
        layers = [v if v == "M" else scaled(int(v), width) for v in VGG_LAYOUTS[layout]]
        self.features = make_layers(layers, batch_norm=True)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(scaled(512, width), num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)


def load_matching_weights(model: nn.Module, weights_path: str) -> list[str]:
    """Load every tensor of the state_dict at ``weights_path`` whose name and shape match; return the
    names of the model's tensors left at init."""
    path = Path(weights_path)
    if not path.is_file():
        raise ConfigError(f"weights_path={weights_path!r} is not allowed: must be an existing state_dict file")
    try:
        state = read_state_dict(path)
    except ValueError as err:
        raise ConfigError(f"weights_path={weights_path!r} is not allowed: {err}") from None
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(usable, strict=False)
    return [k for k in own if k not in usable]


def unknown_name(key: str, name: str, known: list[str]) -> ConfigError:
    """One line: ``name`` is not a model of the library; the closest known names."""
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f"close names: {', '.join(close)}" if close else f"{len(known)} names, e.g. {', '.join(known[:5])}"
    return ConfigError(f"{key}={name!r} is not allowed: not a model of the library ({hint})")


def classification_models() -> list[str]:
    """torchvision's classification model names (its own registry)."""
    import torchvision.models

    return torchvision.models.list_models(module=torchvision.models)


def build_library_cnn(arch: str, num_classes: int, small_input: bool, options: Mapping[str, Any]) -> nn.Module:
    """``torchvision.models.get_model(arch, weights=None, ...)``, stem adapted when ``small_input``."""
    from torchvision.models import get_model

    if arch not in classification_models():
        raise unknown_name("arch", arch, classification_models())
    model = get_model(arch, weights=None, num_classes=num_classes, **dict(options))
    if small_input:
        adapt_stem(model)
    return model


def build_torchvision_cnn(
    arch: str,
    num_classes: int,
    width: float = 1.0,
    weights_path: str | None = None,
    small_input: bool = True,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The torchvision model ``arch`` for ``num_classes`` classes (see the module docstring).

    ``width`` scales ptlab's ResNets/VGGs; other families take their own width keys in ``options``.
    """
    if arch in RESNET_LAYOUTS:
        block, layers = RESNET_LAYOUTS[arch]
        model: nn.Module = SmallImageResNet(block, layers, num_classes=num_classes, width=width)
    elif arch in VGG_NAMES:
        model = SmallImageVGG(VGG_NAMES[arch], num_classes, width)
    elif width != 1.0:
        raise ConfigError(
            f"width={width} is not allowed with arch={arch}: must be 1.0 (width scales "
            f"{', '.join(ARCHS)}; pass a family's own width key in model.options)"
        )
    else:
        model = build_library_cnn(arch, num_classes, small_input, options or {})
    if weights_path:
        left = load_matching_weights(model, weights_path)
        if left:
            warnings.warn(f"{arch}: {len(left)} tensors not in {weights_path} (kept at init), e.g. {left[:3]}", stacklevel=2)
    return model

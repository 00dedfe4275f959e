"""Any timm model (``model=timm model.name=<name>``), built by ``timm.create_model``.

``name`` is any architecture of ``timm.list_models()`` (optionally with a ``.tag`` naming its
pretrained weights); ptlab's DeiT names (``deit_tiny`` ...) map to timm's. ``options`` are keyword
arguments of ``timm.create_model`` (e.g. ``drop_path_rate``, ``img_size`` of a ViT). Weights, in order:
``weights_path`` (a local state dict: a ViT through ``ptlab.models.vit.load_weights``, which resamples
position embeddings; any other model by name and shape, the rest kept at init), ``pretrained=true``
(timm's mechanism, the Hugging Face cache when offline), else timm's fresh init. With
``small_input`` (default) CNNs get the small-image stem rule of ``ptlab.models.stem``; transformers
are left alone. An unknown name is a one-line ``ConfigError`` listing close names.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import timm
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ptlab.models.stem import adapt_stem
from ptlab.models.torchvision_cnn import load_matching_weights, unknown_name
from ptlab.models.vit import DEIT_MODELS, WeightsError, load_weights, missing_weights_message


def timm_arch(name: str) -> str:
    """timm's architecture for ``name`` (ptlab's DeiT names mapped); ``ConfigError`` when timm has none."""
    arch = DEIT_MODELS.get(name, name)
    known = timm.list_models()
    if arch.split(".")[0] not in known:
        raise unknown_name("name", name, known)
    return arch


def build_timm_model(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    weights_path: str | None = None,
    small_input: bool = True,
    options: Mapping[str, Any] | None = None,
) -> nn.Module:
    """The timm model ``name`` for ``num_classes`` classes (see the module docstring)."""
    arch = timm_arch(name)
    kwargs = {"num_classes": num_classes, **dict(options or {})}
    if weights_path:
        model = timm.create_model(arch, pretrained=False, **kwargs)
        if isinstance(model, VisionTransformer):
            load_weights(model, weights_path, arch)
        else:
            left = load_matching_weights(model, weights_path)
            if left:
                warnings.warn(f"{arch}: {len(left)} tensors not in {weights_path} (kept at init), e.g. {left[:3]}", stacklevel=2)
    else:
        try:
            model = timm.create_model(arch, pretrained=pretrained, **kwargs)
        except (OSError, ConnectionError):
            raise WeightsError(missing_weights_message(arch, None)) from None
    if small_input:
        adapt_stem(model)
    return model

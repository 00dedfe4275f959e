"""DeiT vision transformers from timm's own factory, with upstream weights from timm's mechanisms.

``create_vit`` builds a ``timm`` ``VisionTransformer`` (``timm.create_model``) for ``num_classes``
classes at ``img_size``. Weights, in order of precedence:

- ``weights_path``: a local state dict (``.pth``/``.pt``/``.bin`` or ``.safetensors``; a training
  checkpoint holding ``model``/``state_dict`` works too), loaded with ``timm.models.load_checkpoint``
  through timm's ViT checkpoint filter (which resamples the position embedding and patch embedding
  when ``img_size``/``patch_size`` differ) and with the classifier head dropped when its class count
  differs, so an ImageNet (1000-class) file loads into a 10-class model.
- ``pretrained=True``: timm's pretrained mechanism (the Hugging Face hub, or its local cache when
  offline: ``HF_HUB_CACHE``, by default ``~/.cache/huggingface/hub``).
- neither: timm's fresh init (trunc-normal std 0.02 for the linear layers and position embedding).

A weight file that is missing, or a hub that cannot be reached with nothing cached, is a one-line
``WeightsError`` saying what to put where.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models import load_checkpoint
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from ptlab.errors import ConfigError
from ptlab.models.names import DEIT_MODELS

CLASSIFIER_KEYS = ("head.weight", "head.bias")


class WeightsError(ConfigError, FileNotFoundError):
    """Upstream weights that cannot be found or do not fit; the message says what to put where."""


def hub_repo(name: str) -> str:
    """The Hugging Face repo timm downloads ``name``'s default pretrained weights from."""
    cfg = timm.models.get_pretrained_cfg(name)
    return cfg.hf_hub_id if cfg and cfg.hf_hub_id else f"timm/{name}"


def missing_weights_message(name: str, weights_path: str | None) -> str:
    """One line: where the weights of ``name`` were looked for and what to put where."""
    if weights_path:
        return (
            f"weights_path={weights_path!r} does not exist: put a timm state dict of {name} "
            f"(.pth or .safetensors) there, or set weights_path=null pretrained=true "
            f"with {hub_repo(name)} in the Hugging Face cache"
        )
    return (
        f"pretrained=true: cannot reach the Hugging Face hub and {hub_repo(name)} is not in the "
        f"local cache ({timm_cache_dir()}): copy that repo's files into the cache (or set "
        f"HF_HUB_CACHE to a cache holding them), or set weights_path=<a {name} state dict "
        f"(.pth or .safetensors)>"
    )


def timm_cache_dir() -> str:
    """The Hugging Face hub cache timm reads pretrained weights from."""
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


def fit_checkpoint(state_dict: dict[str, torch.Tensor], model: VisionTransformer) -> dict[str, torch.Tensor]:
    """timm's ViT checkpoint filter, then drop the classifier when its class count differs
    (the new head keeps its fresh init, as ``timm.models.load_pretrained`` does)."""
    state_dict = checkpoint_filter_fn(state_dict, model)
    own = model.state_dict()
    for key in CLASSIFIER_KEYS:
        if key in state_dict and key in own and state_dict[key].shape != own[key].shape:
            del state_dict[key]
    return state_dict


def load_weights(model: VisionTransformer, weights_path: str | Path, name: str) -> None:
    """Load ``weights_path`` into ``model`` with timm's ``load_checkpoint``; every tensor but the head
    must fit, else a one-line ``WeightsError``."""
    path = Path(weights_path)
    if not path.is_file():
        raise WeightsError(missing_weights_message(name, str(weights_path)))
    try:
        result = load_checkpoint(model, str(path), strict=False, filter_fn=fit_checkpoint)
    except RuntimeError as err:
        first = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), str(err))
        raise WeightsError(f"weights_path={str(weights_path)!r} does not fit {name}: {first}") from None
    missing = [k for k in result.missing_keys if k not in CLASSIFIER_KEYS]
    if missing or result.unexpected_keys:
        raise WeightsError(
            f"weights_path={str(weights_path)!r} does not fit {name}: {len(missing)} missing tensors "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}) and "
            f"{len(result.unexpected_keys)} unexpected ({', '.join(result.unexpected_keys[:3])})"
        )


def create_vit(
    name: str,
    num_classes: int,
    pretrained: bool = False,
    weights_path: str | None = None,
    img_size: int = 224,
    patch_size: int = 16,
    depth: int = 12,
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
    small_input: bool = True,
    options: Mapping[str, Any] | None = None,
    **timm_kwargs: Any,
) -> VisionTransformer:
    """A timm ViT ``name`` (``deit_base`` or a timm architecture name) for ``num_classes`` classes.

    ``small_input`` is accepted for the ``model=timm`` schema and unused (a ViT takes ``img_size``);
    ``options`` are further ``timm.create_model`` keyword arguments, like ``timm_kwargs``.
    ``img_size``, ``patch_size`` and ``depth`` override the architecture's (timm resamples pretrained
    position and patch embeddings to fit); extra keyword arguments go to ``timm.create_model``.
    """
    arch = DEIT_MODELS.get(name, name)
    kwargs = dict(
        num_classes=num_classes,
        img_size=img_size,
        patch_size=patch_size,
        depth=depth,
        in_chans=in_chans,
        drop_path_rate=drop_path_rate,
        **dict(options or {}),
        **timm_kwargs,
    )
    if weights_path:
        model = timm.create_model(arch, pretrained=False, **kwargs)
        load_weights(model, weights_path, arch)
        return model
    try:
        return timm.create_model(arch, pretrained=pretrained, **kwargs)
    except (OSError, ConnectionError):
        raise WeightsError(missing_weights_message(arch, None)) from None

"""Model names checked before anything is tracked, without loading a library for ptlab's own presets.

torchvision and timm know their model names only once imported, which the CLI's preflight must not do
for the common case. So the names ptlab builds itself (``ptlab.models.names``) pass at once, and only
a config naming another library model imports that library to check the name (a one-line
``ConfigError`` with close names, from the same code the factories use).
"""

from __future__ import annotations

from typing import Any

from ptlab.errors import ConfigError
from ptlab.models.names import DEIT_MODELS, PTLAB_CNNS

TORCHVISION_FACTORY = "ptlab.models.build_torchvision_cnn"
TIMM_FACTORIES = ("ptlab.models.build_timm_model", "ptlab.models.create_vit")


def check_model_name(key: str, model: Any) -> None:
    """``model`` (a model config) names a model its library has; ``ConfigError`` naming ``key`` otherwise."""
    target = model.get("_target_")
    try:
        if target == TORCHVISION_FACTORY and model.get("arch") not in PTLAB_CNNS:
            from ptlab.models.torchvision_cnn import classification_models, unknown_name

            if model.get("arch") not in classification_models():
                raise unknown_name("arch", str(model.get("arch")), classification_models())
        elif target in TIMM_FACTORIES and model.get("name") not in DEIT_MODELS:
            from ptlab.models.timm_model import timm_arch

            timm_arch(str(model.get("name")))
    except ConfigError as err:
        raise ConfigError(f"{key}.{err}") from None

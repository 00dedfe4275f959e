"""Which keys of the ``transfer`` config group reach the transfer adapter."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from omegaconf import DictConfig, OmegaConf

CALLBACK_KEYS = ("kind", "alpha", "selection", "control")
"""Keys ``ParameterTransfer`` takes itself; every other key of a transfer option is an adapter option."""


def adapter_options(transfer: Mapping[str, Any]) -> dict[str, Any]:
    """The keyword arguments of the adapter's constructor: the keys of ``transfer`` beyond
    kind/alpha/selection/control, as plain Python values (``transfer=layers``: layers, position and the
    embedding switches; ``transfer=filters``: none)."""
    options = OmegaConf.to_container(transfer, resolve=True) if isinstance(transfer, DictConfig) else dict(transfer)
    return {key: value for key, value in options.items() if key not in CALLBACK_KEYS}

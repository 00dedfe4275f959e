"""One factory for every model config: ``instantiate`` with the init drawn from a named seed stream."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from hydra.utils import instantiate
from torch import nn

from ptlab.seeding import derive_seed, torch_seed


def build_model(model_cfg: Mapping[str, Any], seed: int, stream: str, **kwargs: Any) -> nn.Module:
    """``instantiate(model_cfg, **kwargs)`` with torch's global RNG seeded from ``derive_seed(seed, stream)``.

    Transfer and scratch both use the ``downstream`` stream, so their fresh weights are identical.
    """
    with torch_seed(derive_seed(seed, stream)):
        return instantiate(model_cfg, **kwargs)

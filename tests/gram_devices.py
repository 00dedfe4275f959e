"""The devices the gram engine's exactness tests run on: the CPU always, CUDA where a GPU is visible (skipped
cleanly otherwise)."""

from __future__ import annotations

import pytest
import torch

CUDA = torch.cuda.is_available()
DEVICES = [
    pytest.param("cpu", id="cpu"),
    pytest.param("cuda", id="cuda", marks=pytest.mark.skipif(not CUDA, reason="no CUDA GPU visible")),
]
"""``@pytest.mark.parametrize("device", DEVICES)``: the value is ``engine.device``."""

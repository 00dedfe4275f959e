"""One ``seed`` drives everything: named sub-seeds keep streams independent and reproducible."""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import torch


def derive_seed(seed: int, *names: str) -> int:
    """A stable 31-bit seed for the stream ``names`` under ``seed`` (same inputs, same seed)."""
    key = "/".join((str(seed), *names)).encode()
    return zlib.crc32(key) & 0x7FFFFFFF


def generator(seed: int, *names: str) -> torch.Generator:
    """A CPU generator seeded with ``derive_seed(seed, *names)``."""
    return torch.Generator().manual_seed(derive_seed(seed, *names))


@contextlib.contextmanager
def torch_seed(seed: int) -> Iterator[None]:
    """Run a block with torch's global RNG seeded, restoring the outer RNG state after it.

    Model constructors (ours, torchvision's, timm's) draw their init from the global RNG; this gives
    them a fixed stream without leaking state into other jobs of a reused worker process.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield

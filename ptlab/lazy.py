"""Package namespaces that import their submodules on first attribute access (PEP 562).

``from ptlab.transfer import ParameterTransfer`` keeps working, but importing ``ptlab.transfer`` (or a
light submodule of it, as the CLI's config check does) no longer loads Lightning, torchvision or timm.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose names live in the submodules ``exports`` names."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        return getattr(importlib.import_module(exports[name]), name)

    def __dir__() -> list[str]:
        return sorted(exports)

    return __getattr__, __dir__

"""Folder checks of the preflight: a folder exists as a writable folder or can be created, on a disk with room
(``ptlab.checks`` for the config's folders, ``ptlab.store_checks`` for artifact locations)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from ptlab.errors import ConfigError

MIN_FREE_BYTES = 16 << 20
"""Below this much free space a folder is refused (a run writes configs, summaries and checkpoints there)."""


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1024 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PB"


def _can_write_in(folder: Path) -> bool:
    """Whether a folder can be made in ``folder`` (tried: permission bits do not tell for root)."""
    try:
        probe = tempfile.mkdtemp(prefix=".ptlab-probe-", dir=folder)
    except OSError:
        return False
    os.rmdir(probe)
    return True


def _writable_dir(path: Path) -> str | None:
    """Why ``path`` cannot be (created as) a writable folder, or ``None``. Creates nothing that stays."""
    path = path.expanduser()
    if path.exists():
        if not path.is_dir():
            return "is a file, not a folder"
        return None if _can_write_in(path) else "is not writable"
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            return "has no existing parent folder"
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be created: {parent} is a file"
    return None if _can_write_in(parent) else f"cannot be created under {parent}"


def check_folder(key: str, value: str | Path, start: Path | None = None) -> None:
    """``key``'s folder exists as a writable folder or can be created."""
    if not str(value):
        raise ConfigError(f"{key}='' is not allowed: must be a folder path")
    path = Path(value).expanduser()
    if not path.is_absolute():
        path = (start or Path.cwd()) / path
    problem = _writable_dir(path) or _too_full(path)
    if problem:
        raise ConfigError(f"{key}={str(value)!r} is not allowed: {path} {problem}")


def _too_full(path: Path) -> str | None:
    """Why the disk of ``path`` (or of its first existing parent) is too full to write to, or ``None``."""
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return None
    return f"is on a disk with {_size(free)} free (at least {_size(MIN_FREE_BYTES)} needed)" if free < MIN_FREE_BYTES else None

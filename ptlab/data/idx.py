"""The IDX format of (Fashion-)MNIST, read with numpy over gzip (no torch, so the preflight can use it).

An IDX file is a big-endian header, ``0x00 0x00 <dtype> <ndim>`` then ``ndim`` uint32 sizes, then the
data; (Fashion-)MNIST's are uint8 (dtype code ``0x08``): images ``(N, 28, 28)`` (ndim 3, magic 2051),
labels ``(N,)`` (ndim 1, magic 2049). Files are found as ``<name>.gz`` (Debian's dataset-fashion-mnist,
the original distribution) or ``<name>`` (torchvision's extracted ``FashionMNIST/raw``), in ``data_dir``
or in ``data_dir/FashionMNIST/raw``.
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

FASHION_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
"""The four files of (Fashion-)MNIST by role."""
NDIM = {"train_x": 3, "train_y": 1, "test_x": 3, "test_y": 1}
UBYTE = 0x08
TORCHVISION_RAW = Path("FashionMNIST") / "raw"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")


class IDXError(ValueError):
    """A file that is not a uint8 IDX file of the expected rank (the message names the file)."""


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb")


def _header(handle: BinaryIO, path: Path) -> tuple[int, ...]:
    """The sizes of an IDX header (errors name the file, not its folder: the caller names the folder)."""
    name = path.name
    head = handle.read(4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise IDXError(f"{name} is not an IDX file (its magic number does not start with two zero bytes)")
    if head[2] != UBYTE:
        raise IDXError(f"{name} holds IDX type 0x{head[2]:02x}, not uint8 (0x08)")
    ndim = head[3]
    sizes = handle.read(4 * ndim)
    if len(sizes) < 4 * ndim:
        raise IDXError(f"{name} ends inside its IDX header")
    return struct.unpack(f">{ndim}I", sizes)


def read_idx_header(path: str | Path) -> tuple[int, ...]:
    """The shape an IDX file declares (reads only its first bytes); ``IDXError`` when it is not uint8 IDX."""
    path = Path(path)
    try:
        with _open(path) as handle:
            return _header(handle, path)
    except (OSError, EOFError) as err:
        raise IDXError(f"{path.name} cannot be read: {err}") from None


def read_idx(path: str | Path) -> np.ndarray:
    """The whole uint8 array of an IDX file, shaped as its header says."""
    path = Path(path)
    try:
        with _open(path) as handle:
            shape = _header(handle, path)
            data = handle.read()
    except (OSError, EOFError) as err:
        raise IDXError(f"{path.name} cannot be read: {err}") from None
    count = int(np.prod(shape)) if shape else 0
    if len(data) < count:
        raise IDXError(f"{path.name} holds {len(data)} bytes of data, its header {shape} needs {count}")
    return np.frombuffer(data, dtype=np.uint8, count=count).reshape(shape)


def find_idx_files(data_dir: str | Path) -> dict[str, Path] | None:
    """The four files by role in ``data_dir`` or its ``FashionMNIST/raw`` (``.gz`` or extracted), or
    ``None`` when any is missing; the files of one folder are never mixed with another's."""
    root = Path(data_dir).expanduser()
    for folder in (root, root / TORCHVISION_RAW):
        found = {}
        for role, name in FASHION_FILES.items():
            for candidate in (folder / f"{name}.gz", folder / name):
                if candidate.is_file():
                    found[role] = candidate
                    break
        if len(found) == len(FASHION_FILES):
            return found
    return None


def fashion_missing_message(data_dir: str | Path) -> str:
    """The one line of a missing Fashion-MNIST (the preflight's and the loader's)."""
    return (
        f"task.data_dir={str(data_dir)!r} is not allowed: no Fashion-MNIST IDX files (train-images-idx3-ubyte"
        f"[.gz] and the other three) in it or its FashionMNIST/raw: run apt-get install dataset-fashion-mnist "
        f"(files in /usr/share/datasets/fashion-mnist), or set task.download=true"
    )


def check_idx_files(files: dict[str, Path]) -> None:
    """Headers only: images ``(N, H, W)`` and labels ``(N,)`` with matching counts per split."""
    shapes = {}
    for role, path in files.items():
        shape = read_idx_header(path)
        if len(shape) != NDIM[role]:
            raise IDXError(f"{path.name} declares shape {shape}, expected {NDIM[role]} dimensions")
        shapes[role] = shape
    for split in ("train", "test"):
        if shapes[f"{split}_x"][0] != shapes[f"{split}_y"][0]:
            raise IDXError(
                f"{files[split + '_x'].name} holds {shapes[split + '_x'][0]} images but "
                f"{files[split + '_y'].name} holds {shapes[split + '_y'][0]} labels"
            )

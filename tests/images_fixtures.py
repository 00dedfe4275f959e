"""Tiny CIFAR-10 / CIFAR-100 data sets written in CIFAR's real on-disk pickle format."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def _dump(path: Path, entry: dict) -> None:
    with path.open("wb") as handle:
        pickle.dump(entry, handle, protocol=2)


def _images(rng: np.random.Generator, n: int) -> np.ndarray:
    """``n`` random images as CIFAR stores them: uint8 rows of 3072 (R plane, G plane, B plane)."""
    return rng.integers(0, 256, size=(n, 3 * 32 * 32), dtype=np.uint8)


def write_cifar10(
    root: Path,
    per_class_train: int = 6,
    per_class_test: int = 4,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """``root/cifar-10-batches-py`` with data_batch_1..5, test_batch and batches.meta; returns what was
    written (``train_x``/``test_x`` as (N, 3, 32, 32) uint8, ``train_y``/``test_y``)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_y = np.repeat(np.arange(10), per_class_train)
    rng.shuffle(train_y)
    train_x = _images(rng, len(train_y))
    for b, part in enumerate(np.array_split(np.arange(len(train_y)), 5), start=1):
        _dump(
            folder / f"data_batch_{b}",
            {
                "batch_label": f"training batch {b} of 5",
                "labels": train_y[part].tolist(),
                "data": train_x[part],
                "filenames": [f"img{i}.png" for i in part],
            },
        )
    test_y = np.repeat(np.arange(10), per_class_test)
    test_x = _images(rng, len(test_y))
    _dump(
        folder / "test_batch",
        {
            "batch_label": "testing batch 1 of 1",
            "labels": test_y.tolist(),
            "data": test_x,
            "filenames": [f"test{i}.png" for i in range(len(test_y))],
        },
    )
    _dump(
        folder / "batches.meta",
        {
            "num_cases_per_batch": 10000,
            "num_vis": 3072,
            "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
        },
    )
    return {
        "train_x": train_x.reshape(-1, 3, 32, 32),
        "train_y": train_y,
        "test_x": test_x.reshape(-1, 3, 32, 32),
        "test_y": test_y,
    }


def write_cifar100(
    root: Path,
    per_class_train: int = 2,
    per_class_test: int = 1,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """``root/cifar-100-python`` with train, test and meta (fine and coarse labels)."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    written = {}
    for split, per_class in (("train", per_class_train), ("test", per_class_test)):
        fine = np.repeat(np.arange(100), per_class)
        rng.shuffle(fine)
        data = _images(rng, len(fine))
        _dump(
            folder / split,
            {
                "filenames": [f"{split}{i}.png" for i in range(len(fine))],
                "batch_label": split,
                "fine_labels": fine.tolist(),
                "coarse_labels": (fine // 5).tolist(),
                "data": data,
            },
        )
        written[f"{split}_x"], written[f"{split}_y"] = data.reshape(-1, 3, 32, 32), fine
    _dump(
        folder / "meta",
        {"fine_label_names": [f"fine{i}" for i in range(100)], "coarse_label_names": [f"coarse{i}" for i in range(20)]},
    )
    return written


def idx_bytes(array: np.ndarray) -> bytes:
    """``array`` (uint8) in the IDX format: ``00 00 08 <ndim>``, the sizes as big-endian uint32, the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fashion_mnist(
    folder: Path, per_class_train: int = 6, per_class_test: int = 3, seed: int = 0, gz: bool = True
) -> dict[str, np.ndarray]:
    """The four Fashion-MNIST IDX files (gzipped as Debian ships them, or extracted as torchvision keeps
    them) with random 28x28 images, 10 classes; returns what was written by role."""
    import gzip

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, per_class, prefix in (("train", per_class_train, "train"), ("test", per_class_test, "t10k")):
        labels = np.repeat(np.arange(10, dtype=np.uint8), per_class)
        rng.shuffle(labels)
        images = rng.integers(0, 256, size=(len(labels), 28, 28), dtype=np.uint8)
        for role, name, array in (
            (f"{split}_x", f"{prefix}-images-idx3-ubyte", images),
            (f"{split}_y", f"{prefix}-labels-idx1-ubyte", labels),
        ):
            data = idx_bytes(array)
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
            written[role] = array
    return written

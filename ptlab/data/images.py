"""Real image tasks (docs/design.md section 4): CIFAR-10, CIFAR-100, scikit-learn's handwritten digits and
any folder of class subfolders (``task=image_folder``).

Protocol, the same for every data set:

- Task 2 is the classes ``task.task2_classes``; task 1 is ``task.k`` other classes
  (``task.task1_classes`` when given, else drawn by seed from the classes not in task 2).
- Task 2 trains on ``task.n2`` images and task 1 on ``N1 = round(task.n1_ratio * n2)`` images,
  both balanced per class (class counts differ by at most one) and drawn by seed; the two draws use
  separate seed streams, so task 2's images do not depend on ``n1_ratio`` or on task 1.
- Test sets: every test image of the task's classes, or a balanced ``task.n_test`` of them.
- Labels are re-numbered 0..C-1 in the order of the class list.
- Noise: ``noise.sigma_p1`` / ``noise.sigma_p2`` are standard deviations of Gaussian noise **on the
  0-255 pixel scale**, added once to every image of task 1 / task 2 (train and test) from a seeded
  generator and stored: the data are noisy, not augmented, so each image keeps its noise across
  epochs. Pixels are not clipped (the noise keeps its exact std). Images are then scaled to 0-1 and
  standardised per channel with the fixed ``task.mean`` / ``task.std``.
- Digits: the 1797 bundled 8x8 images (pixel values 0-16) are scaled to 0-255, resized bilinearly to
  ``task.image_size`` (default 32x32, so the torchvision models' five stride-2 steps apply) and
  repeated to 3 channels; the train/test split is a stratified ``task.test_fraction`` split drawn with
  the fixed ``task.split_seed`` (the same for every ``seed``).
- Image folder: torchvision's ``ImageFolder`` over ``task.root`` (one subfolder per class, classes named
  by folder, so ``task2_classes``/``task1_classes`` are folder names); images converted to RGB,
  resized to ``task.image_size`` and split like digits (stratified ``test_fraction``, ``split_seed``).
- Fashion-MNIST: the four IDX files (28x28 grey, 60,000 train / 10,000 test, 10 classes) read with
  numpy over gzip (``ptlab.data.idx``) from ``task.data_dir`` (by default Debian's
  ``/usr/share/datasets/fashion-mnist``, or torchvision's ``FashionMNIST/raw`` below it, which
  ``task.download=true`` fills through torchvision); the official train/test split. Like digits, images
  are resized bilinearly to ``task.image_size`` (32: the VGGs' five stride-2 steps) and repeated to 3
  channels, so the torchvision models run unchanged.
- CIFAR: read with torchvision's loaders from ``task.data_dir``, downloaded only when
  ``task.download=true``. Files are checked for presence (torchvision's per-file md5 check is left
  out, so a subset written in the same format loads through the same code).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset
from torchvision.datasets import CIFAR10, CIFAR100

from ptlab.config import ConfigError, ImageTaskSchema, NoiseSchema
from ptlab.seeding import derive_seed, generator

PIXEL_MAX = 255.0
"""Noise sigmas are in units of this scale (0-255 pixels)."""


class LocalCIFAR10(CIFAR10):
    """torchvision's CIFAR-10 reader, checking that its files exist rather than their md5."""

    train_list = [[name, None] for name, _ in CIFAR10.train_list]
    test_list = [[name, None] for name, _ in CIFAR10.test_list]
    meta = {**CIFAR10.meta, "md5": None}


class LocalCIFAR100(CIFAR100):
    """torchvision's CIFAR-100 reader (fine labels), checking that its files exist rather than their md5."""

    train_list = [[name, None] for name, _ in CIFAR100.train_list]
    test_list = [[name, None] for name, _ in CIFAR100.test_list]
    meta = {**CIFAR100.meta, "md5": None}


CIFAR_READERS = {"cifar10": LocalCIFAR10, "cifar100": LocalCIFAR100}


@dataclass(frozen=True)
class RawImages:
    """A whole data set before the task split: uint8-range float images (N, C, H, W) and int labels."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    class_names: tuple[str, ...] | None = None


@dataclass(frozen=True)
class ImageSet:
    """One split of one task: normalised images ``x`` (N, C, H, W) float32 and labels ``y`` (N,) 0..C-1.

    ``source_index`` is each image's index in the raw split it came from (for checks and provenance).
    """

    x: Tensor
    y: Tensor
    source_index: Tensor

    def __len__(self) -> int:
        return self.x.shape[0]

    def dataset(self) -> TensorDataset:
        return TensorDataset(self.x, self.y)


@dataclass(frozen=True)
class ImageTask:
    """Train and test sets of one task and its classes (raw class ids, in label order)."""

    train: ImageSet
    test: ImageSet
    classes: list[int]

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class ImageTasks:
    """What an image pipeline trains on: task 1 (upstream) and task 2 (downstream)."""

    task1: ImageTask
    task2: ImageTask
    image_size: int
    channels: int


def load_cifar(name: str, data_dir: str | Path, download: bool = False) -> RawImages:
    """CIFAR-10 or CIFAR-100 from ``data_dir`` via torchvision; ``ConfigError`` (one line) when missing."""
    reader = CIFAR_READERS[name]
    root = Path(data_dir)
    try:
        train = reader(root=str(root), train=True, download=download)
        test = reader(root=str(root), train=False, download=download)
    except RuntimeError as err:
        if "not found" not in str(err):
            raise
        raise ConfigError(
            f"task.data_dir={str(data_dir)!r}: no {name.upper()} files in {root / reader.base_folder} "
            f"(put the extracted {reader.filename} there, or set task.download=true)"
        ) from None

    def tensor(data: np.ndarray) -> Tensor:
        return torch.from_numpy(data).permute(0, 3, 1, 2).float()

    return RawImages(
        tensor(train.data),
        torch.tensor(train.targets),
        tensor(test.data),
        torch.tensor(test.targets),
        num_classes=len(train.classes),
    )


@functools.lru_cache(maxsize=2)
def load_fashion_mnist(data_dir: str, image_size: int = 32, download: bool = False) -> RawImages:
    """Fashion-MNIST on the 0-255 scale, resized to ``image_size``, 3 channels, the official split
    (cached per process: sweep jobs share it; callers only index it, never write to it)."""
    from ptlab.data.idx import FASHION_CLASSES, IDXError, fashion_missing_message, find_idx_files, read_idx

    files = find_idx_files(data_dir)
    if files is None and download:
        from torchvision.datasets import FashionMNIST

        FashionMNIST(root=str(data_dir), train=True, download=True)
        files = find_idx_files(data_dir)
    if files is None:
        raise ConfigError(fashion_missing_message(data_dir))
    try:
        arrays = {role: read_idx(path) for role, path in files.items()}
    except IDXError as err:
        raise ConfigError(f"task.data_dir={str(data_dir)!r} is not allowed: {err}") from None

    def images(pixels: np.ndarray) -> Tensor:
        x = torch.from_numpy(pixels.copy()).float()[:, None]
        if x.shape[-1] != image_size or x.shape[-2] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        return x.clamp(0.0, PIXEL_MAX).expand(-1, 3, -1, -1)  # a view: one stored channel, copied when indexed

    return RawImages(
        images(arrays["train_x"]),
        torch.from_numpy(arrays["train_y"].astype(np.int64)),
        images(arrays["test_x"]),
        torch.from_numpy(arrays["test_y"].astype(np.int64)),
        num_classes=len(FASHION_CLASSES),
    )


@functools.lru_cache(maxsize=4)
def load_digits_images(image_size: int = 32, test_fraction: float = 0.3, split_seed: int = 0) -> RawImages:
    """scikit-learn's digits on the 0-255 scale, resized to ``image_size``, 3 channels, stratified split
    (cached per process: sweep jobs and tests share it; callers only index it, never write to it)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32)[:, None] * (PIXEL_MAX / 16.0)
    images = F.interpolate(images, size=(image_size, image_size), mode="bilinear", align_corners=False)
    images = images.clamp(0.0, PIXEL_MAX).expand(-1, 3, -1, -1).contiguous()
    return stratified_split(images, torch.tensor(digits.target), test_fraction, split_seed)


def stratified_split(
    images: Tensor, labels: Tensor, test_fraction: float, split_seed: int, class_names: tuple[str, ...] | None = None
) -> RawImages:
    """Split 0-255 images into train/test, stratified by label with the fixed ``split_seed``."""
    from sklearn.model_selection import train_test_split

    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=test_fraction, random_state=split_seed, stratify=labels.numpy()
    )
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    return RawImages(
        images[train_idx],
        labels[train_idx],
        images[test_idx],
        labels[test_idx],
        num_classes=int(labels.max()) + 1 if class_names is None else len(class_names),
        class_names=class_names,
    )


def load_image_folder(root: str | Path, image_size: int = 32, test_fraction: float = 0.3, split_seed: int = 0) -> RawImages:
    """Every image of torchvision's ``ImageFolder(root)`` as RGB at ``image_size``, split stratified."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    to_tensor = transforms.Compose([transforms.Resize((image_size, image_size)), transforms.PILToTensor()])
    try:
        folder = ImageFolder(str(root), transform=to_tensor)
    except (FileNotFoundError, OSError) as err:
        raise ConfigError(f"task.root={str(root)!r} is not allowed: {str(err).splitlines()[0]}") from None
    images = torch.stack([image for image, _ in folder]).float()
    labels = torch.tensor(folder.targets)
    try:
        return stratified_split(images, labels, test_fraction, split_seed, tuple(folder.classes))
    except ValueError as err:
        raise ConfigError(
            f"task.test_fraction={test_fraction} is not allowed for the {len(labels)} images of "
            f"{root}: {str(err).splitlines()[0]}"
        ) from None


def class_ids(raw: RawImages, classes: Sequence[int | str] | None, key: str) -> list[int] | None:
    """Class ids of ``classes``: folder names mapped through ``raw.class_names``, ids as they are."""
    if classes is None or raw.class_names is None:
        return None if classes is None else [int(c) for c in classes]
    unknown = [str(c) for c in classes if str(c) not in raw.class_names]
    if unknown:
        raise ConfigError(
            f"{key}={[str(c) for c in classes]} is not allowed: {', '.join(unknown)} not among the "
            f"class folders ({', '.join(raw.class_names)})"
        )
    return [raw.class_names.index(str(c)) for c in classes]


def balanced_counts(total: int, n_classes: int) -> list[int]:
    """``total`` split over ``n_classes`` as evenly as possible (the first classes take the remainder)."""
    base, extra = divmod(total, n_classes)
    return [base + (i < extra) for i in range(n_classes)]


def sample_balanced(labels: Tensor, classes: Sequence[int], total: int | None, gen: torch.Generator, key: str) -> Tensor:
    """Indices of a class-balanced random subset of ``total`` images of ``classes`` (all when None).

    ``key`` names the config key in the error when a class has too few images.
    """
    counts = balanced_counts(total, len(classes)) if total is not None else [None] * len(classes)
    picked = []
    for cls, count in zip(classes, counts):
        pool = torch.nonzero(labels == cls).flatten()
        if count is not None and count > len(pool):
            raise ConfigError(
                f"{key}={total} needs {count} images of class {cls}, which has only {len(pool)}: "
                f"must be <= {len(pool) * len(classes)}"
            )
        order = pool[torch.randperm(len(pool), generator=gen)]
        picked.append(order[:count] if count is not None else order.sort().values)
    return torch.cat(picked)


def split_classes(
    num_classes: int, task2_classes: Sequence[int], k: int, task1_classes: Sequence[int] | None, gen: torch.Generator
) -> tuple[list[int], list[int]]:
    """(task-1 classes, task-2 classes), disjoint; task 1 drawn by ``gen`` from the rest when not given."""
    task2 = [int(c) for c in task2_classes]
    bad = [c for c in task2 if not 0 <= c < num_classes]
    if bad or len(set(task2)) != len(task2) or not task2:
        raise ConfigError(f"task.task2_classes={task2} is not allowed: must be distinct class ids in [0, {num_classes})")
    rest = [c for c in range(num_classes) if c not in task2]
    if task1_classes is not None:
        task1 = [int(c) for c in task1_classes]
        if any(c not in rest for c in task1) or len(set(task1)) != len(task1) or len(task1) != k:
            raise ConfigError(
                f"task.task1_classes={task1} is not allowed: must be task.k={k} distinct class ids "
                f"in [0, {num_classes}) outside task.task2_classes"
            )
        return task1, task2
    if not 1 <= k <= len(rest):
        raise ConfigError(f"task.k={k} is not allowed: must be in [1, {len(rest)}]")
    order = torch.randperm(len(rest), generator=gen)[:k].sort().values
    return [rest[i] for i in order.tolist()], task2


def normalise(pixels: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """0-255 images -> ``(x / 255 - mean) / std`` per channel."""
    m = torch.tensor(mean, dtype=pixels.dtype).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=pixels.dtype).view(1, -1, 1, 1)
    return (pixels / PIXEL_MAX - m) / s


def make_image_set(
    images: Tensor,
    labels: Tensor,
    index: Tensor,
    classes: Sequence[int],
    sigma: float,
    gen: torch.Generator,
    mean: Sequence[float],
    std: Sequence[float],
) -> ImageSet:
    """Select ``index``, add fixed N(0, sigma^2) pixel noise (0-255 scale), relabel, normalise."""
    pixels = images[index]
    if sigma > 0:
        pixels = pixels + sigma * torch.randn(pixels.shape, generator=gen)
    relabel = torch.full((int(labels.max()) + 1,), -1, dtype=torch.long)
    relabel[torch.tensor(list(classes))] = torch.arange(len(classes))
    return ImageSet(normalise(pixels, mean, std).contiguous(), relabel[labels[index]], index)


def load_raw(task: ImageTaskSchema) -> RawImages:
    """The raw data set named by ``task.name`` (``task``: the parsed ``task`` group, or its config node)."""
    if task.name == "image_folder":
        return load_image_folder(task.root, task.image_size, task.test_fraction, task.split_seed)
    if task.name == "digits":
        return load_digits_images(task.image_size, task.test_fraction, task.split_seed)
    if task.name == "fashion_mnist":
        return load_fashion_mnist(str(task.data_dir), task.image_size, task.download)
    return load_cifar(task.name, task.data_dir, task.download)


def make_image_tasks(task: ImageTaskSchema, noise: NoiseSchema, seed: int, raw: RawImages | None = None) -> ImageTasks:
    """Both tasks of a spec's ``task`` and ``noise`` groups (or their config nodes) under ``seed`` (see the module
    docstring)."""
    raw = raw if raw is not None else load_raw(task)
    task1_classes, task2_classes = split_classes(
        raw.num_classes,
        class_ids(raw, task.task2_classes, "task.task2_classes"),
        task.k,
        class_ids(raw, task.task1_classes, "task.task1_classes"),
        generator(seed, "images", "classes"),
    )
    n1 = int(np.floor(task.n1_ratio * task.n2 + 0.5))
    built = {}
    for name, classes, n_train, sigma, key in (
        ("task1", task1_classes, n1, noise.sigma_p1, "task.n1_ratio*task.n2"),
        ("task2", task2_classes, task.n2, noise.sigma_p2, "task.n2"),
    ):
        pick = generator(seed, "images", name, "subset")
        train_idx = sample_balanced(raw.train_y, classes, n_train, pick, key)
        test_idx = sample_balanced(raw.test_y, classes, task.n_test, pick, "task.n_test")
        sets = {}
        for split, images, labels, index in (
            ("train", raw.train_x, raw.train_y, train_idx),
            ("test", raw.test_x, raw.test_y, test_idx),
        ):
            sets[split] = make_image_set(
                images, labels, index, classes, sigma, generator(seed, "images", name, split, "noise"), task.mean, task.std
            )
        built[name] = ImageTask(sets["train"], sets["test"], classes)
    return ImageTasks(built["task1"], built["task2"], image_size=raw.train_x.shape[-1], channels=raw.train_x.shape[1])


class ImageDataModule(pl.LightningDataModule):
    """Mini-batches of an in-memory ``ImageSet``: shuffled by a seeded generator for training, the test
    set in order for validation. Batches are sliced from the tensors (no per-image collation)."""

    def __init__(self, train: ImageSet, test: ImageSet, batch_size: int, seed: int = 0, pin_memory: bool = False) -> None:
        super().__init__()
        self.train_set, self.test_set = train, test
        self.batch_size, self.pin_memory = batch_size, pin_memory
        self.shuffle = torch.Generator().manual_seed(seed)

    def _loader(self, data: ImageSet, shuffle: bool) -> DataLoader:
        dataset = data.dataset()
        order = RandomSampler(dataset, generator=self.shuffle) if shuffle else SequentialSampler(dataset)
        return DataLoader(
            dataset, sampler=BatchSampler(order, self.batch_size, drop_last=False), batch_size=None, pin_memory=self.pin_memory
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def eval_dataloader(self, data: ImageSet) -> DataLoader:
        """``data`` in order, for final accuracies."""
        return self._loader(data, shuffle=False)


def image_seed(seed: int, stream: str) -> int:
    """The sub-seed of an image pipeline's ``stream`` (e.g. the batch order of a stage)."""
    return derive_seed(seed, "images", stream)

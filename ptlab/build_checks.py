"""Preflight checks of what a config builds: image data, the model pair and its transfer, the trainer,
weights files, float32 range and the gram engine's memory.

``ptlab.checks.check_paths`` runs ``check_built`` after the file-system checks, so a config whose data,
models or trainer cannot be built stops with one ``ConfigError`` line before anything is tracked. Torch
is imported only where nothing else can tell: a named weights file, a GPU or MPS trainer, a precision
that depends on the device, and a task-1 class draw whose outcome decides whether ``task.n1_ratio`` fits.
Data sets are read by their labels and headers (CIFAR's label pickles, the image folder's file headers
with PIL, digits through scikit-learn); an image folder's files are also decoded once each (``check_decodable``: in
threads, remembered in ``cache.dir`` by path, size and modification time), so an image whose header is fine but whose
pixels are damaged stops the command here, not when the data is loaded after the runs opened.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pickle
import tempfile
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptlab.errors import ConfigError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
"""The files torchvision's ``ImageFolder`` reads (``torchvision.datasets.folder.IMG_EXTENSIONS``; a test checks
the two agree)."""
CIFAR_FILES = {
    "cifar10": (
        "cifar-10-batches-py",
        [f"data_batch_{i}" for i in range(1, 6)],
        ["test_batch"],
        "labels",
        "batches.meta",
        "label_names",
    ),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels", "meta", "fine_label_names"),
}
"""Folder, train and test files, label key, meta file and class-name key of torchvision's CIFAR readers."""
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu")
"""Lightning's accelerator names (its ``ACCELERATOR_REGISTRY`` plus ``gpu`` and ``auto``; a test checks them)."""
FLOAT32_MAX = 3.4028234663852886e38
FLOAT32_GROUPS = ("task", "noise", "model", "upstream_model", "train")
"""Config groups whose floats reach tensors (``theory``, ``cache``, ``resume`` are Python floats)."""
VIT_FACTORY = "ptlab.models.create_vit"
TIMM_FACTORY = "ptlab.models.build_timm_model"
TIMM_VIT_MODULES = ("vision_transformer", "deit")


@dataclass(frozen=True)
class LabelCounts:
    """Images per class of a data set's train and test splits (index = class id), and the class names."""

    train: tuple[int, ...]
    test: tuple[int, ...]
    names: tuple[str, ...]


def _root(value: Any, start: Path | None) -> Path:
    path = Path(str(value)).expanduser()
    return path if path.is_absolute() else (start or Path.cwd()) / path


def _stratified_counts(
    labels: Sequence[int], classes: int, test_fraction: float, split_seed: int, key: str
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Per-class train and test counts of scikit-learn's stratified split, as ``stratified_split`` draws it."""
    import numpy as np
    from sklearn.model_selection import train_test_split

    y = np.asarray(labels)
    try:
        train, test = train_test_split(np.arange(len(y)), test_size=test_fraction, random_state=split_seed, stratify=y)
    except ValueError as err:
        raise ConfigError(f"{key}={test_fraction} is not allowed for these {len(y)} images: {str(err).splitlines()[0]}") from None
    return (tuple(np.bincount(y[train], minlength=classes).tolist()), tuple(np.bincount(y[test], minlength=classes).tolist()))


@functools.lru_cache(maxsize=8)
def digits_counts(test_fraction: float, split_seed: int) -> LabelCounts:
    """scikit-learn's digits by class, split as ``load_digits_images`` splits them."""
    from sklearn.datasets import load_digits

    target = load_digits().target.tolist()
    train, test = _stratified_counts(target, 10, test_fraction, split_seed, "task.test_fraction")
    return LabelCounts(train, test, tuple(str(i) for i in range(10)))


def _read_pickle(path: Path) -> dict:
    try:
        with path.open("rb") as handle:
            return pickle.load(handle, encoding="latin1")
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, AttributeError, ImportError) as err:
        raise ConfigError(
            f"task.data_dir={str(path.parent.parent)!r} is not allowed: {path.name} is not a CIFAR file ({type(err).__name__})"
        ) from None


@functools.lru_cache(maxsize=8)
def cifar_counts(name: str, root: Path, stamp: float) -> LabelCounts:
    """CIFAR's label lists read from its pickles (``stamp``: the folder's mtime, for the cache)."""
    folder, train_files, test_files, label_key, meta_file, names_key = CIFAR_FILES[name]
    names = tuple(_read_pickle(root / folder / meta_file)[names_key])
    counts = []
    for files in (train_files, test_files):
        per_class = [0] * len(names)
        for file in files:
            for label in _read_pickle(root / folder / file)[label_key]:
                per_class[label] += 1
        counts.append(tuple(per_class))
    return LabelCounts(counts[0], counts[1], names)


def fashion_counts(data_dir: Path) -> LabelCounts | None:
    """Fashion-MNIST's labels per class, read from its two label files (70,000 bytes); ``None`` when the files are
    missing (the data check says so in one line)."""
    from ptlab.data.idx import FASHION_CLASSES, find_idx_files, read_idx

    files = find_idx_files(data_dir)
    if files is None:
        return None
    counts = []
    for split in ("train", "test"):
        labels = read_idx(files[f"{split}_y"])
        counts.append(tuple(int((labels == c).sum()) for c in range(len(FASHION_CLASSES))))
    return LabelCounts(counts[0], counts[1], FASHION_CLASSES)


CIFAR_URLS = {
    "cifar10": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    "cifar100": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
}
"""What torchvision's CIFAR readers download (``CIFAR10.url``, ``CIFAR100.url``; a test checks they agree)."""
DOWNLOAD_PROBE_S = 5.0


def check_download(name: str, timeout: float = DOWNLOAD_PROBE_S) -> None:
    """``task.download=true`` with the files absent: the download address answers (one HEAD request)."""
    import urllib.error
    import urllib.request

    url = CIFAR_URLS[name]
    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError as err:
        if err.code < 400 or err.code == 405:  # it answers; HEAD may be refused where GET is served
            return
        raise ConfigError(
            f"task.download=True is not allowed: {url} answers HTTP {err.code}; put the extracted "
            f"{name.upper()} python version in task.data_dir"
        ) from None
    except (urllib.error.URLError, OSError, ValueError) as err:
        reason = getattr(err, "reason", err)
        raise ConfigError(
            f"task.download=True is not allowed: {url} cannot be reached within {timeout:g} s "
            f"({reason}); put the extracted {name.upper()} python version in task.data_dir"
        ) from None


def unreadable_image(path: Path) -> str | None:
    """Why PIL cannot read ``path`` (its header: format, size; then ``verify``, which for PNG checks every chunk's
    CRC, so truncated or damaged pixel data is caught without decoding it), or ``None``."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            width, height = image.size  # parsed from the header
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'unreadable'}"
    return None if width and height else f"an image of {width} x {height} pixels"


def undecodable_image(path: Path) -> str | None:
    """Why ``path`` cannot be loaded as torchvision's ``ImageFolder`` loads it (PIL: the header and ``verify``, then
    the pixels decoded, ``load``: a JPEG or PNG damaged inside its pixel data), or ``None``."""
    from PIL import Image, UnidentifiedImageError

    problem = unreadable_image(path)
    if problem:
        return problem
    try:
        with Image.open(path) as image:
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'undecodable'}"
    return None


DECODED_DIR = "image-checks"
"""The folder under ``cache.dir`` that remembers the files of each image folder that decoded."""


def _decoded_record(root: Path, cache_dir: Path) -> Path:
    return cache_dir / DECODED_DIR / (hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:24] + ".json")


def check_decodable(root: Path, files: Sequence[Path], shown: str, cache_dir: Path | None = None) -> None:
    """Every file of an image folder decodes (``undecodable_image``), in threads (PIL decodes without the GIL); the
    first damaged file in name order is refused in one line. With ``cache_dir``, the files that decoded are
    remembered there by path, size and ``mtime_ns`` (``DECODED``, written by ``write_decoded`` once the preflight
    accepted the command), so a folder is decoded once and a changed or added file again."""
    record = _decoded_record(root, cache_dir) if cache_dir is not None else None
    remembered: dict[str, list[int]] = {}
    if record is not None:
        try:
            loaded = json.loads(record.read_text())
            remembered = loaded if isinstance(loaded, dict) else {}
        except (OSError, ValueError):
            remembered = {}
    stamps = {}
    for file in files:
        stat = file.stat()
        stamps[str(file.relative_to(root))] = [stat.st_size, stat.st_mtime_ns]
    here = _DECODED_HERE.get(root, {})
    todo = [file for file in files if stamps[name := str(file.relative_to(root))] not in (remembered.get(name), here.get(name))]
    if todo:
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1, len(todo))) as pool:
            problems = list(pool.map(undecodable_image, todo))
        for file, problem in zip(todo, problems):
            if problem:
                raise ConfigError(
                    f"task.root={shown!r} is not allowed: {file.relative_to(root)} is not a "
                    f"readable image ({problem}); remove or replace it"
                )
    _DECODED_HERE[root] = stamps
    if record is not None and remembered != stamps:
        DECODED[record] = stamps


_DECODED_HERE: dict[Path, dict[str, list[int]]] = {}
"""The files of each image folder this process decoded (a preflight run twice in one process decodes once)."""


DECODED: dict[Path, dict[str, list[int]]] = {}
"""Records of decoded image folders that ``check_decodable`` found, written by ``write_decoded`` once the whole
preflight accepted the command (a refused command writes nothing)."""


def write_decoded(accepted: bool = True) -> None:
    """Write the pending records of decoded files (``accepted``), or drop them; a record that cannot be written (a
    full disk) only costs the next command the decoding."""
    pending = list(DECODED.items()) if accepted else []
    DECODED.clear()
    for record, stamps in pending:
        partial = None
        try:
            record.parent.mkdir(parents=True, exist_ok=True)
            handle, partial = tempfile.mkstemp(dir=record.parent, suffix=".partial")
            with os.fdopen(handle, "w") as out:
                json.dump(stamps, out)
            os.replace(partial, record)
        except OSError:
            if partial is not None:
                Path(partial).unlink(missing_ok=True)


def class_files(root: Path) -> dict[str, list[Path]]:
    """An image folder's classes as torchvision's ``ImageFolder`` finds them (every subfolder a class) and the files
    with an image suffix below each, in name order."""
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    return {
        name: sorted(
            Path(folder) / file
            for folder, _, names in os.walk(root / name, followlinks=True)
            for file in names
            if file.lower().endswith(IMAGE_EXTENSIONS)
        )
        for name in classes
    }


@functools.lru_cache(maxsize=8)
def folder_counts(root: Path, test_fraction: float, split_seed: int, stamp: float, shown: str = "") -> LabelCounts:
    """An image folder's classes (``class_files``) and images per class, split as ``load_image_folder`` splits.
    ``shown``: ``task.root`` as the config gives it (for messages)."""
    shown = shown or str(root)
    files = class_files(root)
    empty = [name for name, found in files.items() if not found]
    if empty:
        raise ConfigError(
            f"task.root={shown!r} is not allowed: class folder(s) {', '.join(empty)} hold no image "
            f"({', '.join(IMAGE_EXTENSIONS)}); add images or remove the folder"
        )
    labels = [index for index, found in enumerate(files.values()) for _ in found]
    train, test = _stratified_counts(labels, len(files), test_fraction, split_seed, "task.test_fraction")
    return LabelCounts(train, test, tuple(files))


def label_counts(task: Any, start: Path | None = None, cache_dir: Path | None = None) -> LabelCounts | None:
    """Images per class of an image task's data set (``None`` for a CIFAR set that is to be downloaded; ``cache_dir``:
    where an image folder's decoded files are remembered)."""
    if task.name == "digits":
        return digits_counts(float(task.test_fraction), int(task.split_seed))
    if task.name == "image_folder":
        root = _root(task.root, start)
        counts = folder_counts(root, float(task.test_fraction), int(task.split_seed), root.stat().st_mtime, str(task.root))
        check_decodable(root, [file for found in class_files(root).values() for file in found], str(task.root), cache_dir)
        return counts
    root = _root(task.data_dir, start)
    if task.name == "fashion_mnist":
        return fashion_counts(root)
    folder = root / CIFAR_FILES[task.name][0]
    if not folder.is_dir():
        return None
    return cifar_counts(task.name, root, folder.stat().st_mtime)


def balanced_counts(total: int, n_classes: int) -> list[int]:
    """``ptlab.data.images.balanced_counts``: ``total`` over ``n_classes``, the first take the remainder."""
    base, extra = divmod(total, n_classes)
    return [base + (i < extra) for i in range(n_classes)]


def largest_balanced(have: Sequence[int]) -> int:
    """The largest total whose balanced split over these classes (in this order) fits what each holds."""
    low, high = 0, sum(have)
    while low < high:
        mid = (low + high + 1) // 2
        if all(c <= h for c, h in zip(balanced_counts(mid, len(have)), have)):
            low = mid
        else:
            high = mid - 1
    return low


def _class_ids(task: Any, counts: LabelCounts, key: str) -> list[int] | None:
    values = task.get(key)
    if values is None:
        return None
    if task.name != "image_folder":
        return [int(v) for v in values]
    unknown = [str(v) for v in values if str(v) not in counts.names]
    if unknown:
        raise ConfigError(
            f"task.{key}={[str(v) for v in values]} is not allowed: {', '.join(unknown)} not among the "
            f"class folders ({', '.join(counts.names)})"
        )
    return [counts.names.index(str(v)) for v in values]


def _label(counts: LabelCounts, cls: int) -> str:
    return counts.names[cls] if counts.names[cls] != str(cls) else str(cls)


def check_sample(key: str, value: int, classes: Sequence[int], have: Sequence[int], counts: LabelCounts, split: str) -> None:
    """``value`` images drawn balanced over ``classes`` fit what each class holds (at least one each)."""
    if value < len(classes):
        raise ConfigError(
            f"{key}={value} is not allowed: must be >= {len(classes)} (one {split} image per class "
            "at least, balanced over the classes)"
        )
    for cls, count in zip(classes, balanced_counts(value, len(classes))):
        if count > have[cls]:
            raise ConfigError(
                f"{key}={value} is not allowed: it needs {count} {split} images of class "
                f"{_label(counts, cls)}, which holds {have[cls]}: must be <= "
                f"{largest_balanced([have[c] for c in classes])}"
            )


def drawn_task1(num_classes: int, task2: Sequence[int], k: int, seed: int) -> list[int]:
    """Task 1's classes as ``ptlab.data.images.split_classes`` draws them (imports torch)."""
    import torch

    from ptlab.seeding import generator

    rest = [c for c in range(num_classes) if c not in task2]
    order = torch.randperm(len(rest), generator=generator(seed, "images", "classes"))[:k].sort().values
    return [rest[i] for i in order.tolist()]


def check_image_task(task: Any, seed: int, start: Path | None = None, cache_dir: Path | None = None) -> None:
    """Class ids, duplicates, overlap, ``task.k``, and N2, N1 and ``n_test`` against what each class holds."""
    counts = label_counts(task, start, cache_dir)
    if counts is None:
        return
    num = len(counts.names)
    task2 = _class_ids(task, counts, "task2_classes") or []
    if not task2 or len(set(task2)) != len(task2) or any(not 0 <= c < num for c in task2):
        raise ConfigError(
            f"task.task2_classes={list(task.task2_classes)} is not allowed: must be distinct class ids in [0, {num})"
        )
    rest = [c for c in range(num) if c not in task2]
    k = int(task.k)
    task1 = _class_ids(task, counts, "task1_classes")
    if task1 is not None:
        overlap = [_label(counts, c) for c in task1 if c in task2]
        if overlap:
            raise ConfigError(
                f"task.task1_classes={list(task.task1_classes)} is not allowed: {', '.join(overlap)} "
                "also in task.task2_classes; the two tasks must be disjoint"
            )
        if len(set(task1)) != len(task1) or any(not 0 <= c < num for c in task1) or len(task1) != k:
            raise ConfigError(
                f"task.task1_classes={list(task.task1_classes)} is not allowed: must be task.k={k} "
                f"distinct class ids in [0, {num})"
            )
    elif not 1 <= k <= len(rest):
        raise ConfigError(f"task.k={k} is not allowed: must be in [1, {len(rest)}] (the classes outside task.task2_classes)")
    n2 = int(task.n2)
    n1 = math.floor(float(task.n1_ratio) * n2 + 0.5)
    check_sample("task.n2", n2, task2, counts.train, counts, "training")
    if task1 is None:
        share = -(-n1 // k)
        task1 = rest[:k] if min(counts.train[c] for c in rest) >= share else drawn_task1(num, task2, k, seed)
    check_sample("task.n1_ratio*task.n2", n1, task1, counts.train, counts, "training")
    if task.get("n_test") is not None:
        for classes in (task2, task1):
            check_sample("task.n_test", int(task.n_test), classes, counts.test, counts, "test")


def is_vit(model: Any) -> bool | None:
    """Whether a model config builds a vision transformer (``None``: not an image model)."""
    target = model.get("_target_")
    if target == VIT_FACTORY:
        return True
    if target == TIMM_FACTORY:
        import timm  # only for transfer checks on a model=timm config

        vits = {name for module in TIMM_VIT_MODULES for name in timm.list_models(module=module)}
        return str(model.get("name")) in vits
    if target in (None, "ptlab.models.TwoLayerReLUCNN"):
        return None
    return False


def check_transfer_models(cfg: Any) -> None:
    """``transfer=layers`` moves blocks between ViTs, ``transfer=filters`` filters between CNNs."""
    kind = cfg.transfer.kind
    if kind == "none" or cfg.task.name == "synthetic":
        return
    for key in ("upstream_model", "model"):
        vit = is_vit(cfg[key])
        if kind == "layers" and vit is False:
            raise ConfigError(
                f"transfer=layers is not allowed with {key}={_model_name(cfg[key])}: whole-block "
                "transfer needs vision transformers (e.g. model=deit_tiny upstream_model=deit_tiny); "
                "use transfer=filters for CNNs"
            )
        if kind == "filters" and vit:
            raise ConfigError(
                f"transfer=filters is not allowed with {key}={_model_name(cfg[key])}: filter transfer "
                "needs CNNs; use transfer=layers for vision transformers"
            )


def _model_name(model: Any) -> str:
    return str(model.get("arch", model.get("name", model.get("_target_", "?"))))


GRAM_DEVICES = ("cpu", "cuda", "auto")
"""``engine.device`` of ``engine=gram`` (null: follow the trainer, ``gram_device``)."""


def gram_device(cfg: Any) -> str:
    """Where ``engine=gram`` trains, one of ``GRAM_DEVICES``: ``engine.device`` as given, or with ``engine.device=null``
    the trainer's accelerator (``trainer=gpu``: cuda; ``auto``: auto; else cpu). ``cfg``: a ``DictConfig`` or a
    resolved config (read as a mapping)."""
    trainer = cfg.get("trainer")
    return device_choice(cfg["engine"].get("device"), trainer.get("accelerator") if isinstance(trainer, Mapping) else None)


def device_choice(device: str | None, accelerator: str | None) -> str:
    """``gram_device`` from ``engine.device`` and ``trainer.accelerator`` (``None``: cpu)."""
    if device is not None:
        return str(device)
    return "cuda" if accelerator in ("gpu", "cuda") else "auto" if accelerator == "auto" else "cpu"


def check_gram_device(cfg: Any) -> None:
    """``engine=gram`` on cuda (``engine.device=cuda``, or ``trainer=gpu`` with ``engine.device=null``) needs a
    visible CUDA GPU here (torch imported only then)."""
    if gram_device(cfg) != "cuda":
        return
    import torch

    if not torch.cuda.is_available():
        device = cfg.engine.get("device")
        key = (
            f"engine.device={device!r}"
            if device is not None
            else f"trainer.accelerator={cfg.trainer.get('accelerator')!r} (engine.device=null follows it)"
        )
        raise ConfigError(
            f"{key} is not allowed: no CUDA GPU is visible here; use engine.device=cpu or auto "
            "(or hydra.launcher.executor=submitit_slurm to train on the cluster's GPUs)"
        )


def check_trainer(cfg: Any, gpu_elsewhere: bool = False) -> None:
    """Lightning's accelerator names, a GPU (or MPS, TPU) that is there, and a precision the device runs
    (Lightning would run ``16-mixed`` on a CPU as ``bf16-mixed``, so the logged value would not be what ran);
    for ``engine=gram``, ``check_gram_device`` unless the jobs train elsewhere (``gpu_elsewhere``: SLURM)."""
    if cfg.engine.get("name") == "gram":
        if not gpu_elsewhere:
            check_gram_device(cfg)
        return
    trainer = cfg.trainer
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator not in ACCELERATORS:
        raise ConfigError(f"trainer.accelerator={accelerator!r} is not allowed: must be one of {', '.join(ACCELERATORS)}")
    image = cfg.task.name != "synthetic"
    precision = str(cfg.train.precision) if image else "32-true"
    gpus = None
    if accelerator in ("gpu", "cuda") or (accelerator == "auto" and precision in ("16-mixed", "bf16-mixed")):
        import torch  # only when the trainer asks for a GPU (or a GPU would decide the precision)

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if accelerator != "auto" and gpus == 0:
            raise ConfigError(f"trainer.accelerator={accelerator!r} is not allowed: no CUDA GPU is visible here; use trainer=cpu")
        wanted = trainer.get("devices", 1)
        need = len(wanted) if isinstance(wanted, Sequence) and not isinstance(wanted, str) else wanted
        if accelerator != "auto" and isinstance(need, int) and need > gpus:
            raise ConfigError(f"trainer.devices={wanted} is not allowed: {gpus} CUDA GPU(s) visible")
    elif accelerator == "mps":
        import torch

        if not torch.backends.mps.is_available():
            raise ConfigError("trainer.accelerator='mps' is not allowed: no Apple MPS device here; use trainer=cpu")
    elif accelerator == "tpu":
        import importlib.util

        if importlib.util.find_spec("torch_xla") is None:
            raise ConfigError("trainer.accelerator='tpu' is not allowed: torch_xla is not installed; use trainer=cpu")
    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and bool(gpus))
    if image and precision == "16-mixed" and accelerator != "mps" and not on_gpu:
        raise ConfigError(
            "train.precision='16-mixed' is not allowed on a CPU (Lightning would run bf16-mixed): "
            "must be auto, 32-true or bf16-mixed"
        )
    if image and precision == "bf16-mixed" and on_gpu:
        import torch

        if not torch.cuda.is_bf16_supported():
            raise ConfigError(
                "train.precision='bf16-mixed' is not allowed: this GPU has no bfloat16; must be auto, 32-true or 16-mixed"
            )


def check_float32(cfg: Any) -> None:
    """Floats that reach float32 tensors fit float32 (``model.init_std=1e39`` is inf there)."""
    from omegaconf import OmegaConf

    from ptlab.utils import flatten

    synthetic = cfg.task.name == "synthetic"
    if synthetic and cfg.train.dtype != "float32":
        return
    hint = "; or train.dtype=float64" if synthetic else ""
    for group in FLOAT32_GROUPS:
        values = flatten(OmegaConf.to_container(cfg[group], resolve=True)) if group in cfg else {}
        for key, value in values.items():
            for item in value if isinstance(value, list) else [value]:
                if isinstance(item, float) and math.isfinite(item) and abs(item) > FLOAT32_MAX:
                    raise ConfigError(
                        f"{group}.{key}={value} is not allowed: the engine computes in float32, "
                        f"whose largest value is {FLOAT32_MAX:.4g}{hint}"
                    )


def gram_engine_bytes(task: Any, width: int, upstream_width: int, dtype: str) -> int:
    """About the memory the gram engine's matrices take for one cell: the Gram matrix of each task's signal
    directions and training patches ((3 + N) x (3 + N)), the upstream-task-2 cross block, the test sets'
    cross blocks, and the filters' responses to all of them."""
    size = 8 if dtype == "float64" else 4
    n1, n2, n_test = int(task.n1) + 3, int(task.n2) + 3, int(task.n_test)
    blocks = n1 * n1 + n2 * n2 + n1 * n2 + 2 * n_test * (n1 + n2)
    responses = 2 * (2 * int(width) + int(upstream_width)) * (n1 + n2 + 2 * n_test)
    return (blocks + responses) * size


def check_built(cfg: Any, start: Path | None = None, gpu_elsewhere: bool = False) -> None:
    """Every check of this module that applies to ``cfg`` (``gpu_elsewhere``: the gram engine's jobs run on other
    machines, whose GPUs are not checked here)."""
    check_float32(cfg)
    check_transfer_models(cfg)
    check_trainer(cfg, gpu_elsewhere)
    if cfg.task.name != "synthetic":
        cache_dir = _root(cfg.cache.dir, start) if cfg.get("cache") and cfg.cache.enabled else None
        check_image_task(cfg.task, int(cfg.seed), start, cache_dir)

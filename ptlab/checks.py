"""Checks that need more than one config value: finiteness, memory, files and folders, the store.

``validate`` (``ptlab.config``) runs ``check_values`` on every config; the CLI's preflight and
``run_pipeline`` also run ``check_paths`` before anything is tracked, so a config that cannot train
stops with one ``ConfigError`` line naming the key, never with a FAILED run or a traceback. Nothing
here imports torch (except to read a weights file that is named, or to check the name of a library model
that is not one of ptlab's presets) or creates a file.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from omegaconf import DictConfig, OmegaConf

from ptlab.build_checks import (  # noqa: F401 - ptlab.config reads the gram engine's devices from here
    GRAM_DEVICES,
    check_built,
    device_choice,
    gram_device,
)
from ptlab.data.idx import IDXError, check_idx_files, fashion_missing_message, find_idx_files
from ptlab.errors import ConfigError
from ptlab.folder_checks import _size, _too_full, _writable_dir, check_folder
from ptlab.models.name_check import check_model_name
from ptlab.store_checks import (
    MEMORY_NAMES,
    check_database_driver,
    check_http_store,
    check_sqlite_store,
    check_tracking_environment,
)
from ptlab.utils import flatten

TRACKING_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql", "http", "https", "databricks")
"""Tracking URI schemes MLflow 3 stores accept (its file store ``./mlruns`` is refused)."""
DATABASE_SCHEMES = ("postgresql", "mysql", "mssql")
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
"""Free disk space a folder ptlab writes to (outputs, store, cache) must have."""
MEMORY_FRACTION = 0.8
"""A synthetic config may plan for at most this share of the machine's memory."""


def check_finite(cfg: DictConfig) -> None:
    """Every float of the config, in lists too, is finite (``train.lr=inf`` or ``task.u_norm=nan`` cannot train)."""
    for key, value in flatten(OmegaConf.to_container(cfg, resolve=True)).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, float) and not math.isfinite(item):
                raise ConfigError(f"{key}={value} is not allowed: must be a finite number")


def machine_memory() -> int:
    """Bytes of physical memory (0 when the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def synthetic_bytes(task: Any, width: int, upstream_width: int, dtype: str) -> dict[str, int]:
    """About the memory the synthetic data and models of a config take, by the key that drives it:
    the samples (2 patches of d each, float64 while drawn) and the filters (2 m d per model, with
    their gradients and the engine's copies)."""
    d = int(task.d)
    samples = (int(task.n1) + int(task.n2) + 2 * int(task.n_test)) * 2 * d * 8
    filters = 4 * 2 * (2 * int(width) + int(upstream_width)) * d * (8 if dtype == "float64" else 4)
    return {"task.d": samples + filters, "model.width": filters}


def check_memory(cfg: DictConfig, available: int | None = None) -> None:
    """A synthetic config whose data and models would not fit in memory stops here, naming the key."""
    if cfg.task.get("name") != "synthetic":
        return
    available = machine_memory() if available is None else available
    if available <= 0:
        return
    upstream_width = cfg.upstream_model.get("width", cfg.model.width)
    needs = synthetic_bytes(cfg.task, cfg.model.width, upstream_width, cfg.train.dtype)
    if cfg.engine.get("name") == "gram":
        from ptlab.build_checks import gram_engine_bytes

        needs["task.n1"] = gram_engine_bytes(cfg.task, cfg.model.width, upstream_width, cfg.train.dtype)
    parts = {**needs, "task.d": needs["task.d"] - needs["model.width"]}  # the samples apart from the filters
    total = sum(parts.values())
    if total > MEMORY_FRACTION * available:
        key = max(parts, key=parts.get)
        value = OmegaConf.select(cfg, key)
        what = "the gram engine's N x N matrices" if key == "task.n1" else "the synthetic data and models"
        raise ConfigError(f"{key}={value} is not allowed: {what} need about {_size(total)}, this machine has {_size(available)}")


def check_values(cfg: DictConfig) -> None:
    """The checks on values alone (no file system): finiteness and memory."""
    check_finite(cfg)
    check_memory(cfg)


def check_tracking_uri(uri: str, start: Path | None = None, experiment_name: str | None = None) -> None:
    """A tracking URI MLflow 3 can open, whose SQLite file can be written (``ptlab.store_checks``: an MLflow
    store, not damaged, ``experiment_name`` not deleted; a server that answers; a driver that imports), and the
    tracking's environment variables in range."""
    check_tracking_environment(os.environ)
    scheme = uri.split(":", 1)[0].split("+", 1)[0] if ":" in uri else ""
    if scheme not in TRACKING_SCHEMES:
        raise ConfigError(
            f"logger.tracking_uri={uri!r} is not allowed: must start with one of "
            f"{', '.join(s + '://' for s in TRACKING_SCHEMES)} (e.g. sqlite:///mlflow.db), or use "
            "logger=none"
        )
    if scheme == "sqlite":
        prefix = "sqlite:///"
        if not uri.startswith(prefix) or len(uri) == len(prefix):
            raise ConfigError(
                f"logger.tracking_uri={uri!r} is not allowed: a SQLite store is sqlite:///<file> "
                "(relative) or sqlite:////<absolute file>"
            )
        path = Path(uri[len(prefix) :])
        if path.name in MEMORY_NAMES:
            check_sqlite_store(uri, path, experiment_name)
        path = path if path.is_absolute() else (start or Path.cwd()) / path
        if path.exists() and (path.is_dir() or not os.access(path, os.W_OK)):
            raise ConfigError(f"logger.tracking_uri={uri!r} is not allowed: {path} is not a writable file")
        problem = _writable_dir(path.parent) or _too_full(path.parent)
        if problem:
            raise ConfigError(f"logger.tracking_uri={uri!r} is not allowed: its folder {path.parent} {problem}")
        check_sqlite_store(uri, path, experiment_name)
    elif scheme in ("http", "https"):
        check_http_store(uri, experiment_name)
    elif scheme in DATABASE_SCHEMES:
        check_database_driver(uri)


def check_artifact_location(location: str | None, start: Path | None = None) -> None:
    """A local ``logger.artifact_location`` (a path or ``file://``) is a writable folder or can be made one."""
    if not location:
        return
    parsed = urlparse(location)
    if parsed.scheme == "file":
        check_folder("logger.artifact_location", unquote(parsed.path), start)
    elif not parsed.scheme or len(parsed.scheme) == 1:  # a path (or a Windows drive letter)
        check_folder("logger.artifact_location", location, start)


def check_weights(key: str, model: Any) -> None:
    """A named weights file (``model.weights_path``, any suffix) exists, reads as a state dict, and shares at
    least one tensor with the model (``ptlab.models.weights``; imports torch only when a file is named)."""
    weights_path = model.get("weights_path") if hasattr(model, "get") else model
    if not weights_path:
        return
    path = Path(str(weights_path)).expanduser()
    if not path.is_file():
        raise ConfigError(f"{key}.weights_path={weights_path!r} is not allowed: no such file")
    from ptlab.models.weights import check_weights_fit

    check_weights_fit(key, model)


def check_image_folder(task: Any, start: Path | None = None) -> None:
    """``task.root`` is a folder with class subfolders holding files, and the named classes are among them."""
    root_value = task.get("root")
    if not root_value:
        raise ConfigError(f"task.root={root_value!r} is not allowed: must be a folder with one subfolder of images per class")
    root = Path(str(root_value)).expanduser()
    root = root if root.is_absolute() else (start or Path.cwd()) / root
    if not root.is_dir():
        raise ConfigError(f"task.root={str(root_value)!r} is not allowed: no such folder ({root})")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and any(f.is_file() for f in p.rglob("*")))
    if not classes:
        raise ConfigError(f"task.root={str(root_value)!r} is not allowed: {root} has no class subfolders with images")
    for key in ("task2_classes", "task1_classes"):
        unknown = [str(c) for c in task.get(key) or [] if str(c) not in classes]
        if unknown:
            raise ConfigError(
                f"task.{key}={[str(c) for c in task.get(key)]} is not allowed: {', '.join(unknown)} "
                f"not among the class folders of {root_value} ({', '.join(classes)})"
            )


def check_fashion_mnist(task: Any, start: Path | None = None) -> None:
    """Fashion-MNIST's four IDX files are in ``task.data_dir`` (or its ``FashionMNIST/raw``) with sound headers
    (magic numbers and sizes only; the images are not read), unless ``task.download`` may fetch them."""
    root = Path(str(task.data_dir)).expanduser()
    root = root if root.is_absolute() else (start or Path.cwd()) / root
    files = find_idx_files(root)
    if files is None:
        if task.get("download"):
            return
        raise ConfigError(fashion_missing_message(task.data_dir))
    try:
        check_idx_files(files)
    except IDXError as err:
        raise ConfigError(f"task.data_dir={str(task.data_dir)!r} is not allowed: {err}") from None


def check_data(task: Any, start: Path | None = None) -> None:
    """The files of an image task are where ``task.data_dir`` (``task.root``) says (unless it may download them)."""
    if task.get("name") == "image_folder":
        check_image_folder(task, start)
        return
    if task.get("name") == "fashion_mnist":
        check_fashion_mnist(task, start)
        return
    folder = CIFAR_FOLDERS.get(task.get("name"))
    if folder is None:
        return
    root = Path(task.data_dir).expanduser()
    root = root if root.is_absolute() else (start or Path.cwd()) / root
    present = (root / folder).is_dir() and any((root / folder).iterdir())
    if task.get("download"):
        if not present:
            from ptlab.build_checks import check_download

            check_download(task.name)
        return
    if not present:
        raise ConfigError(
            f"task.data_dir={str(task.data_dir)!r} is not allowed: no {folder}/ in {root} (put the "
            f"extracted {task.name.upper()} python version there, or set task.download=true)"
        )


def check_paths(
    cfg: DictConfig,
    output_dir: str | Path | None = None,
    start: Path | None = None,
    output_key: str = "hydra.run.dir",
    gpu_elsewhere: bool = False,
) -> None:
    """The checks on the file system: store, output (``output_key``) and cache folders, data and weights files;
    then what the config builds (``ptlab.build_checks``; ``gpu_elsewhere``: the gram engine trains on a cluster's
    machines, their GPUs are not checked here)."""
    if cfg.logger.kind == "mlflow":
        check_tracking_uri(str(cfg.logger.tracking_uri), start, str(cfg.logger.experiment_name))
        check_artifact_location(cfg.logger.get("artifact_location"), start)
    if cfg.cache.enabled:
        check_folder("cache.dir", cfg.cache.dir, start)
    if output_dir is not None:
        check_folder(output_key, output_dir, start)
    check_data(cfg.task, start)
    for key in ("model", "upstream_model"):
        check_model_name(key, cfg[key])
        check_weights(key, cfg[key])
    check_built(cfg, start, gpu_elsewhere)

"""Upstream cache: the upstream model is trained once per distinct upstream config and reused.

An entry is keyed by the SHA-256 of a canonical JSON "spec" holding everything that changes the
upstream model or its results (task-1 data and its seed stream, upstream model, training settings,
engine, dtype, library versions). The entry file is one JSON header line (format, payload SHA-256
and size, the spec) followed by a ``torch.save`` payload. It is written to a temporary file in the
same folder and moved into place with ``os.replace`` (atomic on POSIX), so a reader sees either no
entry or a whole one. A ``filelock`` beside the entry makes parallel jobs that miss at the same time
train it once: the first trains and stores, the others wait and then load. A load re-hashes the
payload; a truncated or corrupt entry is reported, deleted and retrained, never used; so is a folder where an
entry belongs. An entry that cannot be written (a full disk) is logged and skipped: the trained upstream is used.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from filelock import FileLock, Timeout
from torch import nn

import ptlab
from ptlab.context import job_context
from ptlab.distributed import is_global_zero
from ptlab.engines.base import StageResult
from ptlab.seeding import derive_seed
from ptlab.tracking.base import Tracker

if TYPE_CHECKING:
    from ptlab.config import CacheSchema
    from ptlab.spec import PipelineSpec

log = logging.getLogger(__name__)

FORMAT = "ptlab-upstream-cache/1"
SUFFIX = ".ptc"
CACHE_TAG = "ptlab.cache"


class CacheError(RuntimeError):
    """A cache that cannot be used (lock timeout); the message is one line saying why."""


class CorruptEntry(ValueError):
    """An entry whose header, size or checksum does not match its payload."""


@dataclass(frozen=True)
class CacheEntry:
    """What an upstream stage leaves behind: weights, its result dict and the MLflow run that trained it."""

    state_dict: dict[str, torch.Tensor]
    result: dict[str, Any]
    source: dict[str, str]

    def to_payload(self) -> dict[str, Any]:
        return {"state_dict": self.state_dict, "result_json": json.dumps(self.result), "source_json": json.dumps(self.source)}

    @classmethod
    def from_payload(cls, payload: Mapping[str, Any]) -> CacheEntry:
        return cls(dict(payload["state_dict"]), json.loads(payload["result_json"]), json.loads(payload["source_json"]))


def spec_key(spec: Mapping[str, Any]) -> str:
    """The SHA-256 of ``spec`` as canonical JSON (sorted keys, no whitespace)."""
    canonical = json.dumps(spec, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def encode_entry(entry: CacheEntry, spec: Mapping[str, Any]) -> bytes:
    """Header line + payload bytes."""
    buffer = io.BytesIO()
    torch.save(entry.to_payload(), buffer)
    payload = buffer.getvalue()
    header = {"format": FORMAT, "sha256": hashlib.sha256(payload).hexdigest(), "size": len(payload), "spec": spec}
    return json.dumps(header, sort_keys=True, default=str).encode() + b"\n" + payload


def decode_entry(blob: bytes) -> CacheEntry:
    """Parse and verify an entry; ``CorruptEntry`` when anything does not match."""
    head, sep, payload = blob.partition(b"\n")
    try:
        header = json.loads(head) if sep else None
    except ValueError:
        header = None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise CorruptEntry("unreadable header")
    if len(payload) != header.get("size"):
        raise CorruptEntry(f"payload is {len(payload)} bytes, header says {header.get('size')} (truncated?)")
    if hashlib.sha256(payload).hexdigest() != header.get("sha256"):
        raise CorruptEntry("payload checksum mismatch")
    return CacheEntry.from_payload(torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True))


class UpstreamCache:
    """A folder of verified upstream entries, shared by every job that points at it."""

    def __init__(self, directory: str | Path, lock_timeout: float = 3600.0) -> None:
        self.directory = Path(directory)
        self.lock_timeout = lock_timeout

    def path(self, key: str) -> Path:
        return self.directory / f"{key}{SUFFIX}"

    def load(self, key: str) -> CacheEntry | None:
        """The verified entry of ``key``; ``None`` when absent. A corrupt entry is deleted (and logged)."""
        path = self.path(key)
        if path.exists() and not path.is_file():  # a folder (or another non-file) where the entry belongs
            log.warning("ptlab cache: %s is not a file; removing it and training again", path.name)
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            return None
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        try:
            return decode_entry(blob)
        except CorruptEntry as err:
            log.warning("ptlab cache: dropping corrupt entry %s: %s", path.name, err)
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            return None

    def store(self, key: str, entry: CacheEntry, spec: Mapping[str, Any]) -> Path:
        """Write ``entry`` atomically (temporary file in the same folder, fsync, ``os.replace``)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(key)
        fd, tmp = tempfile.mkstemp(prefix=f".{key[:16]}.", suffix=".tmp", dir=self.directory)
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
            with os.fdopen(fd, "wb") as handle:
                handle.write(encode_entry(entry, spec))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        return path

    @contextlib.contextmanager
    def lock(self, key: str) -> Iterator[None]:
        """Hold the entry's file lock (waits up to ``lock_timeout`` seconds for another job to finish)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        try:
            with FileLock(str(self.path(key)) + ".lock", timeout=self.lock_timeout):
                yield
        except Timeout:
            raise CacheError(
                f"cache.lock_timeout={self.lock_timeout}: another job held the lock of "
                f"{self.path(key).name} longer; raise it or remove a stale lock"
            ) from None

    def get_or_create(
        self, spec: Mapping[str, Any], create: Callable[[], CacheEntry], read_only: bool = False
    ) -> tuple[CacheEntry, bool]:
        """``(entry, hit)``: the stored entry of ``spec``, else ``create()`` run once and stored.

        ``read_only`` (DDP ranks other than 0) looks the entry up without locking or writing.
        """
        key = spec_key(spec)
        entry = self.load(key)
        if entry is not None:
            return entry, True
        if read_only:
            return create(), False
        with self.lock(key):
            entry = self.load(key)
            if entry is not None:
                return entry, True
            entry = create()
            try:
                self.store(key, entry, spec)
            except OSError as err:  # a full or read-only disk: the trained upstream is kept, uncached
                log.warning("ptlab cache: could not store %s (%s); going on without caching it", self.path(key).name, err)
        return entry, False


def cache_dir(cache: CacheSchema, start: Path | None = None) -> Path:
    """``cache.dir``, a relative path taken from ``start`` (default: the directory ptlab was started in)."""
    directory = Path(str(cache.dir)).expanduser()
    if directory.is_absolute():
        return directory
    return (start or job_context().start_dir) / directory


def synthetic_upstream_spec(spec: PipelineSpec, engine: str) -> dict[str, Any]:
    """Everything the synthetic upstream stage depends on, and nothing it does not.

    Task-1 data is drawn before task 2 from the ``data`` seed stream, so ``n2`` and ``sigma_p2`` are
    left out: a sweep over them (or over ``alpha``, ``selection``, the downstream model) shares one
    upstream. ``trainer.devices`` is left out too: which GPU a job ran on does not change the model.
    """
    task, train, trainer = spec.task, spec.train, spec.trainer
    return {
        "stage": "synthetic/upstream",
        "data": {
            "d": task.d,
            "n1": task.n1,
            "n_test": task.n_test,
            "u_norm": task.u_norm,
            "v_norm": task.v_norm,
            "label_noise": task.label_noise,
            "sigma_p1": spec.noise.sigma_p1,
            "seed_stream": derive_seed(spec.seed, "data"),
        },
        "init_seed_stream": derive_seed(spec.seed, "upstream"),
        "model": copy.deepcopy(spec.resolved["upstream_model"]),
        "train": {"lr": train.lr, "steps": train.upstream_steps, "eval_every": train.eval_every, "dtype": train.dtype},
        "engine": engine,
        "trainer": {key: str(trainer.get(key)) for key in ("accelerator", "precision", "deterministic")},
        "versions": {"ptlab": ptlab.__version__, "torch": torch.__version__},
    }


def _source(tracker: Tracker) -> dict[str, str]:
    return {
        "run_id": tracker.children.get("upstream", ""),
        "experiment_id": tracker.experiment_id,
        "tracking_uri": tracker.tracking_uri,
    }


def cached_upstream(
    spec: PipelineSpec, engine: str, tracker: Tracker, model: nn.Module, train: Callable[[], StageResult]
) -> StageResult:
    """The upstream stage through the cache: ``train()`` (which trains ``model``) on a miss, else
    ``model`` loaded from the entry and a ``cached`` ``StageResult`` with the stored ``final`` and ``curves``.

    Tags: ``ptlab.cache`` = hit | miss | off and ``ptlab.cache.key`` on the parent run (and on the
    upstream child run on a miss); a hit links ``ptlab.cache.upstream_run_id`` (and its experiment).
    """
    if not spec.cache.enabled:
        tracker.set_tags({CACHE_TAG: "off"})
        return train()
    upstream = synthetic_upstream_spec(spec, engine)
    key = spec_key(upstream)
    trained: list[StageResult] = []

    def create() -> CacheEntry:
        trained.append(train())
        return CacheEntry(
            {k: v.detach().cpu() for k, v in model.state_dict().items()},
            {"final": trained[0].final, "curves": trained[0].curves},
            _source(tracker),
        )

    cache = UpstreamCache(cache_dir(spec.cache), spec.cache.lock_timeout)
    entry, hit = cache.get_or_create(upstream, create, read_only=not is_global_zero())
    if not hit:
        tracker.set_tags({CACHE_TAG: "miss", f"{CACHE_TAG}.key": key})
        tracker.set_tags({CACHE_TAG: "miss", f"{CACHE_TAG}.key": key}, stage="upstream")
        return trained[0]
    model.load_state_dict(entry.state_dict)
    tracker.set_tags(
        {
            CACHE_TAG: "hit",
            f"{CACHE_TAG}.key": key,
            f"{CACHE_TAG}.upstream_run_id": entry.source.get("run_id", ""),
            f"{CACHE_TAG}.upstream_experiment_id": entry.source.get("experiment_id", ""),
        }
    )
    curves = {name: [tuple(point) for point in points] for name, points in entry.result["curves"].items()}
    return StageResult("upstream", model, dict(entry.result["final"]), curves, steps=spec.train.upstream_steps, cached=True)

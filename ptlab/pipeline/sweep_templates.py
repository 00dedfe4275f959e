"""Which jobs of a sweep the batched launcher can build from one template, and which sweeps the grid layout takes.

A template is a job config composed once per set of group choices and hydra overrides (``ptlab.pipeline.batched``);
its jobs differ from it only in plain ``key=value`` overrides, set into its resolved container. That holds when no
interpolation of the config can give another value in another job: one that reads a value key, or a hydra value that
differs per job (``hydra.job.num``, ``hydra.job.override_dirname``, ``hydra.runtime.output_dir``, ...). The grid
layout needs it (it builds its cells without a config per job); the CLI's preflight checks it before anything is
written. Light: no torch, no MLflow.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ptlab.errors import ConfigError

PER_TEMPLATE_HYDRA = (
    "runtime.choices",
    "runtime.cwd",
    "runtime.version",
    "runtime.version_base",
    "runtime.config_name",
    "run.dir",
    "sweep.dir",
    "job.name",
    "job.config_name",
)
"""Hydra values (``${hydra:<path>}``) that a template fixes for all its jobs: group choices are part of the
template, the others do not depend on a job's value overrides (unless their own interpolations do: checked). Every
other hydra value (``job.num``, ``job.id``, ``job.override_dirname``, ``runtime.output_dir``, ``sweep.subdir``,
``overrides.task``, anything unknown) may differ per job."""


class GridRefused(ConfigError):
    """The grid layout cannot take a sweep (``grid_refusal``'s line): ``tracking=grid`` stops, ``auto`` runs a run
    per cell."""


_HYDRA_CALL = re.compile(r"\$\{\s*hydra\s*:\s*([\w./]+)\s*\}")
_HYDRA_NODE = re.compile(r"(?<![\w.])hydra\.([\w./]+)")


def leaves(node: Any, path: str = "") -> Iterator[tuple[str, Any]]:
    """``(dotted path, value)`` of every leaf of a container (list items by index)."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else None
    if items is None:
        yield path, node
        return
    for key, value in items:
        yield from leaves(value, f"{path}.{key}" if path else str(key))


def node_aliases(raw: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """``(path, target)`` of the leaves that are exactly a reference to another node, ``${target}``."""
    for path, value in leaves(raw):
        found = re.fullmatch(r"\$\{([A-Za-z_][\w.]*)\}", value) if isinstance(value, str) else None
        if found:
            yield path, found.group(1)


def _select(node: Any, path: str) -> Any:
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return None
        node = node[part]
    return node


def reads_swept_key(
    interpolation: str, keys: Sequence[str], hydra: Mapping[str, Any] | None = None, _seen: frozenset[str] = frozenset()
) -> bool:
    """Whether an interpolation string may give another value in another job of its template, whose value
    overrides set ``keys``: it names a key, a node above one (``${model}`` reads ``model.width``) or below one, a
    relative path along one (``${.width}``), or a hydra value outside ``PER_TEMPLATE_HYDRA`` (or one in it whose
    own interpolations in ``hydra``, the raw hydra config, do). Hydra read in any other form counts as reading."""
    paths = _HYDRA_CALL.findall(interpolation)
    rest = _HYDRA_CALL.sub(" ", interpolation)
    paths += _HYDRA_NODE.findall(rest)
    rest = _HYDRA_NODE.sub(" ", rest)
    if re.search(r"\bhydra\b", rest):
        return True
    for path in paths:
        if path in _seen or not any(path == p or path.startswith(f"{p}.") for p in PER_TEMPLATE_HYDRA):
            return True
        if any(
            isinstance(value, str) and "${" in value and reads_swept_key(value, keys, hydra, _seen | {path})
            for _, value in leaves(_select(hydra, path))
        ):
            return True
    for name in re.findall(r"[\w.]+", rest):
        path = name.lstrip(".")
        for key in keys:
            if name.startswith("."):
                if f".{path}." in f".{key}." or f".{key}." in f".{path}.":
                    return True
            elif path == key or key.startswith(f"{path}.") or path.startswith(f"{key}."):
                return True
    return False


def per_job_value(config: DictConfig, value_keys: Sequence[str]) -> str | None:
    """The first ``key=value`` of a composed job config (with its ``hydra`` node) whose value may differ between
    the jobs of its template (its value overrides set ``value_keys``): an interpolation that ``reads_swept_key``,
    or a sweep subdir other than ``${hydra.job.num}``; ``None`` when every job is the template with its values set."""
    hydra = OmegaConf.to_container(config.hydra, resolve=False)
    assert isinstance(hydra, dict)
    subdir = (hydra.get("sweep") or {}).get("subdir")
    if subdir != "${hydra.job.num}":
        return f"hydra.sweep.subdir={subdir}"
    raw = OmegaConf.to_container(OmegaConf.masked_copy(config, [k for k in config if k != "hydra"]), resolve=False)
    assert isinstance(raw, dict)
    aliases = dict(node_aliases(raw))
    for key, value in leaves(raw):
        if isinstance(value, str) and "${" in value and key not in aliases and reads_swept_key(value, value_keys, hydra):
            return f"{key}={value}"
    return None


def grid_refusal(config: DictConfig, value_keys: Sequence[str]) -> str | None:
    """Why the grid layout (``hydra.launcher.tracking=grid``) cannot take the jobs of this template (a composed job
    config with its ``hydra`` node), as one line; ``None`` when it can."""
    prefix = "hydra.launcher.tracking=grid is not allowed for this sweep"
    fallback = "(use hydra.launcher.tracking=runs)"
    engine, task = OmegaConf.select(config, "engine.name"), OmegaConf.select(config, "task.name")
    if engine != "gram" or task != "synthetic":
        return f"{prefix}: every job must be an engine=gram synthetic pipeline, one is engine={engine} task={task} {fallback}"
    value = per_job_value(config, value_keys)
    if value is not None:
        return f"{prefix}: its jobs are built from one config by their values, but {value} may differ per job {fallback}"
    return None

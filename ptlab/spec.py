"""The typed pipeline spec: a composed config parsed once, at the boundary, into read-only typed parts.

The CLI and the launchers compose a ``DictConfig``; ``parse`` checks it (``ptlab.config.validate``) and turns it
into a ``PipelineSpec``. Everything below them (the driver, the recipes, the engines, the upstream cache,
the theory) reads the spec: each group is an instance of its schema (``ptlab.config``: a ``SyntheticTaskSchema``,
a ``TrainSchema``, ...), read-only once parsed, and ``resolved`` is the resolved config as plain containers (what
the config hash, the logged params and the run's config.yaml are made of). A sweep that sets values on a resolved
template builds its specs with ``from_resolved`` and the template's ``schema_types``, without OmegaConf per job.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ptlab.config import (
    CacheSchema,
    DevicesSchema,
    LoggerSchema,
    NoiseSchema,
    RegularizerSchema,
    ResumeSchema,
    TheorySchema,
    TrainSchema,
    TransferabilitySchema,
    TransferSchema,
    validate,
)
from ptlab.errors import ConfigError

TYPED_GROUPS = (
    "task",
    "noise",
    "model",
    "upstream_model",
    "transfer",
    "regularizer",
    "train",
    "theory",
    "cache",
    "resume",
    "devices",
    "transferability",
    "logger",
)
"""The groups parsed into their schema's dataclass."""
MAPPING_GROUPS = ("engine", "trainer")
"""The groups kept as read-only mappings: ``_target_`` configs that ``hydra.utils.instantiate`` builds."""


@dataclass(frozen=True)
class PipelineSpec:
    """One pipeline (upstream -> transfer -> scratch) as the code below the CLI reads it."""

    seed: int
    task: Any
    """``SyntheticTaskSchema`` or an image task's schema (``DigitsTaskSchema``, ...)."""
    noise: NoiseSchema
    model: Any
    """The downstream model: ``ToyCNNSchema``, ``TorchvisionCNNSchema``, ``TimmSchema`` or ``ViTSchema``."""
    upstream_model: Any
    transfer: TransferSchema
    regularizer: RegularizerSchema
    train: TrainSchema
    theory: TheorySchema
    cache: CacheSchema
    resume: ResumeSchema
    devices: DevicesSchema
    transferability: TransferabilitySchema
    logger: LoggerSchema
    engine: Mapping[str, Any]
    trainer: Mapping[str, Any]
    resolved: Mapping[str, Any] = field(repr=False, compare=False)
    """The resolved config without ``hydra`` (plain dicts and lists)."""

    @property
    def synthetic(self) -> bool:
        """Whether this is the synthetic pipeline (the two-layer CNN on the two-patch data)."""
        return self.task.name == "synthetic"

    def model_config(self, stream: str) -> dict[str, Any]:
        """The resolved model config of a seed ``stream``: ``upstream_model`` for ``upstream``, ``model`` for the
        downstream models (what ``hydra.utils.instantiate`` builds)."""
        return dict(self.resolved["upstream_model" if stream == "upstream" else "model"])

    @property
    def engine_name(self) -> str:
        """``engine.name`` (gram or lightning)."""
        return str(self.engine.get("name", ""))


def schema_types(cfg: DictConfig) -> dict[str, type]:
    """Each typed group's schema class in a composed config (what ``from_resolved`` builds)."""
    return {key: OmegaConf.get_type(cfg[key]) for key in TYPED_GROUPS}


def parse(cfg: DictConfig) -> PipelineSpec:
    """Check a composed config (``ConfigError`` naming the first bad key) and parse it into a ``PipelineSpec``."""
    validate(cfg)
    return from_resolved(resolved_config(cfg), schema_types(cfg))


def resolved_config(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config without its ``hydra`` node (whose per-job keys a composed sweep config lacks)."""
    return {
        key: OmegaConf.to_container(cfg[key], resolve=True) if OmegaConf.is_config(cfg[key]) else cfg[key]
        for key in cfg
        if key != "hydra"
    }


def from_resolved(resolved: dict[str, Any], types: Mapping[str, type]) -> PipelineSpec:
    """The spec of a resolved config whose groups have the schema ``types`` (``schema_types`` of the config it was
    resolved from); each schema checks its ranges as it is built."""
    parts: dict[str, Any] = {}
    for key in TYPED_GROUPS:
        parts[key] = _build(types[key], resolved[key], key)
    for key in MAPPING_GROUPS:
        parts[key] = MappingProxyType(copy.deepcopy(resolved.get(key) or {}))
    return PipelineSpec(seed=int(resolved["seed"]), resolved=resolved, **parts)


def _build(schema: type, values: dict[str, Any], key: str) -> Any:
    if not dataclasses.is_dataclass(schema):
        raise ConfigError(f"{key}: expected an option of conf/{key} built on its schema, got {schema.__name__}")
    try:
        node = schema(**copy.deepcopy(values))
    except ConfigError as err:
        raise ConfigError(f"{key}.{err}") from None
    except TypeError as err:
        raise ConfigError(f"{key}: {err}") from None
    return freeze(node)


def freeze(node: Any) -> Any:
    """Make a schema instance read-only (``dataclasses.FrozenInstanceError`` on assignment); returns it."""
    object.__setattr__(node, "_frozen", True)
    return node


def as_dict(node: Any) -> dict[str, Any]:
    """A schema instance as a plain dict (for ``hydra.utils.instantiate`` and for hashing)."""
    return dataclasses.asdict(node)

"""Structured-config schemas for ptlab's Hydra groups, and the range checks behind them.

Each YAML option in ``conf/`` extends one schema below (``defaults: [/schema/<group>@_here_: <name>]``),
so OmegaConf rejects a wrong type while Hydra composes. Ranges are checked by ``validate``, which
builds the dataclasses (running ``__post_init__``) and re-raises the first failure as one
``ConfigError`` line naming the full key and what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value outside its allowed range; the message names the full key."""


def _check(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: must be {allowed}")


def _positive(key: str, value: Any) -> None:
    _check(value > 0, key, "> 0", value)


def _nonnegative(key: str, value: Any) -> None:
    _check(value >= 0, key, ">= 0", value)


def _one_of(key: str, value: Any, options: tuple[str, ...]) -> None:
    _check(value in options, key, "one of " + ", ".join(options), value)


@dataclass
class SyntheticTaskSchema:
    """The two-patch data model of design.md section 1."""

    name: str = "synthetic"
    d: int = 2000
    n1: int = 200
    n2: int = 20
    n_test: int = 1000
    u_norm: float = 2.0
    v_norm: float = 2.0
    label_noise: float = 0.0

    def __post_init__(self) -> None:
        for key in ("d", "n1", "n2", "n_test"):
            _positive(key, getattr(self, key))
        _nonnegative("u_norm", self.u_norm)
        _nonnegative("v_norm", self.v_norm)
        _check(0 <= self.label_noise < 0.5, "label_noise", "in [0, 0.5)", self.label_noise)
        _check(self.d >= 4, "d", ">= 4 (three signal directions plus noise)", self.d)


@dataclass
class NoiseSchema:
    """Noise-patch standard deviations of task 1 (source) and task 2 (target)."""

    sigma_p1: float = 1.0
    sigma_p2: float = 1.0

    def __post_init__(self) -> None:
        _nonnegative("sigma_p1", self.sigma_p1)
        _nonnegative("sigma_p2", self.sigma_p2)


@dataclass
class ToyCNNSchema:
    """The paper's two-layer ReLU CNN: ``width`` filters per output, init N(0, init_std^2)."""

    _target_: str = "ptlab.models.TwoLayerReLUCNN"
    width: int = 40
    init_std: float = 0.01

    def __post_init__(self) -> None:
        _positive("width", self.width)
        _nonnegative("init_std", self.init_std)


SELECTIONS = ("random", "first", "largest_norm")
TRANSFER_KINDS = ("none", "filters")


@dataclass
class TransferSchema:
    """What the downstream model inherits from the upstream model."""

    kind: str = "filters"
    alpha: float = 0.5
    selection: str = "random"

    def __post_init__(self) -> None:
        _one_of("kind", self.kind, TRANSFER_KINDS)
        _check(0.0 <= self.alpha <= 1.0, "alpha", "in [0, 1]", self.alpha)
        _one_of("selection", self.selection, SELECTIONS)


@dataclass
class LoggerSchema:
    """MLflow tracking; ``kind: none`` turns tracking off."""

    kind: str = "mlflow"
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment_name: str = "default"
    artifact_location: Optional[str] = None

    def __post_init__(self) -> None:
        _one_of("kind", self.kind, ("mlflow", "none"))
        _check(bool(self.experiment_name), "experiment_name", "a non-empty string", self.experiment_name)


DTYPES = ("float32", "float64")
ENGINES = ("lightning",)


@dataclass
class TrainSchema:
    """Full-batch gradient descent budgets (design.md section 1)."""

    lr: float = 0.01
    upstream_steps: int = 800
    downstream_steps: int = 400
    eval_every: int = 10
    dtype: str = "float32"

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        _positive("upstream_steps", self.upstream_steps)
        _positive("downstream_steps", self.downstream_steps)
        _positive("eval_every", self.eval_every)
        _one_of("dtype", self.dtype, DTYPES)


@dataclass
class PtlabSchema:
    """The top level; groups are typed by their own schemas."""

    seed: int = 0
    engine: str = "lightning"
    train: TrainSchema = field(default_factory=TrainSchema)
    task: Any = MISSING
    noise: Any = MISSING
    model: Any = MISSING
    upstream_model: Any = MISSING
    transfer: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING

    def __post_init__(self) -> None:
        _one_of("engine", self.engine, ENGINES)


GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "task": {"synthetic": SyntheticTaskSchema},
    "noise": {"gaussian": NoiseSchema},
    "model": {"toy_cnn": ToyCNNSchema},
    "transfer": {"transfer": TransferSchema},
    "logger": {"logger": LoggerSchema},
}
"""Schemas by group and name; other modules add theirs before ``register_configs`` runs."""

VALIDATED_KEYS = ("task", "noise", "model", "upstream_model", "transfer", "logger")


def register_configs() -> None:
    """Store every schema in Hydra's ConfigStore (idempotent)."""
    cs = ConfigStore.instance()
    cs.store(name="ptlab_schema", node=PtlabSchema)
    for group, schemas in GROUP_SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


def _validate_node(node: Any, prefix: str) -> None:
    try:
        OmegaConf.to_object(node)
    except ConfigError as err:
        raise ConfigError(f"{prefix}.{err}" if prefix else str(err)) from None


def validate(cfg: DictConfig) -> None:
    """Check every range in ``cfg``; raise ``ConfigError`` with the first bad key."""
    _check(isinstance(cfg.seed, int) and cfg.seed >= 0, "seed", "an integer >= 0", cfg.seed)
    _one_of("engine", cfg.engine, ENGINES)
    for key in ("train", *VALIDATED_KEYS):
        if isinstance(cfg.get(key), DictConfig):
            _validate_node(cfg[key], key)

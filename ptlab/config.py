"""Structured-config schemas for ptlab's Hydra groups, and the range checks behind them.

Each YAML option in ``conf/`` extends one schema below (``defaults: [/schema/<group>@_here_: <name>]``),
so OmegaConf rejects a wrong type while Hydra composes. Ranges are checked by ``validate``, which
builds the dataclasses (running ``__post_init__``) and re-raises the first failure as one
``ConfigError`` line naming the full key and what is allowed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import FrozenInstanceError, dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import MISSING, DictConfig, OmegaConf, ValueNode

from ptlab.checks import (  # noqa: F401 - the gram engine's devices, defined with the preflight's GPU check
    GRAM_DEVICES,
    check_values,
    device_choice,
    gram_device,
)
from ptlab.errors import ConfigError
from ptlab.transfer.selection import SELECTIONS, build_strategy, selection_label, strategy_class


def _check(ok: bool, key: str, allowed: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} is not allowed: must be {allowed}")


def _positive(key: str, value: Any) -> None:
    _check(value > 0, key, "> 0", value)


def _nonnegative(key: str, value: Any) -> None:
    _check(value >= 0, key, ">= 0", value)


def _one_of(key: str, value: Any, options: tuple[str, ...]) -> None:
    _check(value in options, key, "one of " + ", ".join(options), value)


class Schema:
    """Base of the schemas: an instance is read-only once ``ptlab.spec`` has parsed it (Hydra composes on the
    classes, OmegaConf builds instances while it checks them)."""

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise FrozenInstanceError(f"cannot assign to field {name!r}: a parsed spec is read-only")
        object.__setattr__(self, name, value)


SIGNAL_POSITIONS = ("fixed", "random")
"""``task.signal_position`` (``ptlab.data.synthetic.SIGNAL_POSITIONS``)."""
TEST_SPACES = ("dspace", "response")
"""``task.test_space`` (``ptlab.data.synthetic.TEST_SPACES``)."""
SAMPLINGS = ("dspace", "gram")
"""``task.sampling`` (``ptlab.data.gram_sampling.SAMPLINGS``)."""
TOY_INITS = ("normal", "torch")
TOY_ACTIVATIONS = ("relu", "relu_q", "leaky_relu")
TOY_REDUCTIONS = ("sum", "mean")
"""The two-layer CNN's ``model.init``, ``model.activation`` and reductions (``ptlab.models.two_layer_cnn``, which
imports torch; a test checks the lists agree)."""


@dataclass
class SyntheticTaskSchema(Schema):
    """The two-patch data model of docs/design.md section 1."""

    name: str = "synthetic"
    d: int = 2000
    n1: int = 200
    n2: int = 20
    n_test: int = 1000
    u_norm: float = 2.0
    v_norm: float = 2.0
    label_noise: float = 0.0
    # Variants of the benign-overfitting literature (docs/design.md section 1): noise not projected off the
    # signals; the signal patch at a random position per sample.
    project_noise: bool = True
    signal_position: str = "fixed"
    # Test sets drawn in R^d (dspace) or as responses from their Gaussian law (response; engine=gram only).
    test_space: str = "dspace"
    # Training data and inits drawn in R^d (dspace), or their Gram matrix drawn directly (gram: Wishart/Bartlett,
    # Gaussian inits, needs test_space=response and engine=gram; docs/design.md section 3).
    sampling: str = "dspace"

    def __post_init__(self) -> None:
        for key in ("d", "n1", "n2", "n_test"):
            _positive(key, getattr(self, key))
        _nonnegative("u_norm", self.u_norm)
        _nonnegative("v_norm", self.v_norm)
        _check(0 <= self.label_noise < 0.5, "label_noise", "in [0, 0.5)", self.label_noise)
        _check(self.d >= 4, "d", ">= 4 (three signal directions plus noise)", self.d)
        _one_of("signal_position", self.signal_position, SIGNAL_POSITIONS)
        _one_of("test_space", self.test_space, TEST_SPACES)
        _one_of("sampling", self.sampling, SAMPLINGS)
        _check(
            self.sampling == "dspace" or self.test_space == "response",
            "sampling",
            "dspace unless task.test_space=response (gram sampling draws no test patches in R^d)",
            self.sampling,
        )


@dataclass
class NoiseSchema(Schema):
    """Noise-patch standard deviations of task 1 (source) and task 2 (target)."""

    sigma_p1: float = 1.0
    sigma_p2: float = 1.0

    def __post_init__(self) -> None:
        _nonnegative("sigma_p1", self.sigma_p1)
        _nonnegative("sigma_p2", self.sigma_p2)


@dataclass
class ToyCNNSchema(Schema):
    """The paper's two-layer ReLU CNN: ``width`` filters per output, init N(0, init_std^2)."""

    _target_: str = "ptlab.models.TwoLayerReLUCNN"
    width: int = 40
    init_std: float = 0.01
    # Variants of the benign-overfitting literature (ptlab.models.two_layer_cnn); defaults are the paper's.
    init: str = "normal"
    bias: bool = False
    activation: str = "relu"
    q: float = 2.0
    negative_slope: float = 0.01
    filter_reduction: str = "mean"
    patch_reduction: str = "sum"

    def __post_init__(self) -> None:
        _positive("width", self.width)
        _nonnegative("init_std", self.init_std)
        _one_of("init", self.init, TOY_INITS)
        _one_of("activation", self.activation, TOY_ACTIVATIONS)
        _check(self.q > 1, "q", "> 1 (the exponent of relu_q)", self.q)
        _check(0 <= self.negative_slope < 1, "negative_slope", "in [0, 1)", self.negative_slope)
        _one_of("filter_reduction", self.filter_reduction, TOY_REDUCTIONS)
        _one_of("patch_reduction", self.patch_reduction, TOY_REDUCTIONS)


IMAGE_TASKS = ("cifar10", "cifar100", "digits", "image_folder", "fashion_mnist")


@dataclass
class ImageTaskSchema(Schema):
    """An image task pair (ptlab.data.images): task 2 is ``task2_classes``, task 1 is ``k`` other classes."""

    name: str = "cifar10"
    data_dir: str = "data"
    download: bool = False
    task2_classes: list[int] = field(default_factory=lambda: [3, 5])
    k: int = 8
    task1_classes: Optional[list[int]] = None
    n2: int = 1000
    n1_ratio: float = 2.0
    n_test: Optional[int] = None
    mean: list[float] = field(default_factory=lambda: [0.4914, 0.4822, 0.4465])
    std: list[float] = field(default_factory=lambda: [0.2470, 0.2435, 0.2616])

    def __post_init__(self) -> None:
        _one_of("name", self.name, IMAGE_TASKS)
        _positive("k", self.k)
        _positive("n2", self.n2)
        _positive("n1_ratio", self.n1_ratio)
        _check(self.n_test is None or self.n_test > 0, "n_test", "null (all) or > 0", self.n_test)
        _check(len(self.mean) == 3, "mean", "3 per-channel values", self.mean)
        _check(len(self.std) == 3 and min(self.std) > 0, "std", "3 per-channel values > 0", self.std)


@dataclass
class DigitsTaskSchema(ImageTaskSchema):
    """scikit-learn's digits, resized to ``image_size``, split ``test_fraction`` by ``split_seed``."""

    image_size: int = 32
    test_fraction: float = 0.3
    split_seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.image_size >= 8, "image_size", ">= 8", self.image_size)
        _check(0 < self.test_fraction < 1, "test_fraction", "in (0, 1)", self.test_fraction)
        _nonnegative("split_seed", self.split_seed)


@dataclass
class FashionMNISTTaskSchema(ImageTaskSchema):
    """Fashion-MNIST's IDX files from ``data_dir`` (official split), resized to ``image_size``, 3 channels."""

    name: str = "fashion_mnist"
    data_dir: str = "/usr/share/datasets/fashion-mnist"
    task2_classes: list[int] = field(default_factory=lambda: [0, 6])
    image_size: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(self.image_size >= 8, "image_size", ">= 8", self.image_size)


@dataclass
class ImageFolderTaskSchema(DigitsTaskSchema):
    """Any folder of class subfolders (torchvision ``ImageFolder``, ptlab.data.images): classes by folder
    name, images resized to ``image_size``, split ``test_fraction`` by ``split_seed``."""

    name: str = "image_folder"
    root: Optional[str] = None
    task2_classes: list[str] = field(default_factory=list)
    task1_classes: Optional[list[str]] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(len(self.task2_classes) > 0, "task2_classes", "a list of class folder names", self.task2_classes)


@dataclass
class TorchvisionCNNSchema(Schema):
    """Any torchvision classification model (ptlab.models.torchvision_cnn). ``arch`` is checked against
    torchvision's own list when the model is built (the CLI's check does not import torchvision)."""

    _target_: str = "ptlab.models.build_torchvision_cnn"
    arch: str = "resnet34"
    width: float = 1.0
    weights_path: Optional[str] = None
    small_input: bool = True
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(bool(self.arch), "arch", "a torchvision classification model name", self.arch)
        _positive("width", self.width)


@dataclass
class TimmSchema(Schema):
    """Any timm model (ptlab.models.timm_model); ``name`` is checked against ``timm.list_models()`` when
    the model is built."""

    _target_: str = "ptlab.models.build_timm_model"
    name: str = "resnet18d"
    pretrained: bool = False
    weights_path: Optional[str] = None
    small_input: bool = True
    options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check(bool(self.name), "name", "a timm model name", self.name)


TRANSFER_KINDS = ("none", "filters", "layers")
CONTROLS = ("none", "norm_matched", "shuffled")
"""``transfer.control``: what replaces the inherited units after the copy (``ptlab.transfer.controls.CONTROLS``, which
imports torch; a test checks the lists agree)."""


@dataclass
class TransferSchema(Schema):
    """What the downstream model inherits from the upstream model."""

    kind: str = "filters"
    alpha: float = 0.5
    # A strategy name (its default options) or a node with _target_ and options (conf/transfer/selection).
    selection: Any = "random"
    # What the inherited units hold after the copy (ptlab.transfer.controls): none | norm_matched | shuffled.
    control: str = "none"

    def __post_init__(self) -> None:
        _one_of("kind", self.kind, TRANSFER_KINDS)
        _one_of("control", self.control, CONTROLS)
        _check(0.0 <= self.alpha <= 1.0, "alpha", "in [0, 1]", self.alpha)
        if isinstance(self.selection, Mapping):
            _check(
                isinstance(self.selection.get("_target_"), str),
                "selection",
                "a strategy name or a node with a _target_ (conf/transfer/selection)",
                dict(self.selection),
            )
        else:
            _one_of("selection", self.selection, SELECTIONS.names())


POSITIONS = ("last", "first", "random")


@dataclass
class LayerTransferSchema(TransferSchema):
    """Whole-block transfer between ViTs (ptlab.transfer.vit): ``layers`` by index, or (``layers: null``)
    ``round(alpha * depth)`` blocks at ``position``; switches for the non-block parts (head always new).
    Keys beyond kind/alpha/selection/control are passed to the transfer adapter. ``control`` must be none: the
    controls replace filters (one output channel each), and a block's tensors are not filters."""

    kind: str = "layers"
    alpha: float = 0.25
    layers: Optional[list[int]] = field(default_factory=lambda: [9, 10, 11])
    position: str = "last"
    patch_embed: bool = True
    cls_token: bool = True
    pos_embed: bool = True
    norm: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        _check(
            self.control == "none",
            "control",
            "none with transfer.kind=layers (the controls act on filters: use transfer=filters with a CNN)",
            self.control,
        )
        _one_of("position", self.position, POSITIONS)
        if self.layers is not None:
            _check(
                all(i >= 0 for i in self.layers) and len(set(self.layers)) == len(self.layers),
                "layers",
                "distinct block indices >= 0, or null to use alpha and position",
                list(self.layers),
            )


@dataclass
class ViTSchema(TimmSchema):
    """A timm DeiT (ptlab.models.vit.create_vit), the ``model=timm`` schema with the ViT's shape keys;
    weights from ``weights_path``, else timm's pretrained mechanism when ``pretrained``, else fresh."""

    _target_: str = "ptlab.models.create_vit"
    name: str = "deit_base"
    img_size: int = 224
    patch_size: int = 16
    depth: int = 12
    in_chans: int = 3
    drop_path_rate: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        for key in ("img_size", "patch_size", "depth", "in_chans"):
            _positive(key, getattr(self, key))
        _check(self.img_size % self.patch_size == 0, "img_size", f"a multiple of patch_size={self.patch_size}", self.img_size)
        _check(0.0 <= self.drop_path_rate < 1.0, "drop_path_rate", "in [0, 1)", self.drop_path_rate)
        _check(
            not self.weights_path or Path(self.weights_path).is_file(),
            "weights_path",
            f"an existing file (a timm state dict of {self.name}, .pth or .safetensors), or null to use pretrained",
            self.weights_path,
        )


REGULARIZERS = ("none", "l2sp", "freeze", "lr_scale")
"""The ``regularizer`` group's options (``ptlab.modules.regularizers``, docs/design.md section 8)."""


@dataclass
class RegularizerSchema(Schema):
    """No regulariser on the inherited units (``regularizer=none``)."""

    name: str = "none"

    def __post_init__(self) -> None:
        _one_of("name", self.name, REGULARIZERS)


@dataclass
class L2SPSchema(RegularizerSchema):
    """``lam * ||w - w_inherited||^2`` on the inherited units, ``decay * ||w||^2`` on the transfer model's others
    (``decay: null``: ``lam``)."""

    name: str = "l2sp"
    lam: float = 0.01
    decay: Optional[float] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _nonnegative("lam", self.lam)
        if self.decay is not None:
            _nonnegative("decay", self.decay)


@dataclass
class FreezeSchema(RegularizerSchema):
    """The inherited units fixed for the first ``k`` steps (synthetic) or epochs (image tasks)."""

    name: str = "freeze"
    k: int = 100

    def __post_init__(self) -> None:
        super().__post_init__()
        _nonnegative("k", self.k)


@dataclass
class LRScaleSchema(RegularizerSchema):
    """The inherited units train at ``scale * lr``."""

    name: str = "lr_scale"
    scale: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _nonnegative("scale", self.scale)


@dataclass
class LoggerSchema(Schema):
    """MLflow tracking; ``kind: none`` turns tracking off."""

    kind: str = "mlflow"
    tracking_uri: str = "sqlite:///mlflow.db"
    experiment_name: str = "default"
    artifact_location: Optional[str] = None
    # SQLite stores only: WAL journaling so parallel jobs do not block each other (ptlab.tracking.faults).
    sqlite_wal: bool = True
    # Draw decomposition.png (every stage's curves) on a synthetic pipeline's parent run: about 1 s a run.
    figures: bool = False

    def __post_init__(self) -> None:
        _one_of("kind", self.kind, ("mlflow", "none"))
        _check(bool(str(self.experiment_name).strip()), "experiment_name", "a name that is not blank", self.experiment_name)


DTYPES = ("float32", "float64")
IMAGE_OPTIMIZERS = ("sgd", "adam", "adamw")
IMAGE_SCHEDULERS = ("cosine", "constant")
IMAGE_PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed")


IMAGE_TRAIN_KEYS = (
    "upstream_epochs",
    "downstream_epochs",
    "batch_size",
    "optimizer",
    "momentum",
    "weight_decay",
    "scheduler",
    "precision",
    "progress_bar",
    "eval_every_epochs",
    "warmup_epochs",
    "label_smoothing",
)
"""``train.*`` keys only image pipelines read (the pipeline logs only the keys it reads)."""
SYNTHETIC_TRAIN_KEYS = ("upstream_steps", "downstream_steps", "eval_every", "dtype")
"""``train.*`` keys only synthetic pipelines read."""
SCRATCH_BUDGETS = ("downstream", "matched")
"""``train.scratch_budget``: the scratch stage trains as long as the transfer stage, or upstream + downstream."""


@dataclass
class TrainSchema(Schema):
    """Full-batch gradient descent budgets (docs/design.md section 1)."""

    lr: float = 0.01
    upstream_steps: int = 800
    downstream_steps: int = 400
    eval_every: int = 10
    dtype: str = "float32"
    # Image pipelines (ptlab.pipeline.images); the synthetic pipeline ignores these.
    upstream_epochs: int = 30
    downstream_epochs: int = 30
    batch_size: int = 128
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 5e-4
    scheduler: str = "cosine"
    precision: str = "auto"
    progress_bar: bool = True
    eval_every_epochs: int = 1
    warmup_epochs: int = 0
    label_smoothing: float = 0.0
    # The scratch stage's length: downstream (steps or epochs of the transfer stage) or matched (upstream +
    # downstream: the compute of the transfer pipeline).
    scratch_budget: str = "downstream"

    def __post_init__(self) -> None:
        _positive("lr", self.lr)
        _one_of("scratch_budget", self.scratch_budget, SCRATCH_BUDGETS)
        _positive("upstream_steps", self.upstream_steps)
        _positive("downstream_steps", self.downstream_steps)
        _positive("eval_every", self.eval_every)
        _one_of("dtype", self.dtype, DTYPES)
        _nonnegative("upstream_epochs", self.upstream_epochs)
        _positive("downstream_epochs", self.downstream_epochs)
        _positive("batch_size", self.batch_size)
        _one_of("optimizer", self.optimizer, IMAGE_OPTIMIZERS)
        _check(0 <= self.momentum < 1, "momentum", "in [0, 1)", self.momentum)
        _nonnegative("weight_decay", self.weight_decay)
        _one_of("scheduler", self.scheduler, IMAGE_SCHEDULERS)
        _one_of("precision", self.precision, IMAGE_PRECISIONS)
        _positive("eval_every_epochs", self.eval_every_epochs)
        _nonnegative("warmup_epochs", self.warmup_epochs)
        _check(0.0 <= self.label_smoothing < 1.0, "label_smoothing", "in [0, 1)", self.label_smoothing)


def scratch_length(upstream: int, downstream: int, budget: str) -> int:
    """Steps (or epochs) of the scratch stage under ``train.scratch_budget``: ``downstream``, or ``matched``
    (``upstream + downstream``, the compute of upstream and transfer training together)."""
    _one_of("train.scratch_budget", budget, SCRATCH_BUDGETS)
    return upstream + downstream if budget == "matched" else downstream


@dataclass
class TheorySchema(Schema):
    """The unknown constants of the paper's Theorems 4.2, 4.3 and Proposition 4.4 (ptlab.theory)."""

    c1: float = 1.0
    c3: float = 1.0
    c1_prime: float = 1.0
    c3_prime: float = 1.0
    c4: float = 1.0
    # Proposition 4.4's "Gamma is large": transfer helps when scratch is not near-optimal, transfer is not
    # sub-optimal and Gamma >= c_gamma.
    c_gamma: float = 1.0
    # The first inequality of the negative-transfer chain: S2^2 / U^2 >= c_ratio * alpha N1 s2^2 / (N2 s1^2).
    c_ratio: float = 1.0
    # The fitted phase model (ptlab.phase) whose prediction runs log beside the theory: a YAML file, relative
    # to the config folder unless absolute; "" logs none.
    phase_model: str = "phase_model.yaml"
    # Where the values came from (a calibration's preset, seeds, date and agreement; see conf/theory/).
    source: str = ""

    def __post_init__(self) -> None:
        for key in ("c1", "c3", "c1_prime", "c3_prime", "c4", "c_gamma", "c_ratio"):
            _positive(key, getattr(self, key))
        if self.phase_model not in ("", "phase_model.yaml"):
            from ptlab.paths import config_dir

            path = Path(self.phase_model)
            _check(
                (path if path.is_absolute() else Path(config_dir()) / path).is_file(),
                "phase_model",
                "a phase model file (absolute, or relative to the config folder) or ''",
                self.phase_model,
            )


@dataclass
class CacheSchema(Schema):
    """The upstream cache (ptlab.pipeline.cache): one upstream training per distinct upstream config."""

    enabled: bool = True
    dir: str = ".ptlab_cache"
    lock_timeout: float = 3600.0

    def __post_init__(self) -> None:
        _check(bool(self.dir), "dir", "a non-empty path", self.dir)
        _positive("lock_timeout", self.lock_timeout)


RESUME_MODES = ("multirun", "always", "never")


@dataclass
class ResumeSchema(Schema):
    """Skip a pipeline whose config already has a FINISHED parent run (ptlab.pipeline.resume)."""

    skip_finished: str = "multirun"
    # Image stages save last.ckpt every epoch and an interrupted stage continues from it (ptlab.pipeline.checkpoints).
    from_checkpoints: bool = True

    def __post_init__(self) -> None:
        _one_of("skip_finished", self.skip_finished, RESUME_MODES)


@dataclass
class DevicesSchema(Schema):
    """One GPU per parallel sweep job (ptlab.devices)."""

    per_job: bool = True
    jobs_per_gpu: int = 1

    def __post_init__(self) -> None:
        _positive("jobs_per_gpu", self.jobs_per_gpu)


@dataclass
class TransferabilitySchema(Schema):
    """LogME and LEEP after the transfer, before downstream training (ptlab.pipeline.transferability)."""

    enabled: bool = True
    # a seeded subset of at most this many task-2 training samples is scored
    max_samples: int = 2000

    def __post_init__(self) -> None:
        _check(self.max_samples >= 2, "max_samples", "an integer >= 2", self.max_samples)


@dataclass
class PtlabSchema(Schema):
    """The top level; groups are typed by their own schemas."""

    seed: int = 0
    train: TrainSchema = field(default_factory=TrainSchema)
    theory: TheorySchema = field(default_factory=TheorySchema)
    cache: CacheSchema = field(default_factory=CacheSchema)
    resume: ResumeSchema = field(default_factory=ResumeSchema)
    devices: DevicesSchema = field(default_factory=DevicesSchema)
    transferability: TransferabilitySchema = field(default_factory=TransferabilitySchema)
    task: Any = MISSING
    noise: Any = MISSING
    model: Any = MISSING
    upstream_model: Any = MISSING
    transfer: Any = MISSING
    regularizer: Any = MISSING
    trainer: Any = MISSING
    logger: Any = MISSING
    engine: Any = MISSING


GROUP_SCHEMAS: dict[str, dict[str, type]] = {
    "task": {
        "synthetic": SyntheticTaskSchema,
        "images": ImageTaskSchema,
        "digits": DigitsTaskSchema,
        "image_folder": ImageFolderTaskSchema,
        "fashion_mnist": FashionMNISTTaskSchema,
    },
    "noise": {"gaussian": NoiseSchema},
    "model": {"toy_cnn": ToyCNNSchema, "torchvision_cnn": TorchvisionCNNSchema, "timm": TimmSchema, "vit": ViTSchema},
    "transfer": {"transfer": TransferSchema, "layers": LayerTransferSchema},
    "logger": {"logger": LoggerSchema},
    "regularizer": {"none": RegularizerSchema, "l2sp": L2SPSchema, "freeze": FreezeSchema, "lr_scale": LRScaleSchema},
}
"""Schemas by group and name; other modules add theirs before ``register_configs`` runs."""

VALIDATED_KEYS = ("task", "noise", "model", "upstream_model", "transfer", "regularizer", "logger")


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
    _check(
        isinstance(cfg.get("engine"), DictConfig) and bool(cfg.engine.get("_target_")),
        "engine",
        "an option of conf/engine (lightning, gram) with a _target_",
        cfg.get("engine"),
    )
    for key in ("train", "theory", "cache", "resume", "devices", "transferability", *VALIDATED_KEYS):
        if isinstance(cfg.get(key), DictConfig):
            _validate_node(cfg[key], key)
    _check_model_fits_task(cfg)
    check_trainer(cfg)
    check_selection(cfg)
    if cfg.engine.get("name") == "gram":
        check_gram_engine(cfg)
    else:
        _check_dspace_engine(cfg)
    check_values(cfg)


SYNTHETIC_MODEL = "ptlab.models.TwoLayerReLUCNN"

_LENGTH = (
    "train.upstream_epochs and train.downstream_epochs (image tasks) or train.upstream_steps and "
    "train.downstream_steps (synthetic)"
)
_EVAL = "train.eval_every_epochs (image tasks) or train.eval_every (synthetic)"
STAGE_TRAINER_KEYS = {
    "max_epochs": _LENGTH,
    "min_epochs": _LENGTH,
    "max_steps": _LENGTH,
    "min_steps": _LENGTH,
    "precision": "train.precision (image tasks) or train.dtype (synthetic)",
    "check_val_every_n_epoch": _EVAL,
    "val_check_interval": _EVAL,
    "log_every_n_steps": _EVAL,
    "limit_val_batches": _EVAL,
    "logger": "logger=mlflow or logger=none",
    "callbacks": "a transfer/selection strategy or a registered callback in code, not the trainer config",
}
"""Lightning ``Trainer`` arguments ptlab sets for each stage (``trainer.*`` would be overridden), and ptlab's key
for each; every other ``trainer.*`` key reaches the Trainer as given."""
PROGRESS_BAR = "train.progress_bar (image tasks) or engine.progress_bar (synthetic)"


def check_trainer_overrides(overrides: list[str]) -> None:
    """Refuse a command-line ``trainer.<key>=...`` that ptlab sets for each stage, naming ptlab's key."""
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        name = key.partition(".")[2] if key.startswith("trainer.") else ""
        pointer = PROGRESS_BAR if name == "enable_progress_bar" else STAGE_TRAINER_KEYS.get(name)
        if pointer:
            raise ConfigError(f"trainer.{name}={value} is not allowed: ptlab sets it for each stage; use {pointer}")


def check_trainer(cfg: DictConfig) -> None:
    """``check_trainer_overrides`` for keys a config file (a preset) puts into ``trainer``."""
    trainer = cfg.get("trainer")
    if isinstance(trainer, DictConfig):
        check_trainer_overrides([f"trainer.{key}={trainer[key]}" for key in trainer if key in STAGE_TRAINER_KEYS])


def is_value_override(override: Override, config: DictConfig) -> bool:
    """A plain ``key=value`` on a leaf of the composed ``config`` (not a group choice, not hydra's): applying it to the
    composed config with ``OmegaConf.update`` gives what composing with it gives."""
    key = override.key_or_group
    if override.type != OverrideType.CHANGE or override.is_hydra_override() or override.package is not None:
        return False
    if key in config.hydra.runtime.choices or override.is_sweep_override():
        return False
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(config, parent) if parent else config
    return isinstance(node, DictConfig) and isinstance(node._get_node(leaf, throw_on_missing_key=False), ValueNode)


def check_gram_engine(cfg: Mapping[str, Any]) -> None:
    """What ``engine=gram`` runs: the synthetic task's two-layer CNNs, filter transfer (or none) between equal
    widths; ``ConfigError`` naming the key otherwise. ``cfg``: a ``DictConfig`` or a resolved config (read as a
    mapping)."""
    task, transfer, model, upstream = cfg["task"], cfg["transfer"], cfg["model"], cfg["upstream_model"]
    if task["name"] != "synthetic":
        raise ConfigError(f"task={task['name']} is not allowed with engine=gram: must be synthetic (or engine=lightning)")
    device = cfg["engine"].get("device")
    if device is not None and device not in GRAM_DEVICES:
        raise ConfigError(
            f"engine.device={device!r} is not allowed: must be one of {', '.join(GRAM_DEVICES)} "
            "(or null: follow the trainer, trainer=gpu is cuda)"
        )
    for key in ("model", "upstream_model"):
        target = cfg[key].get("_target_")
        if target != SYNTHETIC_MODEL:
            raise ConfigError(f"{key}._target_={target!r} is not allowed with engine=gram: must be {SYNTHETIC_MODEL}")
    trainer = cfg.get("trainer")
    strategy = trainer.get("strategy") if isinstance(trainer, Mapping) else None
    if strategy not in (None, "auto"):
        raise ConfigError(
            f"trainer.strategy={strategy!r} is not allowed with engine=gram (one CPU process, no trainer): use engine=lightning"
        )
    kind = transfer["kind"]
    if kind not in ("none", "filters"):
        raise ConfigError(f"transfer.kind={kind!r} is not allowed with engine=gram: must be one of none, filters")
    needs = selection_needs(transfer["selection"]) - GRAM_SELECTION_NEEDS if kind == "filters" else set()
    if needs:
        raise ConfigError(
            f"transfer.selection={selection_label(transfer['selection'])} is not allowed with "
            f"engine=gram: it reads the filters' {', '.join(sorted(needs))}, the gram engine holds "
            f"their responses only; use a strategy reading {', '.join(sorted(GRAM_SELECTION_NEEDS))} "
            "or nothing (random, first, uniform, largest_norm, signal, task2_alignment), "
            "or engine=lightning"
        )
    if task.get("test_space", "dspace") != "dspace" or task.get("sampling", "dspace") != "dspace":
        check_gram_cells(cfg)
    if task.get("sampling", "dspace") == "gram":
        for key in ("model", "upstream_model"):
            if cfg[key].get("init", "normal") != "normal":
                raise ConfigError(
                    f"{key}.init={cfg[key].get('init')!r} is not allowed with task.sampling=gram: must be "
                    "normal (the Wishart law holds for Gaussian inits)"
                )
    if kind == "filters" and bool(upstream.get("bias", False)) != bool(model.get("bias", False)):
        raise ConfigError(
            f"upstream_model.bias={upstream.get('bias', False)} is not allowed with engine=gram "
            f"and filter transfer: must equal model.bias={model.get('bias', False)}"
        )
    if kind == "filters" and upstream["width"] != model["width"]:
        raise ConfigError(
            f"upstream_model.width={upstream['width']} is not allowed with engine=gram: filter "
            f"transfer needs equal weight shapes (2, m, d), must equal model.width={model['width']}"
        )


def check_gram_cells(cfg: Mapping[str, Any]) -> None:
    """What ``transfer.control`` the gram engine's cells (``run_cells``: the batched sweep, response-space tests, gram
    sampling) run: ``norm_matched`` with d-space draws and test sets (the random directions' products with the
    task-2 vectors are exact), not ``shuffled`` (a permutation needs the filters' d coordinates, which a cell holds
    as responses). A single ``engine=gram`` run with d-space draws holds its filters in R^d and runs every control.
    ``cfg``: a ``DictConfig`` or a resolved config."""
    transfer, task = cfg["transfer"], cfg["task"]
    control = transfer.get("control", "none") if transfer["kind"] == "filters" else "none"
    spaces = (task.get("test_space", "dspace"), task.get("sampling", "dspace"))
    if control == "shuffled":
        raise ConfigError(
            "transfer.control=shuffled is not allowed with the gram engine's batched cells "
            "(hydra/launcher=ptlab_gram, task.test_space=response, task.sampling=gram): it permutes "
            "the filters' d coordinates, which the gram engine holds as responses; use engine=lightning"
        )
    if control == "norm_matched" and spaces != ("dspace", "dspace"):
        raise ConfigError(
            f"transfer.control=norm_matched is not allowed with engine=gram and task.test_space="
            f"{spaces[0]} task.sampling={spaces[1]}: must be dspace (its random directions are drawn "
            "in R^d), or use engine=lightning"
        )


GRAM_SELECTION_NEEDS = frozenset({"norms", "oracle", "task2"})
"""What the gram engine's plan can give a strategy (``ptlab.transfer.selection.NEEDS``)."""
SYNTHETIC_ONLY_NEEDS = frozenset({"oracle", "task2"})


def selection_needs(spec: Any) -> frozenset[str]:
    """The ``needs`` of the strategy a ``transfer.selection`` value names; ``ConfigError`` if its
    ``_target_`` cannot be imported."""
    try:
        return frozenset(strategy_class(spec).needs)
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(
            f"transfer.selection._target_={spec.get('_target_')!r} cannot be loaded: {str(err).splitlines()[0]}"
        ) from None


def check_selection(cfg: DictConfig) -> None:
    """A filter-selection strategy gets what it reads: the synthetic oracle and task-2 patches exist only
    on the synthetic task, a following BatchNorm only in image CNNs."""
    if cfg.transfer.kind != "filters":
        return
    needs = selection_needs(cfg.transfer.selection)
    name = selection_label(cfg.transfer.selection)
    try:
        build_strategy(cfg.transfer.selection)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    synthetic = cfg.task.name == "synthetic"
    if not synthetic and needs & SYNTHETIC_ONLY_NEEDS:
        raise ConfigError(
            f"transfer.selection={name} is not allowed with task={cfg.task.name}: it reads the "
            "synthetic model's signal directions, must be used with task=synthetic"
        )
    if synthetic and "bn" in needs:
        raise ConfigError(
            f"transfer.selection={name} is not allowed with task=synthetic: the two-layer CNN has no BatchNorm to read"
        )


def _check_dspace_engine(cfg: DictConfig) -> None:
    """Engines other than gram train on d-space inputs, so their test sets must be drawn in d-space too."""
    for key, needs in (("test_space", "response"), ("sampling", "gram")):
        if cfg.task.name == "synthetic" and cfg.task.get(key, "dspace") != "dspace":
            raise ConfigError(
                f"task.{key}={cfg.task[key]!r} is not allowed with engine={cfg.engine.get('name')}: "
                f"must be dspace ({needs} needs engine=gram)"
            )


def _check_model_fits_task(cfg: DictConfig) -> None:
    """The synthetic task trains the two-layer CNN; image tasks train image classifiers."""
    synthetic = cfg.task.name == "synthetic"
    for key in ("model", "upstream_model"):
        target = cfg[key].get("_target_", "")
        if synthetic and target != SYNTHETIC_MODEL:
            raise ConfigError(f"{key}={target!r} is not allowed with task=synthetic: must be toy_cnn")
        if not synthetic and target == SYNTHETIC_MODEL:
            raise ConfigError(
                f"{key}=toy_cnn is not allowed with task={cfg.task.name}: must be an image model "
                f"(e.g. {key}=resnet18_small, vgg11_small, deit_tiny, or +pair=<upstream>_<model>)"
            )

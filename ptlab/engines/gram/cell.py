"""What the gram engine reads of a composed synthetic pipeline config: ``GramCell`` and its shape and data keys
(which cells run as one batched program, which share one draw of data and inits)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig

from ptlab.config import check_gram_cells, check_gram_engine, gram_device, scratch_length
from ptlab.models.two_layer_cnn import ModelForm
from ptlab.modules.regularizers import Regularizer
from ptlab.transfer.selection import spec_key


@dataclass(frozen=True)
class GramCell:
    """The numbers of one synthetic pipeline config that the engine uses (``cfg`` itself rides along)."""

    seed: int
    d: int
    n1: int
    n2: int
    n_test: int
    u_norm: float
    v_norm: float
    label_noise: float
    sigma_p1: float
    sigma_p2: float
    width: int
    init_std: float
    upstream_init_std: float
    lr: float
    upstream_steps: int
    downstream_steps: int
    eval_every: int
    dtype: str
    transfer: bool
    alpha: float
    selection: str
    """``transfer.selection`` as ``spec_key`` writes it (a name, or a node as JSON)."""
    config: Any = field(compare=False, repr=False)
    model_form: ModelForm = ModelForm()
    upstream_form: ModelForm = ModelForm()
    init: str = "normal"
    upstream_init: str = "normal"
    project_noise: bool = True
    signal_position: str = "fixed"
    test_space: str = "dspace"
    sampling: str = "dspace"
    """The config the data and inits are made from: a ``DictConfig`` or its resolved container."""
    device: str = "cpu"
    """``ptlab.config.gram_device``: cpu, cuda or auto (``resolve_device`` where the cell trains)."""
    regularizer: Regularizer = Regularizer()
    """The transfer stage's regulariser: per cell in the batched program, so in neither key."""
    control: str = "none"
    """``transfer.control`` (none, or norm_matched: ``check_gram_cells`` refuses shuffled)."""
    scratch_budget: str = "downstream"
    """``train.scratch_budget``: downstream, or matched (scratch trains upstream + downstream steps)."""
    transferability: bool = True
    """``transferability.enabled``: score the cell before downstream training (``ptlab.engines.gram.scores``)."""
    transferability_samples: int = 2000
    """``transferability.max_samples``."""

    @classmethod
    def from_config(cfg_type, cfg: DictConfig, snapshot: Mapping[str, Any] | None = None) -> GramCell:
        """Read a composed config; ``ConfigError`` naming the key when the gram engine cannot run it.

        ``snapshot`` (the resolved container of ``cfg``) is kept instead of ``cfg`` when ``cfg`` is about to
        change (a sweep re-uses one config object for many jobs)."""
        check_gram_engine(cfg)
        check_gram_cells(cfg)
        transfer = cfg.transfer.kind == "filters"
        task, noise, train = cfg.task, cfg.noise, cfg.train
        return cfg_type(
            seed=int(cfg.seed), d=int(task.d), n1=int(task.n1), n2=int(task.n2), n_test=int(task.n_test),
            u_norm=float(task.u_norm), v_norm=float(task.v_norm), label_noise=float(task.label_noise),
            sigma_p1=float(noise.sigma_p1), sigma_p2=float(noise.sigma_p2), width=int(cfg.model.width),
            init_std=float(cfg.model.init_std), upstream_init_std=float(cfg.upstream_model.init_std),
            lr=float(train.lr), upstream_steps=int(train.upstream_steps),
            downstream_steps=int(train.downstream_steps), eval_every=int(train.eval_every), dtype=str(train.dtype),
            transfer=transfer, alpha=float(cfg.transfer.alpha), selection=spec_key(cfg.transfer.selection),
            config=cfg if snapshot is None else snapshot, model_form=model_form(cfg.model),
            upstream_form=model_form(cfg.upstream_model), init=str(cfg.model.get("init", "normal")),
            upstream_init=str(cfg.upstream_model.get("init", "normal")),
            project_noise=bool(task.get("project_noise", True)), signal_position=str(task.get("signal_position", "fixed")),
            test_space=str(task.get("test_space", "dspace")), sampling=str(task.get("sampling", "dspace")),
            device=gram_device(cfg), regularizer=Regularizer.from_config(cfg.get("regularizer")),
            control=str(cfg.transfer.get("control", "none")) if transfer else "none",
            scratch_budget=str(train.get("scratch_budget", "downstream")), **transferability_fields(cfg))

    @property
    def scratch(self) -> int:
        """Steps of the scratch stage."""
        return scratch_length(self.upstream_steps, self.downstream_steps, self.scratch_budget)

    @property
    def shape_key(self) -> tuple:
        """Cells with equal shape keys run in one batched tensor program (on one device)."""
        return (self.n1, self.n2, self.n_test, self.width, self.upstream_steps, self.downstream_steps,
                self.eval_every, self.dtype, self.transfer, self.model_form, self.upstream_form, self.device,
                self.control, self.scratch)

    @property
    def data_key(self) -> tuple:
        """Cells with equal data keys share data, inits and Gram matrices (they differ in norms, lr, alpha)."""
        return (*self.shape_key, self.seed, self.d, self.label_noise, self.sigma_p1, self.sigma_p2,
                self.init_std, self.upstream_init_std, self.init, self.upstream_init, self.project_noise,
                self.signal_position, self.test_space, self.sampling)


def resolve_device(choice: str) -> torch.device:
    """The torch device of a ``GramCell.device`` in this process: ``auto`` is cuda where a GPU is visible;
    ``RuntimeError`` for cuda without one (the preflight refuses that before anything is tracked)."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("engine.device='cuda': no CUDA GPU is visible in this process")
    return torch.device("cuda")


def model_form(model_cfg: Any) -> ModelForm:
    """The ``ModelForm`` of a two-layer CNN config (keys it lacks take the paper's values)."""
    defaults = ModelForm()
    return ModelForm(**{key: type(getattr(defaults, key))(model_cfg.get(key, getattr(defaults, key)))
                        for key in ModelForm.__dataclass_fields__})


def transferability_fields(cfg: Any) -> dict[str, Any]:
    """``GramCell``'s ``transferability`` fields from the config's group (the schema's defaults where it is absent)."""
    group = cfg.get("transferability") or {}
    return {"transferability": bool(group.get("enabled", True)),
            "transferability_samples": int(group.get("max_samples", 2000))}

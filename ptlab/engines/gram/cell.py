"""What the gram engine reads of a composed synthetic pipeline config: ``GramCell`` and its shape and data keys
(which cells run as one batched program, which share one draw of data and inits)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ptlab.config import check_gram_cells, check_gram_engine, gram_device, scratch_length
from ptlab.models.two_layer_cnn import ModelForm
from ptlab.modules.regularizers import Regularizer
from ptlab.transfer.selection import spec_key

if TYPE_CHECKING:
    from ptlab.spec import PipelineSpec


@dataclass(frozen=True)
class GramCell:
    """The numbers of one synthetic pipeline spec that the engine uses."""

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
    model_form: ModelForm = ModelForm()
    upstream_form: ModelForm = ModelForm()
    init: str = "normal"
    upstream_init: str = "normal"
    project_noise: bool = True
    signal_position: str = "fixed"
    test_space: str = "dspace"
    sampling: str = "dspace"
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
    def from_spec(cls, spec: PipelineSpec) -> GramCell:
        """Read a pipeline spec; ``ConfigError`` naming the key when the gram engine cannot run it."""
        resolved = spec.resolved
        check_gram_engine(resolved)
        check_gram_cells(resolved)
        transfer = spec.transfer.kind == "filters"
        task, noise, train, model, upstream = spec.task, spec.noise, spec.train, spec.model, spec.upstream_model
        return cls(
            seed=int(spec.seed),
            d=int(task.d),
            n1=int(task.n1),
            n2=int(task.n2),
            n_test=int(task.n_test),
            u_norm=float(task.u_norm),
            v_norm=float(task.v_norm),
            label_noise=float(task.label_noise),
            sigma_p1=float(noise.sigma_p1),
            sigma_p2=float(noise.sigma_p2),
            width=int(model.width),
            init_std=float(model.init_std),
            upstream_init_std=float(upstream.init_std),
            lr=float(train.lr),
            upstream_steps=int(train.upstream_steps),
            downstream_steps=int(train.downstream_steps),
            eval_every=int(train.eval_every),
            dtype=str(train.dtype),
            transfer=transfer,
            alpha=float(spec.transfer.alpha),
            selection=spec_key(resolved["transfer"]["selection"]),
            model_form=model_form(model),
            upstream_form=model_form(upstream),
            init=str(model.init),
            upstream_init=str(upstream.init),
            project_noise=bool(task.project_noise),
            signal_position=str(task.signal_position),
            test_space=str(task.test_space),
            sampling=str(task.sampling),
            device=gram_device(resolved),
            regularizer=Regularizer.from_config(spec.regularizer),
            control=str(spec.transfer.control) if transfer else "none",
            scratch_budget=str(train.scratch_budget),
            transferability=bool(spec.transferability.enabled),
            transferability_samples=int(spec.transferability.max_samples),
        )

    @property
    def scratch(self) -> int:
        """Steps of the scratch stage."""
        return scratch_length(self.upstream_steps, self.downstream_steps, self.scratch_budget)

    @property
    def shape_key(self) -> tuple:
        """Cells with equal shape keys run in one batched tensor program (on one device)."""
        return (
            self.n1,
            self.n2,
            self.n_test,
            self.width,
            self.upstream_steps,
            self.downstream_steps,
            self.eval_every,
            self.dtype,
            self.transfer,
            self.model_form,
            self.upstream_form,
            self.device,
            self.control,
            self.scratch,
        )

    @property
    def data_key(self) -> tuple:
        """Cells with equal data keys share data, inits and Gram matrices (they differ in norms, lr, alpha)."""
        return (
            *self.shape_key,
            self.seed,
            self.d,
            self.label_noise,
            self.sigma_p1,
            self.sigma_p2,
            self.init_std,
            self.upstream_init_std,
            self.init,
            self.upstream_init,
            self.project_noise,
            self.signal_position,
            self.test_space,
            self.sampling,
        )


def resolve_device(choice: str) -> torch.device:
    """The torch device of a ``GramCell.device`` in this process: ``auto`` is cuda where a GPU is visible;
    ``RuntimeError`` for cuda without one (the preflight refuses that before anything is tracked)."""
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("engine.device='cuda': no CUDA GPU is visible in this process")
    return torch.device("cuda")


def model_form(model: Any) -> ModelForm:
    """The ``ModelForm`` of a two-layer CNN's schema or mapping (keys it lacks take the paper's values)."""
    defaults = ModelForm()
    get = model.get if isinstance(model, Mapping) else lambda key, default: getattr(model, key, default)
    return ModelForm(
        **{key: type(getattr(defaults, key))(get(key, getattr(defaults, key))) for key in ModelForm.__dataclass_fields__}
    )

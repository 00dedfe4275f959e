"""The exact Gram engine for synthetic pipelines (docs/design.md section 3).

Gradient descent moves a filter only along the training patches, so during a stage on task k every
filter is ``w(0) + sum_a C_a b_a + sum_i C_i xi_i``: its stage-start weight plus coefficients along the
unit signal directions ``b_u, b_v1, b_v2`` (the columns of ``Directions.basis``) and along the task's
training noise patches ``xi_i``. Everything GD needs is an inner product of a filter with those
vectors, ``R = <w, [b; xi]>``, and a step changes it by ``dC @ G`` with ``G`` the Gram matrix of
``[b; xi]``: O(m N^2) per step instead of O(m N d). Test patches need the cross Gram matrix with the
training vectors once; transfer needs the upstream vectors' inner products with the task-2 vectors.

``GramEngine.train_stage`` trains one ``Stage`` this way (the ``Engine`` interface of
``ptlab.engines.base``); ``run_cells`` / ``iter_chunks`` train whole pipelines of many cells at once for
the batched sweep (``ptlab.pipeline.batched``). The engine imports neither Lightning, torchvision,
timm nor the pipeline.

The arithmetic is the Lightning path's (``FullBatchGD``: logistic loss mean, ``f = F_{+1} - F_{-1}``,
ReLU on both patches, torch's softplus gradient with its threshold, torchmetrics' accuracy) done in a
different order, so float64 results agree with plain GD to rounding. The data, inits and transfer
plan come from the same functions and seed streams as the Lightning path.

The model variants of ``ptlab.models.two_layer_cnn`` (bias, activation, reductions) change the step as
docs/design.md section 3 says; response-space test sets (``task.test_space=response``) and gram sampling
(``task.sampling=gram``, ``DRAWS``) replace the d-space draws of a cell by draws of the same law from its
Gram matrix, so a cell's cost no longer grows with ``d``.

Cells (pipeline configs) with equal shapes (N1, N2, n_test, m, steps, model form) run as one batched tensor
program whatever their ``d``; cells that differ only in the signal norms (``u_norm``, ``v_norm``) or
in ``lr``, ``alpha`` and ``selection`` share one draw of data and inits (the data stream does not
depend on the signal norms) and one set of Gram matrices.
"""

from __future__ import annotations

import contextlib
import multiprocessing
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import Tensor

from ptlab.config import check_gram_engine
from ptlab.data.gram_sampling import GaussianBlock, sample_gram
from ptlab.data.synthetic import DTYPES, PatchData, ResponseTestSet, make_synthetic_data, response_test_set, sample_labels
from ptlab.engines.base import Stage, StageResult
from ptlab.errors import DivergenceError
from ptlab.models.two_layer_cnn import ModelForm, TwoLayerReLUCNN
from ptlab.modules.decomposition import PREFIX as DECOMPOSITION_PREFIX
from ptlab.modules.decomposition import SIGNALS
from ptlab.seeding import derive_seed, torch_seed
from ptlab.transfer.adapters import TwoLayerCNNFilters
from ptlab.transfer.selection import SelectionInputs, SignalView, build_strategy, spec_key

STAGES = ("upstream", "transfer", "scratch")
SOFTPLUS_THRESHOLD = 20.0
"""``torch.nn.functional.softplus``'s default: above it the loss is linear and its slope exactly 1."""
DECOMPOSITION_NAMES = (
    *(f"{DECOMPOSITION_PREFIX}signal_{name}_{stat}" for name in SIGNALS for stat in ("max", "mean")),
    f"{DECOMPOSITION_PREFIX}noise_max", f"{DECOMPOSITION_PREFIX}noise_mean",
    f"{DECOMPOSITION_PREFIX}filter_norm_mean",
)
"""The signal/noise decomposition metrics of ``ptlab.modules.decomposition``, in the order computed here."""
HISTORIES = ("full", "eval", "last")
SHARED_GRAM_SAMPLES = 64
"""From this many training samples a stage's response update multiplies by the data group's noise Gram block once
(a product per group) instead of by each cell's patch Gram matrix: 15-20% faster at N = 200 (fig2's upstream), slower
at N = 20 (kou2023), where a step is many small operations."""
STEP_BLOCK_BYTES = 3 << 19
"""About the step state (responses of the filters to the patches) of the cells run as one program, 1.5 MiB: on
2 cores, blocks of 10-20 fig2 cells (0.6-1.3 MiB) trained at 93-95 GFLOP/s, 40 cells at 78, 60 at 71 (the
steps stream the state through the caches several times a step)."""
EVAL_BLOCK_BYTES = 64 << 20
"""About the most memory the test-set evaluation of a batch of eval steps takes."""


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

    @classmethod
    def from_config(cfg_type, cfg: DictConfig, snapshot: Mapping[str, Any] | None = None) -> GramCell:
        """Read a composed config; ``ConfigError`` naming the key when the gram engine cannot run it.

        ``snapshot`` (the resolved container of ``cfg``) is kept instead of ``cfg`` when ``cfg`` is about to
        change (a sweep re-uses one config object for many jobs)."""
        check_gram_engine(cfg)
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
            test_space=str(task.get("test_space", "dspace")), sampling=str(task.get("sampling", "dspace")))

    @property
    def shape_key(self) -> tuple:
        """Cells with equal shape keys run in one batched tensor program."""
        return (self.n1, self.n2, self.n_test, self.width, self.upstream_steps, self.downstream_steps,
                self.eval_every, self.dtype, self.transfer, self.model_form, self.upstream_form)

    @property
    def data_key(self) -> tuple:
        """Cells with equal data keys share data, inits and Gram matrices (they differ in norms, lr, alpha)."""
        return (*self.shape_key, self.seed, self.d, self.label_noise, self.sigma_p1, self.sigma_p2,
                self.init_std, self.upstream_init_std, self.init, self.upstream_init, self.project_noise,
                self.signal_position, self.test_space, self.sampling)


def model_form(model_cfg: Any) -> ModelForm:
    """The ``ModelForm`` of a two-layer CNN config (keys it lacks take the paper's values)."""
    defaults = ModelForm()
    return ModelForm(**{key: type(getattr(defaults, key))(model_cfg.get(key, getattr(defaults, key)))
                        for key in ModelForm.__dataclass_fields__})


def eval_steps(steps: int, eval_every: int) -> list[int]:
    """Steps where ``FullBatchGD`` records accuracies: 0, eval_every, ... below ``steps``, then ``steps``."""
    return [*range(0, steps, eval_every), steps]


@dataclass
class GramStage:
    """One trained stage of one cell: curves, final numbers and the filters' coefficients.

    The final filters are ``init + signal @ basis.T + sum_k noise[k] @ xi_k`` with ``basis`` the
    unit directions of u, v1, v2 (``Directions.basis``, (d, 3)), ``xi_k`` the training noise patches
    of task k, and ``init`` the stage's initial filters: the upstream init for the upstream stage and for
    the ``transferred`` filters of the transfer stage, the downstream init otherwise.
    """

    name: str
    steps: int
    eval_steps: list[int]
    loss: np.ndarray
    train_acc: np.ndarray
    test_acc: np.ndarray
    decomposition: np.ndarray
    signal: Tensor
    noise: dict[int, Tensor]
    transferred: Tensor
    trajectory: Tensor | None = None
    bias: Tensor | None = None
    """The final biases (2, m), for a model with a bias."""
    """With ``record_coefficients``: (len(eval_steps), 2, m, 3 + N) coefficients of the stage's own
    updates along [b_u, b_v1, b_v2, xi of the stage's task] at each eval step."""

    @property
    def final(self) -> dict[str, float]:
        """``FullBatchGD.final``: the loss and accuracies of the final model."""
        return {"train_loss": float(self.loss[-1]), "train_acc": float(self.train_acc[-1]),
                "test_acc": float(self.test_acc[-1])}

    def metrics_by_step(self, history: str = "full") -> dict[int, dict[str, float]]:
        """Curve points grouped by step, as ``FullBatchGD.log_curves`` sends them; ``history`` keeps every
        point (``full``), the eval steps only (``eval``) or the last point of each curve (``last``)."""
        if history not in HISTORIES:
            raise ValueError(f"history={history!r} is not allowed: must be one of {', '.join(HISTORIES)}")
        loss_steps = {"full": range(self.steps + 1), "eval": self.eval_steps, "last": [self.steps]}[history]
        by_step: dict[int, dict[str, float]] = {step: {"train/loss": float(self.loss[step])} for step in loss_steps}
        points = range(len(self.eval_steps)) if history != "last" else [len(self.eval_steps) - 1]
        for index in points:
            row = by_step.setdefault(self.eval_steps[index], {})
            row["train/acc"] = float(self.train_acc[index])
            row["test/acc"] = float(self.test_acc[index])
            row.update(zip(DECOMPOSITION_NAMES, map(float, self.decomposition[index])))
        return by_step

    @property
    def curves(self) -> dict[str, list[tuple[int, float]]]:
        """Every curve in ``FullBatchGD.curves`` form: name -> [(step, value)]."""
        return self.curves_for("full")

    def curves_for(self, history: str) -> dict[str, list[tuple[int, float]]]:
        """The curves ``history`` keeps (see ``metrics_by_step``), name -> [(step, value)]."""
        curves: dict[str, list[tuple[int, float]]] = {}
        for step, metrics in sorted(self.metrics_by_step(history).items()):
            for key, value in metrics.items():
                curves.setdefault(key, []).append((step, value))
        return curves

    def result(self, history: str = "full", plan: list[Any] | None = None,
               model: torch.nn.Module | None = None) -> StageResult:
        """The stage as the ``Engine`` interface returns it."""
        return StageResult(self.name, model, self.final, self.curves_for(history), plan, self.steps)


@dataclass
class GramResult:
    """A cell's stages (``upstream`` absent without transfer) and its transfer plan."""

    cell: GramCell
    stages: dict[str, GramStage]
    plan: list[dict[str, Any]] | None

    def stage_results(self, history: str = "full") -> dict[str, StageResult]:
        """Every stage as the ``Engine`` interface returns it (no models: the weights stay coefficients)."""
        return {name: stage.result(history, self.plan_rows if name == "transfer" else None)
                for name, stage in self.stages.items()}

    def divergence(self) -> DivergenceError | None:
        """The error of the first stage (in training order) whose loss is not finite, else ``None``."""
        for stage in self.stages.values():
            error = divergence(stage.name, stage.loss, self.cell.lr)
            if error is not None:
                return error
        return None

    @property
    def plan_rows(self) -> list[Any] | None:
        """The transfer plan as ``PlanRow`` s."""
        from ptlab.transfer.adapters import PlanRow

        return None if self.plan is None else [PlanRow(**row) for row in self.plan]


def reconstruct_weights(stage: GramStage, basis: Tensor, noise_patches: Mapping[int, Tensor],
                        upstream_init: Tensor | None, downstream_init: Tensor) -> Tensor:
    """The stage's final filters (2, m, d) in d-space, from its coefficients (see ``GramStage``)."""
    if stage.name == "upstream":
        init = upstream_init
    elif upstream_init is None:
        init = downstream_init
    else:
        init = torch.where(stage.transferred[..., None], upstream_init, downstream_init)
    weight = init.to(stage.signal.dtype) + stage.signal @ basis.to(stage.signal.dtype).T
    for task, coefficients in stage.noise.items():
        weight = weight + coefficients @ noise_patches[task].to(coefficients.dtype)
    return weight


def _accuracy(margin: Tensor, y: Tensor) -> Tensor:
    """``sign_accuracy`` (torchmetrics' ``binary_accuracy``, threshold 0.5) along the last dimension:
    a row of margins that all lie in [0, 1] is read as probabilities, any other row goes through a
    sigmoid; the quotient is taken in float32 as torchmetrics does."""
    in_unit = ((margin >= 0) & (margin <= 1)).all(dim=-1, keepdim=True)
    probability = torch.where(in_unit, margin, torch.sigmoid(margin))
    correct = ((probability > 0.5) == (y > 0)).sum(dim=-1)
    return correct.to(torch.float32) / torch.tensor(float(margin.shape[-1]), dtype=torch.float32)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside the block (a decorator too)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class _StageOutput:
    loss: Tensor
    train_acc: Tensor
    test_acc: Tensor
    decomposition: Tensor
    coefficients: Tensor
    norm2: Tensor
    trajectory: Tensor | None
    bias: Tensor | None = None


def _train_stage(start: Tensor, test_start: Tensor, norm2_start: Tensor, gram: Tensor, cross: Tensor,
                 y: Tensor, clean: Tensor, test_y: Tensor, test_clean: Tensor, signal_coefficients: Tensor,
                 signal_norms: Tensor, lr: Tensor, steps: int, eval_every: int, record_coefficients: bool,
                 eval_threads: int = 1, form: ModelForm = ModelForm(), bias_start: Tensor | None = None,
                 ) -> _StageOutput:
    """Full-batch GD of a batch of cells in coefficient space.

    Shapes: ``G`` data groups of ``C`` cells, ``Fm = 2m`` filters, ``P = 3 + N`` vectors [b_u, b_v1, b_v2,
    xi_1..xi_N]. ``start`` (G, C, Fm, P) = <w(0), vector>; ``test_start`` (G, C, Fm, n_test) = <w(0), test
    noise>; ``norm2_start`` (G, C, Fm) = |w(0)|^2; ``gram`` (G, P, P); ``cross`` (G, P, n_test) = vectors
    x test noise; labels ``y``/``clean`` (G, N), ``test_y``/``test_clean`` (G, n_test);
    ``signal_coefficients`` (G, C, 3): the task signal s = u + v_k along the unit directions;
    ``signal_norms`` (G, C, 3): |u|, |v1|, |v2|; ``lr`` (G, C). ``form`` is the network's (activation,
    reductions, bias); with a bias, ``bias_start`` (G, C, Fm) holds the stage-start biases b, every response
    enters the activation as ``R + b``, and b moves by the sum over patches of the responses' step.

    The steps run on the K = N + 2 patches GD actually sees, [xi_1..xi_N, +s, -s] (each cell its own s),
    so that one step is a dozen tensor operations whatever the batch: responses ``R = <w, patch>``,
    ``f = (sign / m) relu(R) A`` with ``A`` (K, N) placing each sample's two patches, the loss slope
    per sample, per patch through ``A^T``, and ``R += (1[R > 0] * step) Gram``. Coefficients are summed
    step by step and mapped back to [b_u, b_v1, b_v2, xi] (s's coefficient is that of +s minus that of
    -s). The eval steps only keep a copy of the state; the test set and the decomposition are computed
    for several eval steps at once, on ``eval_threads`` threads (``EVAL_BLOCK_BYTES`` bounds the memory
    this takes).
    """
    groups, cells, filters, vectors = start.shape
    width, n_train, n_test = filters // 2, y.shape[-1], test_y.shape[-1]
    patches, batch = n_train + 2, groups * cells
    dtype = start.dtype
    sign = torch.cat([torch.ones(width, dtype=dtype), -torch.ones(width, dtype=dtype)])
    # [xi; +s; -s] = embed @ [b; xi], per cell: (G, C, K, P)
    embed = torch.zeros(groups, cells, patches, vectors, dtype=dtype)
    embed[:, :, :n_train, 3:] = torch.eye(n_train, dtype=dtype)
    embed[:, :, n_train, :3] = signal_coefficients
    embed[:, :, n_train + 1, :3] = -signal_coefficients
    patch_gram = (embed @ gram[:, None] @ embed.transpose(-1, -2)).view(batch, patches, patches)
    # With many noise patches (SHARED_GRAM_SAMPLES), their block of the Gram matrix, the data group's and the same for
    # all its cells, takes one product per group in the response update, (C Fm, N) x (N, N); the two signal patches'
    # rows and columns, which differ by cell, take thin products per cell (the noise-to-signal columns are skipped
    # when all zero, as for noise projected off the signals in the gram sampling). With few, one product per cell.
    shared = n_train >= SHARED_GRAM_SAMPLES
    if shared:
        noise_gram = gram[:, 3:, 3:].contiguous()
        signal_rows = patch_gram[:, n_train:].contiguous()  # (C G, 2, K)
        noise_to_signal = patch_gram[:, :n_train, n_train:].contiguous()  # (C G, N, 2)
        coupled = bool(noise_to_signal.any())
    response = start @ embed.transpose(-1, -2)  # (G, C, Fm, K): R = <w, patch>
    start_response = response.clone()
    coefficients = torch.zeros_like(response)
    # Sample i sees its noise patch and the signal patch of its clean label: f_i = h_i + h_{+s or -s}, with
    # h = (sign/m) relu(R) per patch; a patch's loss slope is its samples' d loss / d f_i = -y_i sigmoid(-y_i f_i) / N.
    clean_plus = (clean > 0)[:, None, :]
    by_clean = torch.stack([clean > 0, clean < 0], dim=-1).to(dtype)  # (G, N, 2): the signal patch of each sample
    loss_weight = (-y / n_train)[:, None, :]
    per_patch = torch.empty(groups, cells, patches, dtype=dtype)
    negative_labels = -y[:, None, :]
    divisor, factor, sigma = form.filter_divisor(width), form.patch_factor, form.sigma
    plain = form.is_paper_relu
    bias = None if bias_start is None else bias_start.clone()
    signs_over_m = (sign / divisor * factor).expand(batch, 1, filters)
    # the step of a filter of output +1 / -1 per unit of d loss / d patch: (G, C, 2, 1, 1)
    output_step = ((-lr / divisor * factor)[..., None] * torch.tensor([1.0, -1.0], dtype=dtype))[..., None, None]
    by_output_shape = (groups, cells, 2, width, patches)
    one = torch.ones((), dtype=dtype)
    positive = torch.empty_like(response)
    batch_response, batch_positive = response.view(batch, filters, patches), positive.view(batch, filters, patches)
    group_noise_response = response.view(groups, cells * filters, patches)[..., :n_train]
    group_noise_positive = positive.view(groups, cells * filters, patches)[..., :n_train]
    checkpoints = eval_steps(steps, eval_every)
    exponents = torch.empty(steps + 1, groups, cells, n_train, dtype=dtype)  # -y f, every step
    train_acc = torch.empty(groups, cells, len(checkpoints), dtype=torch.float32)
    test_acc = torch.empty_like(train_acc)
    decomposition = torch.empty(groups, cells, len(checkpoints), len(DECOMPOSITION_NAMES), dtype=dtype)
    trajectory: list[Tensor] | None = [] if record_coefficients else None
    test_start = test_start.reshape(groups, 1, cells * filters, n_test)
    positive_test_clean = (test_clean > 0)[:, None, None, :]
    own_plus = (y > 0)[:, None, None, None, :]
    per_eval_bytes = batch * filters * max(n_test, 2 * patches) * start.element_size()
    block = max(1, EVAL_BLOCK_BYTES // per_eval_bytes)
    pending: list[tuple[int, Tensor, Tensor, Tensor, Tensor | None]] = []  # (eval index, coefficients, response, h, bias)

    def to_base(ext: Tensor) -> Tensor:
        """Coefficients along the patches (..., K) -> along [b_u, b_v1, b_v2, xi] (..., P); ``ext`` (G, E, C, Fm, K)."""
        along_s = (ext[..., n_train] - ext[..., n_train + 1])[..., None]
        return torch.cat([along_s * signal_coefficients[:, None, :, None, :], ext[..., :n_train]], dim=-1)

    @torch_threads(eval_threads)
    def evaluate() -> None:
        """Accuracies and decomposition of the pending eval steps, in one batch (E of them)."""
        index = [item[0] for item in pending]
        ext, resp, h = (torch.stack([item[k] for item in pending], dim=1) for k in (1, 2, 3))  # (G, E, ...)
        evals = len(index)
        margin = (exponents[[checkpoints[i] for i in index]] * negative_labels).transpose(0, 1)  # (G, E, C, N)
        train_acc[..., index] = _accuracy(margin, y[:, None, None, :]).transpose(1, 2)
        base = to_base(ext)
        flat = base.view(groups, evals * cells * filters, vectors)
        test_response = torch.bmm(flat, cross).view(groups, evals, cells * filters, n_test).add_(test_start)
        if plain:
            test_response.clamp_min_(0)
        else:
            if bias is not None:
                biases = torch.stack([item[4] for item in pending], dim=1).view(groups, evals, cells * filters, 1)
                test_response.add_(biases)
            test_response = sigma(test_response)
        test_halves = test_response.view(groups, evals, cells, 2, width, n_test)
        test_margin = (test_halves[:, :, :, 0].sum(3) - test_halves[:, :, :, 1].sum(3)) / divisor * factor + torch.where(
            positive_test_clean, h[..., n_train, None], h[..., n_train + 1, None])
        test_acc[..., index] = _accuracy(test_margin, test_y[:, None, None, :]).transpose(1, 2)
        along_basis = start[:, None, ..., :3] + torch.bmm(flat, gram[:, :, :3]).view(groups, evals, cells, filters, 3)
        learned = sign[:, None] * along_basis * signal_norms[:, None, :, None, :]  # j <w, a>, a in u, v1, v2
        by_output = resp[..., :n_train].view(groups, evals, cells, 2, width, n_train)
        own = torch.where(own_plus, by_output[:, :, :, 0], by_output[:, :, :, 1])  # <w_{y_i, r}, xi_i>
        norms = (norm2_start[:, None] + (ext * (resp + start_response[:, None])).sum(-1)).clamp_min(0).sqrt()
        decomposition[:, :, index] = torch.cat([
            torch.stack([learned.amax(3), learned.mean(3)], dim=-1).flatten(-2),
            own.amax((-2, -1))[..., None], own.mean((-2, -1))[..., None], norms.mean(-1, keepdim=True),
        ], dim=-1).transpose(1, 2)
        if trajectory is not None:
            trajectory.extend(base.unbind(1))
        pending.clear()

    evaluation = 0
    for step in range(steps + 1):
        if plain:
            torch.clamp_min(response, 0, out=positive)
        else:
            pre = response if bias is None else response + bias[..., None]
            positive.copy_(sigma(pre))
        h = torch.bmm(signs_over_m, batch_positive).view(groups, cells, patches)
        f = h[..., :n_train] + torch.where(clean_plus, h[..., n_train, None], h[..., n_train + 1, None])
        exponent = torch.mul(f, negative_labels, out=exponents[step])  # -y f
        if step == checkpoints[evaluation]:
            pending.append((evaluation, coefficients.clone(), response.clone(), h,
                            None if bias is None else bias.clone()))
            evaluation += 1
            if len(pending) == block or step == steps:
                evaluate()
        if step == steps:
            break
        # softplus' gradient: the sigmoid, exactly 1 above softplus' threshold
        slope = torch.where(exponent > SOFTPLUS_THRESHOLD, one, torch.sigmoid(exponent))
        torch.mul(slope, loss_weight, out=per_patch[..., :n_train])
        torch.bmm(per_patch[..., :n_train], by_clean, out=per_patch[..., n_train:])
        step_by_output = per_patch[:, :, None, None, :] * output_step  # (G, C, 2, 1, K), small
        if plain:
            positive.sign_()  # relu's derivative
        else:
            positive.copy_(sigma.derivative(pre))
        positive.view(by_output_shape).mul_(step_by_output)  # now this step's coefficient update
        if bias is not None:
            bias.add_(positive.sum(-1))
        if shared:
            group_noise_response.baddbmm_(group_noise_positive, noise_gram)
            batch_response.baddbmm_(batch_positive[..., n_train:], signal_rows)
            if coupled:
                batch_response[..., n_train:].baddbmm_(batch_positive[..., :n_train], noise_to_signal)
        else:
            batch_response.baddbmm_(batch_positive, patch_gram)
        coefficients.add_(positive)
    loss = F.softplus(exponents).mean(-1).permute(1, 2, 0)
    norm2 = norm2_start + (coefficients * (response + start_response)).sum(-1)
    return _StageOutput(loss, train_acc, test_acc, decomposition, to_base(coefficients[:, None])[:, 0], norm2,
                        torch.stack(trajectory, dim=2) if trajectory is not None else None, bias)


@dataclass
class _Group:
    """One draw of data and inits with every product the stages need (d-space work done once)."""

    cells: list[int]
    tensors: dict[str, Tensor]


def _seeded_cnn(cell: GramCell, init_std: float, init: str, form: ModelForm, stream: str) -> tuple[Tensor, Tensor | None]:
    """The init filters (2m, d) and biases (2m,) or None the Lightning path draws for ``stream``
    (``ptlab.models.build_model``)."""
    with torch_seed(derive_seed(cell.seed, stream)):
        model = TwoLayerReLUCNN(cell.d, cell.width, init_std, init=init, bias=form.bias)
    dtype = DTYPES[cell.dtype]
    bias = None if model.bias is None else model.bias.detach().to(dtype).reshape(-1)
    return model.weight.detach().to(dtype).reshape(-1, cell.d), bias


def _test_products(test: PatchData | ResponseTestSet, rows: Tensor | None, inner: Tensor, index: Tensor) -> Tensor:
    """Inner products (K, n_test) of ``rows`` (``rows[:3]`` the unit signal basis) with the test noise patches:
    computed from the patches in d-space, or drawn in response space from the rows' Gram matrix (``inner``
    restricted to ``index``), with nothing of size d."""
    if isinstance(test, PatchData):
        return rows @ test.noise.T
    block = inner[index][:, index]
    return test.responses(block, block[:, :3]).T.to(inner.dtype)


@dataclass
class _Draw:
    """A cell's data and inits as the engine sees them: the Gram matrix ``inner`` of the rows [task-1 vectors
    (b_u, b_v1, b_v2, xi_1..xi_N1); task-2 vectors; upstream init (2m); downstream init (2m)] (the task-1 and
    upstream rows only with transfer), the rows' products with the test noise, labels, init biases."""

    inner: Tensor
    sizes: tuple[int, int, int, int]
    test1: Tensor | None
    test2: Tensor
    labels: dict[str, Tensor]
    biases: dict[str, Tensor]


def _draw_dspace(cell: GramCell) -> _Draw:
    """Everything drawn in R^d by the functions and seed streams of the Lightning path."""
    data = make_synthetic_data(d=cell.d, n1=cell.n1, n2=cell.n2, n_test=cell.n_test, u_norm=cell.u_norm,
                               v_norm=cell.v_norm, label_noise=cell.label_noise, sigma_p1=cell.sigma_p1,
                               sigma_p2=cell.sigma_p2, seed=derive_seed(cell.seed, "data"), dtype=DTYPES[cell.dtype],
                               project_noise=cell.project_noise, signal_position=cell.signal_position,
                               test_space=cell.test_space)
    basis_t = data.directions.basis.T.to(DTYPES[cell.dtype])
    task2 = torch.cat([basis_t, data.task2_train.noise])
    downstream, downstream_bias = _seeded_cnn(cell, cell.init_std, cell.init, cell.model_form, "downstream")
    labels = {"y2": data.task2_train.y, "c2": data.task2_train.clean_y,
              "ty2": data.task2_test.y, "tc2": data.task2_test.clean_y}
    biases = {} if downstream_bias is None else {"bias2": downstream_bias}
    if not cell.transfer:
        rows = torch.cat([task2, downstream])
        inner = rows @ rows.T
        test2 = _test_products(data.task2_test, rows, inner, torch.arange(len(rows)))
        return _Draw(inner, (0, len(task2), 0, len(downstream)), None, test2, labels, biases)
    task1 = torch.cat([basis_t, data.task1_train.noise])
    upstream, upstream_bias = _seeded_cnn(cell, cell.upstream_init_std, cell.upstream_init, cell.upstream_form,
                                          "upstream")
    if upstream_bias is not None:
        biases["bias1"] = upstream_bias
    labels.update({"y1": data.task1_train.y, "c1": data.task1_train.clean_y,
                   "ty1": data.task1_test.y, "tc1": data.task1_test.clean_y})
    rows = torch.cat([task1, task2, upstream, downstream])
    inner = rows @ rows.T
    p1, p2, fm = len(task1), len(task2), len(upstream)
    index1 = torch.cat([torch.arange(p1), torch.arange(p1 + p2, p1 + p2 + fm)])
    test1 = _test_products(data.task1_test, torch.cat([task1, upstream]), inner, index1)
    test2 = _test_products(data.task2_test, rows, inner, torch.arange(len(rows)))
    return _Draw(inner, (p1, p2, fm, fm), test1, test2, labels, biases)


def _draw_gram(cell: GramCell) -> _Draw:
    """The same law without anything of size d (``task.sampling=gram``, Gaussian inits): the labels from the
    data streams (equal to the d-space path's), the Gram matrix from ``sample_gram`` (its own ``"gram"``
    stream), the init biases N(0, sigma_0^2) from the init streams, the test sets in response space."""
    dtype, data_seed = DTYPES[cell.dtype], derive_seed(cell.seed, "data")

    def gen(part: str) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(data_seed, part))

    fm = 2 * cell.width
    tasks = [(1, cell.n1, cell.sigma_p1), (2, cell.n2, cell.sigma_p2)] if cell.transfer else [(2, cell.n2, cell.sigma_p2)]
    labels: dict[str, Tensor] = {}
    tests: dict[int, ResponseTestSet] = {}
    for task, n, sigma in tasks:
        labels[f"y{task}"], labels[f"c{task}"] = sample_labels(n, cell.label_noise, gen(f"task{task}_train"), dtype)
        tests[task] = response_test_set(cell.n_test, sigma, cell.label_noise, gen(f"task{task}_test"), dtype,
                                        cell.project_noise)
        labels[f"ty{task}"], labels[f"tc{task}"] = tests[task].y, tests[task].clean_y
    inits = [("upstream", cell.upstream_init_std, cell.upstream_form)] if cell.transfer else []
    inits.append(("downstream", cell.init_std, cell.model_form))
    blocks = [GaussianBlock(n, sigma, cell.project_noise) for _, n, sigma in tasks]
    blocks += [GaussianBlock(fm, std, False) for _, std, _ in inits]
    compact = sample_gram(cell.d, blocks, np.random.default_rng(derive_seed(data_seed, "gram")))
    # rows [b; xi1; b; xi2; up; down] as indices into the compact [b; xi1; xi2; up; down]
    counts = [b.count for b in blocks]
    starts = np.cumsum([3, *counts])

    def span(k: int) -> Tensor:
        return torch.arange(int(starts[k]), int(starts[k]) + counts[k])

    order = torch.cat([*(torch.cat([torch.arange(3), span(k)]) for k in range(len(tasks))),
                       *(span(k) for k in range(len(tasks), len(blocks)))])
    inner = compact[order][:, order].to(dtype)
    biases = {}
    for name, std, form in inits:
        if form.bias:
            key = "bias1" if name == "upstream" else "bias2"
            generator = torch.Generator().manual_seed(derive_seed(cell.seed, name))
            biases[key] = (std * torch.randn(fm, generator=generator, dtype=torch.float64)).to(dtype)
    p2 = 3 + cell.n2
    if not cell.transfer:
        return _Draw(inner, (0, p2, 0, fm), None, _test_products(tests[2], None, inner, torch.arange(len(inner))),
                     labels, biases)
    p1 = 3 + cell.n1
    index1 = torch.cat([torch.arange(p1), torch.arange(p1 + p2, p1 + p2 + fm)])
    return _Draw(inner, (p1, p2, fm, fm), _test_products(tests[1], None, inner, index1),
                 _test_products(tests[2], None, inner, torch.arange(len(inner))), labels, biases)


DRAWS: dict[str, Callable[[GramCell], _Draw]] = {"dspace": _draw_dspace, "gram": _draw_gram}
"""``task.sampling`` -> how a cell's data and inits are drawn."""


def _prepare_group(cell: GramCell, cell_indices: list[int]) -> _Group:
    """One draw of a data key's data and inits, cut into the blocks the stages read."""
    draw = DRAWS[cell.sampling](cell)
    inner, (p1, p2, fu, fd) = draw.inner, draw.sizes
    cuts = np.cumsum([0, p1, p2, fu, fd])
    s1, s2, su, sd = (slice(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]))
    test2 = draw.test2
    t: dict[str, Tensor] = {**draw.labels, **draw.biases,
                            "gram2": inner[s2, s2], "cross2": test2[s2], "start2": inner[sd, s2], "test_start2": test2[sd],
                            "norm2_2": inner[sd, sd].diagonal().clone()}
    if cell.transfer:
        test1 = draw.test1
        t.update({
            "gram1": inner[s1, s1], "cross1": test1[:p1], "start1": inner[su, s1], "test_start1": test1[p1:],
            "norm2_1": inner[su, su].diagonal().clone(),
            "mix": inner[s1, s2], "mix_test": test2[s1], "up_start2": inner[su, s2], "up_test_start2": test2[su],
        })
    return _Group(cell_indices, {k: v.to(DTYPES[cell.dtype]).contiguous() for k, v in t.items()})


def _signal_views(cell: GramCell, responses: Tensor, y2: Tensor, c2: Tensor) -> dict[str, SignalView]:
    """The synthetic strategies' view of the upstream filters, by plan layer, from their responses (2m, 3 + N2)
    to the task-2 vectors ``[b_u, b_v1, b_v2, xi_1..]``: ``<w, u>``, and per sample ``<w, x1_i>`` (the signal
    patch ``c_i (u + v2)``) and ``<w, xi_i>``."""
    r = responses.double().view(2, cell.width, -1)
    views = {}
    for j, label in enumerate(TwoLayerCNNFilters.OUTPUTS):
        universal = cell.u_norm * r[j, :, 0]
        signal = universal + cell.v_norm * r[j, :, 2]
        patches = torch.stack([signal[:, None] * c2.double()[None], r[j, :, 3:]], dim=-1)
        views[f"weight[{label}]"] = SignalView(universal, patches, y2.double())
    return views


def _plan(cell: GramCell, upstream_norms: Tensor, views: dict[str, SignalView] | None = None,
          ) -> tuple[list[dict[str, Any]], Tensor]:
    """The transfer plan of ``TwoLayerCNNFilters`` for this cell and the mask (2, m) of copied filters.

    The plan sees the upstream filters through their norms (``largest_norm``), their responses to task 2
    (``views``: ``signal``, ``task2_alignment``) or not at all, so it is made on (2, m, 1) stand-ins
    holding the norms, with the Lightning path's generator seed (``check_gram_engine`` refuses the rest).
    """
    stand_in = SimpleNamespace(weight=upstream_norms[..., None])
    generator = torch.Generator().manual_seed(derive_seed(cell.seed, "selection"))
    select = build_strategy(cell.selection).bind(None, SelectionInputs(signal=views or {}))
    rows = TwoLayerCNNFilters().plan(stand_in, stand_in, cell.alpha, select, generator)
    mask = torch.zeros(upstream_norms.shape, dtype=torch.bool)
    for j, row in enumerate(rows):
        mask[j, row.indices] = True
    return [row.as_dict() for row in rows], mask


def _stack(groups: list[_Group], key: str) -> Tensor:
    return torch.stack([g.tensors[key] for g in groups])


def _per_cell(cells: list[GramCell], layout: list[list[int]], value: Callable[[GramCell], Sequence[float]],
              dtype: torch.dtype) -> Tensor:
    return torch.tensor([[list(value(cells[i])) for i in row] for row in layout], dtype=dtype)


def _run_chunk(cells: list[GramCell], groups: list[_Group], record_coefficients: bool, eval_threads: int = 1,
               ) -> list[tuple[int, GramResult]]:
    """Run every cell of ``groups`` (one shape) as one batched program; pads groups to equal size."""
    first = cells[groups[0].cells[0]]
    dtype = DTYPES[first.dtype]
    size = max(len(g.cells) for g in groups)
    layout = [g.cells + [g.cells[0]] * (size - len(g.cells)) for g in groups]
    width, filters = first.width, 2 * first.width
    lr = _per_cell(cells, layout, lambda c: [c.lr], dtype)[..., 0]
    norms = _per_cell(cells, layout, lambda c: [c.u_norm, c.v_norm, c.v_norm], dtype)
    zero = torch.zeros_like(norms[..., :1])
    signal1 = torch.cat([norms[..., :2], zero], dim=-1)  # u + v1 along (b_u, b_v1, b_v2)
    signal2 = torch.cat([norms[..., :1], zero, norms[..., 2:]], dim=-1)  # u + v2

    def expand(key: str) -> Tensor:
        value = _stack(groups, key)
        return value[:, None].expand(value.shape[0], size, *value.shape[1:])

    upstream_out = plans = masks = None
    if first.transfer:
        upstream_out = _train_stage(
            expand("start1"), expand("test_start1"), expand("norm2_1"), _stack(groups, "gram1"),
            _stack(groups, "cross1"), _stack(groups, "y1"), _stack(groups, "c1"), _stack(groups, "ty1"),
            _stack(groups, "tc1"), signal1, norms, lr, first.upstream_steps, first.eval_every, record_coefficients,
            eval_threads, first.upstream_form, expand("bias1") if first.upstream_form.bias else None)
        upstream_norms = upstream_out.norm2.clamp_min(0).sqrt().view(len(groups), size, 2, width)
        up = upstream_out.coefficients.view(len(groups), size * filters, -1)
        carried_start = expand("up_start2") + torch.bmm(up, _stack(groups, "mix")).view(len(groups), size, filters, -1)
        plans, mask_list = [], []
        for g, row in enumerate(layout):
            for c, index in enumerate(row):
                cell = cells[index]
                views = (_signal_views(cell, carried_start[g, c], groups[g].tensors["y2"], groups[g].tensors["c2"])
                         if build_strategy(cell.selection).needs & {"oracle", "task2"} else None)
                plan, mask = _plan(cell, upstream_norms[g, c], views)
                plans.append(plan)
                mask_list.append(mask)
        masks = torch.stack(mask_list).view(len(groups), size, filters)
        carried_test = expand("up_test_start2") + torch.bmm(up, _stack(groups, "mix_test")).view(
            len(groups), size, filters, -1)
        pick = masks[..., None]
        start = torch.cat([torch.where(pick, carried_start, expand("start2")), expand("start2")], dim=1)
        test_start = torch.cat([torch.where(pick, carried_test, expand("test_start2")), expand("test_start2")], dim=1)
        norm2 = torch.cat([torch.where(masks, upstream_out.norm2, expand("norm2_2")), expand("norm2_2")], dim=1)
        bias_start = None
        if first.model_form.bias:
            bias_start = torch.cat([torch.where(masks, upstream_out.bias, expand("bias2")), expand("bias2")], dim=1)
        twice = (lambda x: torch.cat([x, x], dim=1))
        downstream = _train_stage(
            start, test_start, norm2, _stack(groups, "gram2"), _stack(groups, "cross2"), _stack(groups, "y2"),
            _stack(groups, "c2"), _stack(groups, "ty2"), _stack(groups, "tc2"), twice(signal2), twice(norms),
            twice(lr), first.downstream_steps, first.eval_every, record_coefficients, eval_threads, first.model_form,
            bias_start)
    else:
        downstream = _train_stage(
            expand("start2"), expand("test_start2"), expand("norm2_2"), _stack(groups, "gram2"),
            _stack(groups, "cross2"), _stack(groups, "y2"), _stack(groups, "c2"), _stack(groups, "ty2"),
            _stack(groups, "tc2"), signal2, norms, lr, first.downstream_steps, first.eval_every,
            record_coefficients, eval_threads, first.model_form, expand("bias2") if first.model_form.bias else None)

    def stage(name: str, key: str, g: int, c: int, signal: Tensor, noise: dict[int, Tensor],
              transferred: Tensor) -> GramStage:
        out = outputs[key]
        bias = None if out.bias is None else out.bias[g, c].view(2, width).clone()
        steps = first.upstream_steps if key == "upstream" else first.downstream_steps
        return GramStage(
            name=name, steps=steps, eval_steps=eval_steps(steps, first.eval_every), loss=loss_np[key][g, c],
            train_acc=train_np[key][g, c], test_acc=test_np[key][g, c], decomposition=decomposition_np[key][g, c],
            signal=signal, noise=noise, transferred=transferred, bias=bias,
            trajectory=None if out.trajectory is None else out.trajectory[g, c].view(-1, 2, width, out.trajectory.shape[-1]))

    outputs = {"downstream": downstream, **({"upstream": upstream_out} if upstream_out is not None else {})}
    loss_np = {k: v.loss.double().numpy() for k, v in outputs.items()}
    train_np = {k: v.train_acc.double().numpy() for k, v in outputs.items()}
    test_np = {k: v.test_acc.double().numpy() for k, v in outputs.items()}
    decomposition_np = {k: v.decomposition.double().numpy() for k, v in outputs.items()}
    results: list[tuple[int, GramResult]] = []
    no_mask = torch.zeros(2, width, dtype=torch.bool)
    for g, group in enumerate(groups):
        for c, index in enumerate(group.cells):
            stages: dict[str, GramStage] = {}
            down = downstream.coefficients[g].view(-1, 2, width, downstream.coefficients.shape[-1])
            plan = None
            if upstream_out is not None:
                up = upstream_out.coefficients[g, c].view(2, width, -1)
                mask = masks[g, c].view(2, width)
                plan = plans[g * size + c]
                stages["upstream"] = stage("upstream", "upstream", g, c, up[..., :3].clone(),
                                           {1: up[..., 3:].clone()}, no_mask)
                carried = mask[..., None].to(dtype)
                stages["transfer"] = stage("transfer", "downstream", g, c, down[c, ..., :3] + carried * up[..., :3],
                                           {1: carried * up[..., 3:], 2: down[c, ..., 3:].clone()}, mask)
                scratch_index = size + c
            else:
                scratch_index = c
            stages["scratch"] = stage("scratch", "downstream", g, scratch_index, down[scratch_index, ..., :3].clone(),
                                      {2: down[scratch_index, ..., 3:].clone()}, no_mask)
            results.append((index, GramResult(cells[index], stages, plan)))
    return results


def _run_spec(spec: tuple[list[GramCell], list[list[int]], bool, Callable[[GramResult], Any] | None],
              ) -> list[tuple[int, Any]]:
    """One chunk from scratch (data, Gram matrices, training): the unit of work of a worker process; with a
    ``summarize`` function, each result is replaced by what it returns (in the worker, so that only that comes
    back: a worker's tensors cross to the parent one shared-memory segment each).

    The d-space products and the evaluations use torch's threads; the steps run on one: they are many
    small tensor operations, which lose more to the threads' synchronisation than they gain."""
    cells, groups, record_coefficients, summarize = spec
    prepared = [_prepare_group(cells[g[0]], g) for g in groups]
    threads = torch.get_num_threads()
    results: list[tuple[int, GramResult]] = []
    with torch_threads(1):
        for block in step_blocks(prepared, state_bytes(cells[groups[0][0]])):
            results.extend(_run_chunk(cells, block, record_coefficients, eval_threads=threads))
    return results if summarize is None else [(k, summarize(result)) for k, result in results]


def state_bytes(cell: GramCell) -> int:
    """Bytes of one cell's step state (the responses of its filters to the patches of its largest stage)."""
    downstream = (2 if cell.transfer else 1) * (cell.n2 + 2)
    return 2 * cell.width * max(cell.n1 + 2 if cell.transfer else 0, downstream) * DTYPES[cell.dtype].itemsize


def step_blocks(groups: list[_Group], cell_bytes: int) -> Iterator[list[_Group]]:
    """The groups of a chunk in blocks of about ``STEP_BLOCK_BYTES`` of step state, each run as one program: groups
    larger than that are cut into near-equal parts that share their data (at least one cell a block)."""
    cap = max(1, STEP_BLOCK_BYTES // cell_bytes)
    pieces = []
    for group in groups:
        parts = -(-len(group.cells) // cap)
        size = -(-len(group.cells) // parts)
        pieces += [_Group(group.cells[i:i + size], group.tensors) for i in range(0, len(group.cells), size)]
    block: list[_Group] = []
    size = 0
    for piece in pieces:
        if block and size + len(piece.cells) > cap:
            yield block
            block, size = [], 0
        block.append(piece)
        size += len(piece.cells)
    if block:
        yield block


def iter_chunks(cells: Sequence[GramCell], max_cells: int = 60, record_coefficients: bool = False,
                workers: int = 1, summarize: Callable[[GramResult], Any] | None = None,
                ) -> Iterator[list[tuple[int, Any]]]:
    """Run ``cells`` in batched chunks of equal shape; yields ``[(index into cells, result)]`` per chunk.

    Cells that share a data key form a group (one data draw, one set of Gram matrices); a chunk holds
    whole groups of one shape, up to about ``max_cells`` cells (at least one group). With ``workers``
    > 1, chunks run in that many forked single-threaded processes: a chunk's steps are many small
    tensor operations, which scale across processes far better than across intra-op threads (whose
    per-operation synchronisation stalls whenever another program shares the cores).
    """
    cells = list(cells)
    by_shape: dict[tuple, dict[tuple, list[int]]] = {}
    for index, cell in enumerate(cells):
        by_shape.setdefault(cell.shape_key, {}).setdefault(cell.data_key, []).append(index)
    chunks: list[list[list[int]]] = []
    for data_groups in by_shape.values():
        chunk: list[list[int]] = []
        for indices in sorted(data_groups.values(), key=len):
            if chunk and (sum(map(len, chunk)) + len(indices)) > max_cells:
                chunks.append(chunk)
                chunk = []
            chunk.append(indices)
        if chunk:
            chunks.append(chunk)
    specs = []
    for chunk in chunks:
        flat = [index for group in chunk for index in group]
        position = {index: k for k, index in enumerate(flat)}
        specs.append((flat, ([cells[i] for i in flat], [[position[i] for i in g] for g in chunk], record_coefficients,
                             summarize)))
    if workers > 1 and len(specs) > 1:
        context = multiprocessing.get_context("fork")
        with context.Pool(min(workers, len(specs)), initializer=torch.set_num_threads, initargs=(1,)) as pool:
            for (flat, _), out in zip(specs, pool.imap(_run_spec, [spec for _, spec in specs])):
                yield [(flat[k], result) for k, result in out]
    else:
        for flat, spec in specs:
            yield [(flat[k], result) for k, result in _run_spec(spec)]


def run_cells(cells: Sequence[GramCell], max_cells: int = 60, record_coefficients: bool = False,
              workers: int = 1) -> list[GramResult]:
    """Every cell's result, in the order of ``cells``."""
    out: list[GramResult | None] = [None] * len(cells)
    for chunk in iter_chunks(cells, max_cells, record_coefficients, workers):
        for index, result in chunk:
            out[index] = result
    return out  # type: ignore[return-value]


def divergence(stage: str, loss: Tensor | np.ndarray, lr: float) -> DivergenceError | None:
    """The ``DivergenceError`` of a stage whose loss curve has a non-finite step (the first one), else ``None``:
    the single run, the batched sweep and the grid all report a diverged stage with this line."""
    loss = torch.as_tensor(loss)
    bad = (~torch.isfinite(loss)).nonzero()
    if not len(bad):
        return None
    step = int(bad[0, -1])
    return DivergenceError(f"stage {stage} diverged at step {step}: the loss is {float(loss[..., step]):g}; "
                           f"lower train.lr (now {lr:g})", stage=stage)


def check_loss(stage: str, loss: Tensor, lr: float) -> None:
    """Raise ``divergence``'s error, if any."""
    error = divergence(stage, loss, lr)
    if error is not None:
        raise error


class GramEngine:
    """``Engine`` that trains a stage in coefficient space (see the module docstring): the model's
    weights are read once (after the stage's transfer is applied), the steps touch only the Gram
    matrix of the stage's training vectors, and the trained weights are written back into the model."""

    def __init__(self, name: str = "gram", trainer: Any = None) -> None:
        """``trainer`` (the trainer group) does not apply: the gram engine runs on the CPU in this process."""
        self.name = name

    def train_stage(self, stage: Stage) -> StageResult:
        model = stage.model
        plan = stage.transfer.apply(model) if stage.transfer is not None else None
        weight = model.weight.detach()
        dtype = weight.dtype
        filters = weight.reshape(-1, weight.shape[-1])  # (2m, d)
        directions = stage.directions
        rows = torch.cat([directions.basis.T.to(dtype), stage.train.noise.to(dtype)])  # [b_u, b_v1, b_v2; xi]
        if isinstance(stage.test, ResponseTestSet):
            # one draw for [w(0); b; xi] jointly: the filters' responses and the rows' cross products
            both = torch.cat([directions.basis.T.to(dtype), filters, stage.train.noise.to(dtype)])
            inner = both @ both.T
            drawn = stage.test.responses(inner, inner[:, :3]).T.to(dtype)
            fm = filters.shape[0]
            test_start, cross = drawn[3:3 + fm], torch.cat([drawn[:3], drawn[3 + fm:]])
        else:
            test_noise = stage.test.noise.to(dtype)
            test_start, cross = filters @ test_noise.T, rows @ test_noise.T
        norms = [float(torch.linalg.vector_norm(getattr(directions, name).double())) for name in SIGNALS]
        signal = [norms[0], norms[1] if stage.task == 1 else 0.0, norms[2] if stage.task == 2 else 0.0]

        def one(t: Tensor) -> Tensor:  # a single cell in a single group: (1, 1, ...)
            return t[None, None]

        bias = None if getattr(model, "bias", None) is None else model.bias.detach().reshape(1, 1, -1).to(dtype)
        threads = torch.get_num_threads()
        with torch_threads(1):
            out = _train_stage(
                one(filters @ rows.T), one(test_start), one((filters * filters).sum(-1)),
                (rows @ rows.T)[None], cross[None], stage.train.y.to(dtype)[None],
                stage.train.clean_y.to(dtype)[None], stage.test.y.to(dtype)[None], stage.test.clean_y.to(dtype)[None],
                torch.tensor([[signal]], dtype=dtype), torch.tensor([[norms]], dtype=dtype),
                torch.tensor([[stage.lr]], dtype=dtype), stage.steps, stage.eval_every, False, eval_threads=threads,
                form=model.form, bias_start=bias)
        check_loss(stage.name, out.loss[0, 0], stage.lr)
        coefficients = out.coefficients[0, 0]  # (2m, 3 + N)
        with torch.no_grad():
            model.weight.copy_((filters + coefficients @ rows).view_as(weight))
            if out.bias is not None:
                model.bias.copy_(out.bias[0, 0].view_as(model.bias))
        width = weight.shape[1]
        trained = GramStage(
            name=stage.name, steps=stage.steps, eval_steps=eval_steps(stage.steps, stage.eval_every),
            loss=out.loss[0, 0].double().numpy(), train_acc=out.train_acc[0, 0].double().numpy(),
            test_acc=out.test_acc[0, 0].double().numpy(), decomposition=out.decomposition[0, 0].double().numpy(),
            signal=coefficients[:, :3].reshape(2, width, 3), noise={stage.task: coefficients[:, 3:].reshape(2, width, -1)},
            transferred=torch.zeros(2, width, dtype=torch.bool))
        return trained.result(plan=plan, model=model)


__all__ = ["DECOMPOSITION_NAMES", "GramCell", "GramEngine", "GramResult", "GramStage", "HISTORIES", "eval_steps",
           "iter_chunks", "reconstruct_weights", "run_cells"]

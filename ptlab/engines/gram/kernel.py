"""The GD step program of the gram engine: full-batch GD of a batch of cells in coefficient space.

Gradient descent moves a filter only along the training patches, so during a stage on task k every
filter is ``w(0) + sum_a C_a b_a + sum_i C_i xi_i``: its stage-start weight plus coefficients along the
unit signal directions ``b_u, b_v1, b_v2`` (the columns of ``Directions.basis``) and along the task's
training noise patches ``xi_i``. Everything GD needs is an inner product of a filter with those
vectors, ``R = <w, [b; xi]>``, and a step changes it by ``dC @ G`` with ``G`` the Gram matrix of
``[b; xi]``: O(m N^2) per step instead of O(m N d). Test patches need the cross Gram matrix with the
training vectors once; transfer needs the upstream vectors' inner products with the task-2 vectors.

The arithmetic is the Lightning path's (``FullBatchGD``: logistic loss mean, ``f = F_{+1} - F_{-1}``,
ReLU on both patches, torch's softplus gradient with its threshold, torchmetrics' accuracy) done in a
different order, so float64 results agree with plain GD to rounding. The model variants of
``ptlab.models.two_layer_cnn`` (bias, activation, reductions) change the step as docs/design.md section 3 says.
The kernel knows nothing of configs, data draws or transfer: it takes tensors and returns tensors.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ptlab.models.two_layer_cnn import ModelForm
from ptlab.modules.decomposition import PREFIX as DECOMPOSITION_PREFIX
from ptlab.modules.decomposition import SIGNALS

SOFTPLUS_THRESHOLD = 20.0
"""``torch.nn.functional.softplus``'s default: above it the loss is linear and its slope exactly 1."""
DECOMPOSITION_NAMES = (
    *(f"{DECOMPOSITION_PREFIX}signal_{name}_{stat}" for name in SIGNALS for stat in ("max", "mean")),
    f"{DECOMPOSITION_PREFIX}noise_max",
    f"{DECOMPOSITION_PREFIX}noise_mean",
    f"{DECOMPOSITION_PREFIX}filter_norm_mean",
)
"""The signal/noise decomposition metrics of ``ptlab.modules.decomposition``, in the order computed here."""
SHARED_GRAM_SAMPLES = 64
"""From this many training samples a stage's response update multiplies by the data group's noise Gram block once
(a product per group) instead of by each cell's patch Gram matrix: 15-20% faster at N = 200 (fig2's upstream), slower
at N = 20 (kou2023), where a step is many small operations."""
ROW_ALIGN_BYTES = 64
"""With a shared noise Gram block the patch axis is padded with zero patches to a multiple of this many bytes, so that
every filter's row of responses starts on a cache line: fig2's upstream stage (K = 202 -> 208 float32 patches) runs ~5%
faster. The padding holds zeros that nothing reads; the numbers are those of the unpadded axis to rounding (BLAS may
round a product by its operands' layout)."""
EVAL_BLOCK_BYTES = 64 << 20
"""About the most memory the test-set evaluation of a batch of eval steps takes."""


def eval_steps(steps: int, eval_every: int) -> list[int]:
    """Steps where ``FullBatchGD`` records accuracies: 0, eval_every, ... below ``steps``, then ``steps``."""
    return [*range(0, steps, eval_every), steps]


def _accuracy(margin: Tensor, y: Tensor) -> Tensor:
    """``sign_accuracy`` (torchmetrics' ``binary_accuracy``, threshold 0.5) along the last dimension:
    a row of margins that all lie in [0, 1] is read as probabilities, any other row goes through a
    sigmoid; the quotient is taken in float32 as torchmetrics does."""
    in_unit = ((margin >= 0) & (margin <= 1)).all(dim=-1, keepdim=True)
    probability = torch.where(in_unit, margin, torch.sigmoid(margin))
    correct = ((probability > 0.5) == (y > 0)).sum(dim=-1)
    return correct.to(torch.float32) / torch.tensor(float(margin.shape[-1]), dtype=torch.float32, device=margin.device)


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op thread count set to ``count`` inside the block (a decorator too)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass(frozen=True)
class StageInputs:
    """One stage of a batch of cells, as the kernel reads it.

    Shapes: ``G`` data groups of ``C`` cells, ``Fm = 2m`` filters, ``P = 3 + N`` vectors [b_u, b_v1, b_v2,
    xi_1..xi_N] (N training samples), ``n_test`` test samples. The kernel reads the tensors and writes none.
    """

    start: Tensor
    """(G, C, Fm, P): <w(0), vector>, the stage-start filters' inner products with the vectors."""
    test_start: Tensor
    """(G, C, Fm, n_test): <w(0), test noise>."""
    norm2_start: Tensor
    """(G, C, Fm): |w(0)|^2."""
    gram: Tensor
    """(G, P, P): the vectors' Gram matrix, one per data group."""
    cross: Tensor
    """(G, P, n_test): vectors x test noise."""
    y: Tensor
    """(G, N): the training labels (+-1, label noise included)."""
    clean: Tensor
    """(G, N): the clean training labels, which pick each sample's signal patch (+s or -s)."""
    test_y: Tensor
    """(G, n_test): the test labels."""
    test_clean: Tensor
    """(G, n_test): the clean test labels."""
    signal_coefficients: Tensor
    """(G, C, 3): the task signal s = u + v_k along the unit directions."""
    signal_norms: Tensor
    """(G, C, 3): |u|, |v1|, |v2|."""
    lr: Tensor
    """(G, C): each cell's learning rate."""
    steps: int
    """GD steps of the stage."""
    eval_every: int
    """Accuracies and the decomposition are recorded at ``eval_steps(steps, eval_every)``, or at ``eval_at``."""
    record_coefficients: bool = False
    """Keep the coefficients at every eval step (``StageOutput.trajectory``)."""
    eval_threads: int = 1
    """torch threads for the evaluations (the steps run on the caller's)."""
    form: ModelForm = ModelForm()
    """The network's activation, reductions and bias."""
    bias_start: Tensor | None = None
    """(G, C, Fm): the stage-start biases b, with a bias (``form.bias``), else ``None``."""
    step_scale: Tensor | None = None
    """(G, C, Fm): each filter's step multiplier (``regularizer=freeze`` 0, ``lr_scale`` its scale) at the steps below
    ``scale_until``, 1 after; ``None``: 1 (no regulariser)."""
    scale_until: Tensor | None = None
    """(G, C): the step from which ``step_scale`` no longer applies (freeze's k); ``None``: it applies at every step."""
    decay: Tensor | None = None
    """(G, C, Fm): kappa, each filter's penalty kappa ||w - anchored w(0)||^2 on the loss (``regularizer=l2sp``);
    ``None``: no penalty."""
    anchored: Tensor | None = None
    """(G, C, Fm): 1 where the penalty pulls a filter toward its stage-start value w(0) (an inherited filter), 0 where
    toward 0 (weight decay); read with ``decay``."""
    eval_at: tuple[int, ...] | None = None
    """The steps to evaluate (accuracies, decomposition, trajectory), ascending, in [0, steps]; ``None``:
    ``eval_steps(steps, eval_every)``. A caller that keeps only some evaluations names them: the others are not
    computed at all."""
    loss_at: tuple[int, ...] | None = None
    """The steps whose loss is returned, ascending, in [0, steps]; ``None``: every step. The loss is then computed at
    those steps only, unless some step's loss may not be finite: then at every step (``StageOutput.loss_steps``
    ``None``), so that the first diverged step is found as with every step."""

    def __post_init__(self) -> None:
        """``ValueError`` naming the first tensor whose shape disagrees with ``start``'s and the labels'."""
        groups, cells, filters, vectors = self.start.shape
        n_train, n_test = self.y.shape[-1], self.test_y.shape[-1]
        expected = {
            "test_start": (groups, cells, filters, n_test),
            "norm2_start": (groups, cells, filters),
            "gram": (groups, vectors, vectors),
            "cross": (groups, vectors, n_test),
            "y": (groups, n_train),
            "clean": (groups, n_train),
            "test_y": (groups, n_test),
            "test_clean": (groups, n_test),
            "signal_coefficients": (groups, cells, 3),
            "signal_norms": (groups, cells, 3),
            "lr": (groups, cells),
        }
        if self.bias_start is not None:
            expected["bias_start"] = (groups, cells, filters)
        for name, shape in (
            ("step_scale", (groups, cells, filters)),
            ("scale_until", (groups, cells)),
            ("decay", (groups, cells, filters)),
            ("anchored", (groups, cells, filters)),
        ):
            if getattr(self, name) is not None:
                expected[name] = shape
        if (self.scale_until is not None and self.step_scale is None) or ((self.decay is None) != (self.anchored is None)):
            raise ValueError("StageInputs: scale_until needs step_scale, and decay and anchored go together")
        for name, shape in expected.items():
            actual = tuple(getattr(self, name).shape)
            if actual != shape:
                raise ValueError(
                    f"StageInputs.{name} has shape {actual}: must be {shape} "
                    f"(start is (G, C, Fm, P) = {tuple(self.start.shape)}, N = {n_train})"
                )
        if vectors != 3 + n_train or filters % 2:
            raise ValueError(
                f"StageInputs.start has shape {tuple(self.start.shape)}: must be "
                f"(G, C, 2m, 3 + N) with N = {n_train} training samples"
            )
        for name in ("eval_at", "loss_at"):
            at = getattr(self, name)
            if at is not None and (not at or list(at) != sorted(set(at)) or at[0] < 0 or at[-1] > self.steps):
                raise ValueError(f"StageInputs.{name}={at}: must be distinct ascending steps in [0, {self.steps}]")


@dataclass
class StageOutput:
    """A trained stage of a batch of cells (``E`` eval steps, ``T`` = steps)."""

    loss: Tensor
    """(G, C, L): the mean logistic loss at every step (L = T + 1) or at ``loss_steps``."""
    train_acc: Tensor
    """(G, C, E): float32, as torchmetrics computes it (E eval steps: ``eval_steps``)."""
    test_acc: Tensor
    """(G, C, E)."""
    decomposition: Tensor
    """(G, C, E, len(DECOMPOSITION_NAMES))."""
    coefficients: Tensor
    """(G, C, Fm, P): the stage's updates along [b_u, b_v1, b_v2, xi]."""
    norm2: Tensor
    """(G, C, Fm): the final |w|^2."""
    trajectory: Tensor | None
    """(G, C, E, Fm, P) coefficients at the eval steps, with ``record_coefficients``."""
    bias: Tensor | None = None
    """(G, C, Fm): the final biases, with a bias."""
    scale: Tensor | None = None
    """(G, C, Fm): with a penalty (``decay``), the final factor a of w(0) in ``w = a w(0) + coefficients . vectors``
    (1 for a filter pulled toward w(0), shrinking for one decayed toward 0); ``None``: a = 1."""
    eval_steps: tuple[int, ...] = ()
    """The steps the evaluations were made at (``StageInputs.eval_at`` or ``eval_steps(steps, eval_every)``)."""
    loss_steps: tuple[int, ...] | None = None
    """The steps ``loss`` holds; ``None``: every step."""


def train_stage_batch(inputs: StageInputs) -> StageOutput:
    """Full-batch GD of a batch of cells in coefficient space (shapes: ``StageInputs``).

    ``form`` is the network's (activation, reductions, bias); with a bias every response enters the
    activation as ``R + b``, and b moves by the sum over patches of the responses' step.

    The steps run on the K = N + 2 patches GD actually sees, [xi_1..xi_N, +s, -s] (each cell its own s),
    so that one step is a dozen tensor operations whatever the batch: responses ``R = <w, patch>``,
    ``f = (sign / m) relu(R) A`` with ``A`` (K, N) placing each sample's two patches, the loss slope
    per sample, per patch through ``A^T``, and ``R += (1[R > 0] * step) Gram``: 2 (2m) K^2 FLOPs a step and
    cell for that product, the rest is elementwise. Coefficients are summed step by step and mapped back to
    [b_u, b_v1, b_v2, xi] (s's coefficient is that of +s minus that of -s). The eval steps (``eval_at``: a
    caller that keeps only the last point names only the last step) only keep a copy of the state; the test set and
    the decomposition are computed for several eval steps at once, on ``eval_threads`` threads (``EVAL_BLOCK_BYTES``
    bounds the memory this takes). The loss is computed at the end, at ``loss_at`` (``stage_loss``).

    Regularisers (docs/design.md section 8): ``step_scale`` multiplies a filter's step (and its bias's); the penalty
    kappa ||w - phi w(0)||^2 (phi = ``anchored``) adds -2 lr kappa (w - phi w(0)) to the step. With
    ``w = a w(0) + C . patches`` that is ``C <- (1 - 2 lr kappa) C``, ``a <- a - 2 lr kappa (a - phi)`` and
    ``R <- R - 2 lr kappa (R - phi R(0))``, elementwise and exact (a stays 1 for phi = 1).
    """
    start, test_start, norm2_start, gram, cross = (inputs.start, inputs.test_start, inputs.norm2_start, inputs.gram, inputs.cross)
    y, clean, test_y, test_clean = inputs.y, inputs.clean, inputs.test_y, inputs.test_clean
    signal_coefficients, signal_norms, lr = inputs.signal_coefficients, inputs.signal_norms, inputs.lr
    steps, eval_every, record_coefficients = inputs.steps, inputs.eval_every, inputs.record_coefficients
    eval_threads, form, bias_start = inputs.eval_threads, inputs.form, inputs.bias_start
    step_scale, scale_until = inputs.step_scale, inputs.scale_until
    groups, cells, filters, vectors = start.shape
    width, n_train, n_test = filters // 2, y.shape[-1], test_y.shape[-1]
    patches, batch = n_train + 2, groups * cells
    dtype, device = start.dtype, start.device
    sign = torch.cat([torch.ones(width, dtype=dtype, device=device), -torch.ones(width, dtype=dtype, device=device)])
    # [xi; +s; -s] = embed @ [b; xi], per cell: (G, C, K, P)
    embed = torch.zeros(groups, cells, patches, vectors, dtype=dtype, device=device)
    embed[:, :, :n_train, 3:] = torch.eye(n_train, dtype=dtype, device=device)
    embed[:, :, n_train, :3] = signal_coefficients
    embed[:, :, n_train + 1, :3] = -signal_coefficients
    patch_gram = (embed @ gram[:, None] @ embed.transpose(-1, -2)).view(batch, patches, patches)
    # With many noise patches (SHARED_GRAM_SAMPLES), their block of the Gram matrix, the data group's and the same for
    # all its cells, takes one product per group in the response update, (C Fm, N) x (N, N); the two signal patches'
    # rows and columns, which differ by cell, take thin products per cell (the noise-to-signal columns are skipped
    # when all zero, as for noise projected off the signals in the gram sampling). With few, one product per cell.
    # Shared, the patch axis is padded (ROW_ALIGN_BYTES) with zero patches that nothing reads: K' columns.
    shared = n_train >= SHARED_GRAM_SAMPLES
    padded = patches
    if shared:
        noise_gram = gram[:, 3:, 3:].contiguous()
        signal_to_noise = patch_gram[:, n_train : n_train + 1, :n_train].contiguous()  # (C G, 1, N): <+s, xi>, -<-s, xi>
        coupled = bool(signal_to_noise.any())
        per_row = max(1, ROW_ALIGN_BYTES // start.element_size())
        aligned = -(-patches // per_row) * per_row
        padded = aligned if 16 * (aligned - patches) <= patches else patches  # worth it on long rows only
        # the signal rows' step: on every patch when coupled; else only on the two signal patches, +-|s|^2 (p_+s - p_-s)
        signal_rows = F.pad(patch_gram[:, n_train:], (0, padded - patches))  # (C G, 2, K')
        signal_norm2 = patch_gram[:, n_train, n_train, None]  # (C G, 1): |s|^2
    response = F.pad(start @ embed.transpose(-1, -2), (0, padded - patches))  # (G, C, Fm, K'): R = <w, patch>
    start_response = response.clone()
    coefficients = torch.zeros_like(response)
    # Sample i sees its noise patch and the signal patch of its clean label: f_i = h_i + h_{+s or -s}, with
    # h = (sign/m) relu(R) per patch; a patch's loss slope is its samples' d loss / d f_i = -y_i sigmoid(-y_i f_i) / N.
    clean_plus = (clean > 0)[:, None, :]
    by_clean = torch.stack([clean > 0, clean < 0], dim=-1).to(dtype)  # (G, N, 2): the signal patch of each sample
    loss_weight = (-y / n_train)[:, None, :]
    per_patch = torch.zeros(groups, cells, padded, dtype=dtype, device=device)
    negative_labels = -y[:, None, :]
    divisor, factor, sigma = form.filter_divisor(width), form.patch_factor, form.sigma
    plain = form.is_paper_relu
    relu = form.activation == "relu"  # with a bias too: relu(R + b) by a clamp into ``positive``, its derivative a comparison
    bias = None if bias_start is None else bias_start.clone()
    shrink = pull = scale = None
    if inputs.decay is not None:
        shrink = 2 * lr[..., None] * inputs.decay  # (G, C, Fm): 2 lr kappa
        pull = inputs.anchored.to(dtype)
        scale = torch.ones(groups, cells, filters, dtype=dtype, device=device)
    signs_over_m = (sign / divisor * factor).expand(batch, 1, filters)
    # the step of a filter of output +1 / -1 per unit of d loss / d patch: (G, C, 2, 1, 1)
    output_step = ((-lr / divisor * factor)[..., None] * torch.tensor([1.0, -1.0], dtype=dtype, device=device))[..., None, None]
    by_output_shape = (groups, cells, 2, width, padded)
    one = torch.ones((), dtype=dtype, device=device)
    positive = torch.empty_like(response)
    batch_response, batch_positive = response.view(batch, filters, padded), positive.view(batch, filters, padded)
    group_noise_response = response.view(groups, cells * filters, padded)[..., :n_train]
    group_noise_positive = positive.view(groups, cells * filters, padded)[..., :n_train]
    # views the steps read, made once (a view costs about as much as a small operation)
    real_positive, signal_positive = batch_positive[..., :patches], batch_positive[..., n_train:patches]
    plus_positive, minus_positive = batch_positive[..., n_train], batch_positive[..., n_train + 1]
    plus_response, minus_response = batch_response[..., n_train], batch_response[..., n_train + 1]
    noise_positive_t, positive_by_output = batch_positive[..., :n_train].transpose(1, 2), positive.view(by_output_shape)
    noise_slope, signal_slope, slope_by_output = (
        per_patch[..., :n_train],
        per_patch[..., n_train:patches],
        per_patch[:, :, None, None, :],
    )
    checkpoints = list(inputs.eval_at) if inputs.eval_at is not None else eval_steps(steps, eval_every)
    exponents = torch.empty(steps + 1, groups, cells, n_train, dtype=dtype, device=device)  # -y f, every step
    train_acc = torch.empty(groups, cells, len(checkpoints), dtype=torch.float32, device=device)
    test_acc = torch.empty_like(train_acc)
    decomposition = torch.empty(groups, cells, len(checkpoints), len(DECOMPOSITION_NAMES), dtype=dtype, device=device)
    trajectory: list[Tensor] | None = [] if record_coefficients else None
    test_start = test_start.reshape(groups, 1, cells * filters, n_test)
    positive_test_clean = (test_clean > 0)[:, None, None, :]
    own_plus = (y > 0)[:, None, None, None, :]
    per_eval_bytes = batch * filters * max(n_test, 2 * padded) * start.element_size()
    block = max(1, EVAL_BLOCK_BYTES // per_eval_bytes)
    # (eval index, coefficients, response, h, bias, scale)
    pending: list[tuple[int, Tensor, Tensor, Tensor, Tensor | None, Tensor | None]] = []

    def real(values: Tensor) -> Tensor:
        """The K real patches of ``values`` (..., K'), without the padding."""
        return values[..., :patches]

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
        scales = None if scale is None else torch.stack([item[5] for item in pending], dim=1)  # (G, E, C, Fm)
        margin = (exponents[[checkpoints[i] for i in index]] * negative_labels).transpose(0, 1)  # (G, E, C, N)
        train_acc[..., index] = _accuracy(margin, y[:, None, None, :]).transpose(1, 2)
        base = to_base(ext)
        flat = base.view(groups, evals * cells * filters, vectors)
        test_response = torch.bmm(flat, cross).view(groups, evals, cells * filters, n_test)
        if scales is None:
            test_response.add_(test_start)
        else:
            test_response.add_(scales.view(groups, evals, cells * filters, 1) * test_start)
        if plain:
            test_response.clamp_min_(0)
        else:
            if bias is not None:
                biases = torch.stack([item[4] for item in pending], dim=1).view(groups, evals, cells * filters, 1)
                test_response.add_(biases)
            test_response = test_response.clamp_min_(0) if relu else sigma(test_response)
        test_halves = test_response.view(groups, evals, cells, 2, width, n_test)
        test_margin = (test_halves[:, :, :, 0].sum(3) - test_halves[:, :, :, 1].sum(3)) / divisor * factor + torch.where(
            positive_test_clean, h[..., n_train, None], h[..., n_train + 1, None]
        )
        test_acc[..., index] = _accuracy(test_margin, test_y[:, None, None, :]).transpose(1, 2)
        start_basis = start[:, None, ..., :3] if scales is None else scales[..., None] * start[:, None, ..., :3]
        along_basis = start_basis + torch.bmm(flat, gram[:, :, :3]).view(groups, evals, cells, filters, 3)
        learned = sign[:, None] * along_basis * signal_norms[:, None, :, None, :]  # j <w, a>, a in u, v1, v2
        by_output = resp[..., :n_train].view(groups, evals, cells, 2, width, n_train)
        own = torch.where(own_plus, by_output[:, :, :, 0], by_output[:, :, :, 1])  # <w_{y_i, r}, xi_i>
        if scales is None:
            norms = (norm2_start[:, None] + real(ext * (resp + start_response[:, None])).sum(-1)).clamp_min(0).sqrt()
        else:
            norms = (
                (
                    scales.square() * norm2_start[:, None]
                    + real(ext * (resp + scales[..., None] * start_response[:, None])).sum(-1)
                )
                .clamp_min(0)
                .sqrt()
            )
        decomposition[:, :, index] = torch.cat(
            [
                torch.stack([learned.amax(3), learned.mean(3)], dim=-1).flatten(-2),
                own.amax((-2, -1))[..., None],
                own.mean((-2, -1))[..., None],
                norms.mean(-1, keepdim=True),
            ],
            dim=-1,
        ).transpose(1, 2)
        if trajectory is not None:
            trajectory.extend(base.unbind(1))
        pending.clear()

    evaluation = 0
    for step in range(steps + 1):
        if plain:
            torch.clamp_min(response, 0, out=positive)
        elif relu:  # with a bias (without one the path is plain)
            torch.add(response, bias[..., None], out=positive).clamp_min_(0)
        else:
            pre = response if bias is None else response + bias[..., None]
            positive.copy_(sigma(pre))
        h = torch.bmm(signs_over_m, real_positive).view(groups, cells, patches)  # the real patches: BLAS
        # blocks a product by its width, so a padded one would round differently
        f = h[..., :n_train] + torch.where(clean_plus, h[..., n_train, None], h[..., n_train + 1, None])
        exponent = torch.mul(f, negative_labels, out=exponents[step])  # -y f
        if evaluation < len(checkpoints) and step == checkpoints[evaluation]:
            pending.append(
                (
                    evaluation,
                    coefficients.clone(),
                    response.clone(),
                    h,
                    None if bias is None else bias.clone(),
                    None if scale is None else scale.clone(),
                )
            )
            evaluation += 1
            if len(pending) == block or evaluation == len(checkpoints):
                evaluate()
        if step == steps:
            break
        # softplus' gradient: the sigmoid, exactly 1 above softplus' threshold
        slope = torch.where(exponent > SOFTPLUS_THRESHOLD, one, torch.sigmoid(exponent))
        torch.mul(slope, loss_weight, out=noise_slope)
        torch.bmm(noise_slope, by_clean, out=signal_slope)
        step_by_output = slope_by_output * output_step  # (G, C, 2, 1, K), small
        if relu:
            positive.gt_(0)  # relu's derivative 1[R + b > 0], from relu(R + b) >= 0 (faster than sign_)
        else:
            positive.copy_(sigma.derivative(pre))
        positive_by_output.mul_(step_by_output)  # now this step's coefficient update
        if step_scale is not None:
            multiplier = step_scale if scale_until is None else torch.where((step < scale_until)[..., None], step_scale, one)
            positive.mul_(multiplier[..., None])
        if shrink is not None:  # the penalty's part of the step, from the state before it
            response.sub_(shrink[..., None] * (response - pull[..., None] * start_response))
            coefficients.mul_(1 - shrink[..., None])
            scale.sub_(shrink * (scale - pull))
            if bias is not None:
                bias.sub_(shrink * (bias - pull * bias_start))
        if bias is not None:
            bias.add_(real(positive).sum(-1))
        if shared:
            group_noise_response.baddbmm_(group_noise_positive, noise_gram)
            if coupled:
                batch_response.baddbmm_(signal_positive, signal_rows)
                # the noise patches' step along +s, and its negative along -s, as (1, N) x (N, Fm): 2.4x faster than
                # the two rows at once, 3-4x than (Fm, N) x (N, 1) on the CPU
                along_s = torch.bmm(signal_to_noise, noise_positive_t)[:, 0]
                plus_response.add_(along_s)
                minus_response.sub_(along_s)
            else:  # elementwise: a batch of (Fm, 2) x (2, 2) products is a loop of tiny calls
                along = torch.sub(plus_positive, minus_positive).mul_(signal_norm2)
                plus_response.add_(along)
                minus_response.sub_(along)
        else:
            batch_response.baddbmm_(batch_positive, patch_gram)
        coefficients.add_(positive)
    loss, loss_steps = stage_loss(exponents, inputs.loss_at)
    if scale is None:
        norm2 = norm2_start + real(coefficients * (response + start_response)).sum(-1)
    else:
        norm2 = scale.square() * norm2_start + real(coefficients * (response + scale[..., None] * start_response)).sum(-1)
    return StageOutput(
        loss,
        train_acc,
        test_acc,
        decomposition,
        to_base(coefficients[:, None])[:, 0],
        norm2,
        torch.stack(trajectory, dim=2) if trajectory is not None else None,
        bias,
        scale,
        tuple(checkpoints),
        loss_steps,
    )


def stage_loss(exponents: Tensor, loss_at: tuple[int, ...] | None) -> tuple[Tensor, tuple[int, ...] | None]:
    """The mean logistic loss (G, C, L) from the exponents ``-y f`` (T + 1, G, C, N) at the steps ``loss_at`` (and
    those steps), or at every step (and ``None``) when ``loss_at`` is ``None`` or some loss may not be finite.

    softplus(e) lies in [0, max(e, 0) + log 2], so while every exponent is at most ``finfo.max / (2N)`` (no NaN) every
    step's mean is finite and only the kept steps are computed; one max over the exponents decides it (a pass with no
    transcendental, against softplus' exp and log1p over every step)."""
    if loss_at is not None:
        bound = torch.finfo(exponents.dtype).max / (2 * exponents.shape[-1])
        if bool(exponents.amax() <= bound):  # False for a NaN anywhere
            return F.softplus(exponents[list(loss_at)]).mean(-1).permute(1, 2, 0), tuple(loss_at)
    return F.softplus(exponents).mean(-1).permute(1, 2, 0), None

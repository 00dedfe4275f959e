"""The two-layer CNN family of the benign-overfitting literature (bias, init, reductions, activations, noise
projection, signal position): both engines against plain autograd GD on a hand-written network."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor

from ptlab.config import TOY_ACTIVATIONS, TOY_INITS, TOY_REDUCTIONS, ToyCNNSchema
from ptlab.data import FullBatchDataModule
from ptlab.engines.base import Stage
from ptlab.engines.gram import GramCell, GramEngine, kernel, reconstruct_weights, run_cells
from ptlab.models.two_layer_cnn import ACTIVATIONS, INITS, REDUCTIONS, ModelForm, TwoLayerReLUCNN
from ptlab.modules import FullBatchGD, sign_accuracy
from ptlab.pipeline.synthetic import build_model, make_data
from ptlab.seeding import derive_seed
from ptlab.spec import parse
from ptlab.transfer import transfer_parameters

BASE = (
    "train.dtype=float64",
    "task.d=40",
    "task.n1=12",
    "task.n2=8",
    "task.n_test=60",
    "model.width=3",
    "train.upstream_steps=20",
    "train.downstream_steps=15",
    "train.eval_every=5",
    "task.label_noise=0.2",
    "train.lr=0.2",
    "model.init_std=0.1",
    "transfer.selection=largest_norm",
)
VARIANTS = {
    "bias": ["model.bias=true"],
    "torch_init": ["model.init=torch"],
    "filter_sum": ["model.filter_reduction=sum", "train.lr=0.05"],
    "patch_mean": ["model.patch_reduction=mean"],
    "relu_q": ["model.activation=relu_q", "model.q=3", "model.init_std=0.3"],
    "leaky_relu": ["model.activation=leaky_relu", "model.negative_slope=0.1"],
    "unprojected_noise": ["task.project_noise=false"],
    "random_position": ["task.signal_position=random"],
    "kou2023": [
        "model.bias=true",
        "model.init=torch",
        "model.filter_reduction=sum",
        "model.patch_reduction=mean",
        "task.project_noise=false",
        "train.lr=0.1",
    ],
}
ACTIVATION = {
    "relu": lambda z, model: z.clamp(min=0),
    "relu_q": lambda z, model: z.clamp(min=0) ** model.form.q,
    "leaky_relu": lambda z, model: torch.where(z > 0, z, model.form.negative_slope * z),
}


def reference_margin(model: TwoLayerReLUCNN, weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """``f = F_{+1} - F_{-1}`` written out from the definition, for ``model``'s form."""
    pre = torch.einsum("npd,jmd->npjm", x, weight)
    if bias is not None:
        pre = pre + bias
    act = ACTIVATION[model.form.activation](pre, model)
    over_patches = act.sum(1) / (2 if model.form.patch_reduction == "mean" else 1)
    scores = over_patches.sum(-1) / (model.width if model.form.filter_reduction == "mean" else 1)
    return scores[:, 0] - scores[:, 1]


def plain_gd(model: TwoLayerReLUCNN, x: Tensor, y: Tensor, lr: float, steps: int) -> tuple[Tensor, Tensor | None]:
    """Full-batch GD on the mean logistic loss by autograd, from ``model``'s parameters."""
    weight = model.weight.detach().clone().requires_grad_(True)
    bias = None if model.bias is None else model.bias.detach().clone().requires_grad_(True)
    params = [weight] + ([bias] if bias is not None else [])
    for _ in range(steps):
        grads = torch.autograd.grad(F.softplus(-y * reference_margin(model, weight, bias, x)).mean(), params)
        with torch.no_grad():
            for param, grad in zip(params, grads):
                param -= lr * grad
    return weight.detach(), None if bias is None else bias.detach()


def close(got: Tensor, want: Tensor) -> float:
    return ((got - want).norm() / want.norm()).item()


@pytest.fixture(params=list(VARIANTS))
def variant_cfg(request, make_cfg):
    return make_cfg(*BASE, *VARIANTS[request.param])


@pytest.mark.parametrize("shared_gram", [False, True], ids=["per_cell_gram", "shared_noise_gram"])
def test_gram_engine_matches_plain_gd(variant_cfg, shared_gram: bool, monkeypatch) -> None:
    """Every stage of the batched gram engine (upstream, transfer with its copied filters and biases,
    scratch) rebuilds to plain GD's weights and biases, with plain GD's test accuracy; with the response
    update by each cell's patch Gram matrix and by the data group's shared noise block."""
    monkeypatch.setattr(kernel, "SHARED_GRAM_SAMPLES", 1 if shared_gram else 10**9)
    cfg = parse(variant_cfg)
    result = run_cells([GramCell.from_spec(cfg)])[0]
    data = make_data(cfg)
    lr = cfg.train.lr
    upstream = build_model(cfg, "upstream")
    upstream_init = upstream.weight.detach().clone()
    trained = plain_gd(upstream, data.task1_train.x, data.task1_train.y, lr, cfg.train.upstream_steps)
    assert close(trained[0], upstream_init) > 1e-3  # training moved the filters
    with torch.no_grad():
        upstream.weight.copy_(trained[0])
        if upstream.bias is not None:
            upstream.bias.copy_(trained[1])
    transfer = build_model(cfg, "downstream")
    downstream_init = transfer.weight.detach().clone()
    transfer_parameters(
        upstream,
        transfer,
        cfg.transfer.alpha,
        cfg.transfer.selection,
        torch.Generator().manual_seed(derive_seed(cfg.seed, "selection")),
    )
    scratch = build_model(cfg, "downstream")
    train2 = (data.task2_train.x, data.task2_train.y, lr, cfg.train.downstream_steps)
    expected = {
        "upstream": (upstream, trained, data.task1_test),
        "transfer": (transfer, plain_gd(transfer, *train2), data.task2_test),
        "scratch": (scratch, plain_gd(scratch, *train2), data.task2_test),
    }
    noise = {1: data.task1_train.noise, 2: data.task2_train.noise}
    for name, (model, (weight, bias), test) in expected.items():
        stage = result.stages[name]
        got = reconstruct_weights(stage, data.directions.basis, noise, upstream_init, downstream_init)
        assert close(got, weight) < 1e-9, name
        if bias is None:
            assert stage.bias is None
        else:
            assert close(stage.bias, bias) < 1e-9, name
        assert stage.final["test_acc"] == sign_accuracy(reference_margin(model, weight, bias, test.x), test.y), name


def scratch_stage(cfg) -> tuple[Stage, Tensor, Tensor | None]:
    data = make_data(parse(cfg))
    model = build_model(parse(cfg), "downstream")
    stage = Stage(
        "scratch",
        model,
        data.task2_train,
        data.task2_test,
        cfg.train.downstream_steps,
        cfg.train.lr,
        cfg.train.eval_every,
        data.directions,
        2,
        None,
        cfg.train.dtype,
    )
    return stage, *plain_gd(model, data.task2_train.x, data.task2_train.y, cfg.train.lr, cfg.train.downstream_steps)


DEFAULT_LIGHTNING = ("relu_q", "kou2023")
"""Variants whose Lightning check runs by default (the others are marked slow: a Lightning fit each)."""


@pytest.mark.parametrize(
    "variant", [name if name in DEFAULT_LIGHTNING else pytest.param(name, marks=pytest.mark.slow) for name in VARIANTS]
)
def test_lightning_and_single_stage_gram_match_plain_gd(make_cfg, variant: str) -> None:
    """The Lightning module (``FullBatchGD`` on the model class) and ``GramEngine.train_stage`` train the
    scratch stage to plain GD's weights and biases."""
    variant_cfg = make_cfg(*BASE, *VARIANTS[variant])
    stage, weight, bias = scratch_stage(variant_cfg)
    module = FullBatchGD(stage.model, lr=stage.lr, eval_every=stage.eval_every)
    trainer = pl.Trainer(
        max_steps=stage.steps,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        precision="64-true",
    )
    trainer.fit(module, datamodule=FullBatchDataModule(stage.train.x, stage.train.y, steps=stage.steps))
    assert close(stage.model.weight.detach(), weight) < 1e-10
    if bias is not None:
        assert close(stage.model.bias.detach(), bias) < 1e-10
    gram_stage, _, _ = scratch_stage(variant_cfg)
    GramEngine().train_stage(gram_stage)
    assert close(gram_stage.model.weight.detach(), weight) < 1e-9
    if bias is not None:
        assert close(gram_stage.model.bias.detach(), bias) < 1e-9


def test_forward_on_a_hand_built_example() -> None:
    """Bias, leaky ReLU, sum over filters and mean over patches on one sample, by hand."""
    model = TwoLayerReLUCNN(
        2, width=2, bias=True, activation="leaky_relu", negative_slope=0.5, filter_reduction="sum", patch_reduction="mean"
    ).double()
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[[1.0, 0.0], [0.0, 2.0]], [[-1.0, 1.0], [1.0, 1.0]]]))
        model.bias.copy_(torch.tensor([[0.0, -1.0], [1.0, 0.0]]))
    x = torch.tensor([[[1.0, 2.0], [-3.0, 1.0]]], dtype=torch.float64)
    # +1: filter (1,0) b=0: 1, -3 -> 1, -1.5; filter (0,2) b=-1: 3, 1 -> sum over both = (1 - 1.5 + 3 + 1) / 2 = 1.75
    # -1: filter (-1,1) b=1: 2, 5; filter (1,1) b=0: 3, -2 -> -1 -> (2 + 5 + 3 - 1) / 2 = 4.5
    assert torch.allclose(model.output_scores(x), torch.tensor([[1.75, 4.5]], dtype=torch.float64))


def test_torch_init_is_conv1d_default() -> None:
    """``init=torch`` draws exactly what a fresh ``nn.Conv1d(1, 2m, d, stride=d)`` draws: U(+-1/sqrt(d))."""
    torch.manual_seed(4)
    model = TwoLayerReLUCNN(400, width=5, init="torch", bias=True)
    torch.manual_seed(4)
    conv = torch.nn.Conv1d(1, 10, 400, stride=400)
    assert torch.equal(model.weight.detach().reshape(10, 400), conv.weight.detach().reshape(10, 400))
    assert torch.equal(model.bias.detach().reshape(-1), conv.bias.detach())
    assert model.weight.abs().max().item() <= 400**-0.5
    assert model.weight.std().item() == pytest.approx(400**-0.5 / 3**0.5, rel=0.05)


def test_config_lists_match_the_model() -> None:
    assert TOY_ACTIVATIONS == ACTIVATIONS.names() and TOY_INITS == INITS and set(TOY_REDUCTIONS) == set(REDUCTIONS)


def test_schema_defaults_are_the_model_forms() -> None:
    """The torch-free schema (what the CLI validates) and ``ModelForm`` (what the model computes) name the same
    variant keys with the same defaults: the paper's network."""
    schema = ToyCNNSchema()
    for name, spec in ModelForm.__dataclass_fields__.items():
        assert getattr(schema, name) == spec.default, name


def test_random_signal_position_only_swaps_patches(make_cfg) -> None:
    """The random position swaps each sample's two patches with probability 1/2 and changes no other draw."""
    fixed, random = (make_data(parse(make_cfg(f"task.signal_position={p}", "task.n2=400"))) for p in ("fixed", "random"))
    second = random.task2_train.signal_second
    assert 0.4 < second.double().mean().item() < 0.6
    assert torch.equal(random.task2_train.noise, fixed.task2_train.noise)
    assert torch.equal(random.task2_train.x[second], fixed.task2_train.x[second].flip(1))
    assert torch.equal(random.task2_train.x[~second], fixed.task2_train.x[~second])


def test_unprojected_noise_has_its_signal_component(make_cfg) -> None:
    """``project_noise=false``: the noise keeps its part along the signal directions (variance sigma_p^2)."""
    cfg = parse(make_cfg("task.project_noise=false", "task.n2=4000", "noise.sigma_p2=2.0"))
    data = make_data(cfg)
    along = data.task2_train.noise.double() @ data.directions.basis.double()
    assert along.var(0).tolist() == pytest.approx([4.0, 4.0, 4.0], rel=0.1)
    projected = make_data(parse(make_cfg("task.n2=50"))).task2_train.noise.double() @ data.directions.basis.double()
    assert projected.abs().max().item() < 1e-4

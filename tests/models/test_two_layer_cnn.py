"""The two-layer ReLU CNN and one full-batch GD step, against hand computation."""

import math

import pytest
import pytorch_lightning as pl
import torch

from ptlab.data import FullBatchDataModule
from ptlab.models import TwoLayerReLUCNN
from ptlab.modules import FullBatchGD


def test_forward_equals_the_formula_on_a_hand_built_example():
    model = TwoLayerReLUCNN(input_dim=2, width=2, init_std=0.0).double()
    with torch.no_grad():
        model.weight.copy_(
            torch.tensor(
                [
                    [[1.0, 0.0], [0.0, 2.0]],  # filters of output +1
                    [[-1.0, 1.0], [1.0, 1.0]],
                ]
            )
        )  # filters of output -1
    x = torch.tensor([[[1.0, 2.0], [-3.0, 1.0]]], dtype=torch.float64)  # one sample: x1=(1,2), x2=(-3,1)
    # F_{+1} = 1/2 [relu(1)+relu(-3) + relu(4)+relu(2)] = 1/2 [1 + 0 + 4 + 2] = 3.5
    # F_{-1} = 1/2 [relu(1)+relu(4) + relu(3)+relu(-2)] = 1/2 [1 + 4 + 3 + 0] = 4.0
    assert torch.allclose(model.output_scores(x), torch.tensor([[3.5, 4.0]], dtype=torch.float64))
    assert model(x).item() == -0.5


def test_init_is_gaussian_with_the_requested_std():
    torch.manual_seed(0)
    model = TwoLayerReLUCNN(input_dim=1000, width=40, init_std=0.01)
    assert model.weight.shape == (2, 40, 1000)
    assert model.weight.std().item() == pytest.approx(0.01, rel=0.02)
    assert abs(model.weight.mean().item()) < 1e-3 * 0.01 * 30


def hand_gradient(weight: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """dL/dw_{j,r} = (1/N) sum_i l'_i y_i s_j (1/m) sum_p 1[<w_{j,r}, x_ip> > 0] x_ip,
    with l'_i = -1 / (1 + exp(y_i f_i)) and s_j = +1, -1."""
    _, m, d = weight.shape
    n = x.shape[0]
    grad = torch.zeros_like(weight)
    for i in range(n):
        f = 0.0
        for j, sign in enumerate((1.0, -1.0)):
            for r in range(m):
                for p in range(2):
                    f += sign * max(0.0, float(weight[j, r] @ x[i, p])) / m
        dloss = -1.0 / (1.0 + math.exp(float(y[i]) * f))
        for j, sign in enumerate((1.0, -1.0)):
            for r in range(m):
                for p in range(2):
                    if float(weight[j, r] @ x[i, p]) > 0:
                        grad[j, r] += dloss * float(y[i]) * sign * x[i, p] / (m * n)
    return grad


def test_one_gd_step_equals_the_hand_computed_gradient():
    torch.manual_seed(3)
    model = TwoLayerReLUCNN(input_dim=5, width=3, init_std=0.5).double()
    x = torch.randn(4, 2, 5, dtype=torch.float64)
    y = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)
    before = model.weight.detach().clone()
    expected = before - 0.1 * hand_gradient(before, x, y)
    module = FullBatchGD(model, lr=0.1, eval_every=1)
    trainer = pl.Trainer(
        max_steps=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        precision="64-true",
    )
    trainer.fit(module, datamodule=FullBatchDataModule(x, y, steps=1))
    assert torch.allclose(model.weight.detach(), expected, rtol=0, atol=1e-14)
    assert not torch.allclose(model.weight.detach(), before)


def test_full_batch_gd_runs_exactly_t_steps_and_records_curves():
    torch.manual_seed(0)
    model = TwoLayerReLUCNN(input_dim=4, width=2, init_std=0.1).double()
    x = torch.randn(6, 2, 4, dtype=torch.float64)
    y = torch.tensor([1.0, -1.0] * 3, dtype=torch.float64)
    module = FullBatchGD(model, lr=0.05, eval_sets={"test": (x, y)}, eval_every=5)
    trainer = pl.Trainer(
        max_steps=12,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=FullBatchDataModule(x, y, steps=12))
    assert trainer.global_step == 12
    assert [s for s, _ in module.curves["train/loss"]] == list(range(13))
    assert [s for s, _ in module.curves["test/acc"]] == [0, 5, 10, 12]
    losses = [v for _, v in module.curves["train/loss"]]
    assert losses[-1] < losses[0]
    assert module.final["train_loss"] == losses[-1]

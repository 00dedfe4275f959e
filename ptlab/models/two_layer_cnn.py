"""The two-layer CNN on two-patch inputs of the paper and of the benign-overfitting literature
(docs/design.md section 1).

The paper's network is ``F_j(W; x) = (1/m) sum_r [relu(<w_{j,r}, x1>) + relu(<w_{j,r}, x2>)]``; the
variants of that literature change one piece each (``ModelForm``): a bias per filter, the activation
(ReLU, ReLU^q of Cao et al. 2022, leaky ReLU), the reduction over the m filters (mean or sum) and over
the two patches (sum or mean). The init is N(0, sigma_0^2) or PyTorch's default ``nn.Conv1d`` init of a
one-channel convolution with kernel and stride d (uniform in +-1/sqrt(d), bias too), as Kou et al. 2023
train it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptlab.registry import Registry


class Activation:
    """An activation ``sigma`` with the derivative autograd takes of it (the gram engine steps with it)."""

    def __init__(self, q: float = 2.0, negative_slope: float = 0.01) -> None:
        self.q, self.negative_slope = q, negative_slope

    def __call__(self, z: Tensor) -> Tensor:
        raise NotImplementedError

    def derivative(self, z: Tensor) -> Tensor:
        raise NotImplementedError


ACTIVATIONS: Registry[type[Activation]] = Registry("model.activation")
"""Activation names (``model.activation``) and their classes."""


@ACTIVATIONS.register("relu")
class ReLU(Activation):
    """``max(z, 0)``; derivative ``1[z > 0]`` (0 at the kink, as autograd)."""

    def __call__(self, z: Tensor) -> Tensor:
        return torch.relu(z)

    def derivative(self, z: Tensor) -> Tensor:
        return (z > 0).to(z.dtype)


@ACTIVATIONS.register("relu_q")
class PolynomialReLU(Activation):
    """``max(z, 0)^q`` (q > 1, Cao et al. 2022); derivative ``q max(z, 0)^(q - 1)``."""

    def __call__(self, z: Tensor) -> Tensor:
        return torch.relu(z).pow(self.q)

    def derivative(self, z: Tensor) -> Tensor:
        return self.q * torch.relu(z).pow(self.q - 1)


@ACTIVATIONS.register("leaky_relu")
class LeakyReLU(Activation):
    """``z`` above 0, ``negative_slope * z`` below; derivative 1 above 0 and ``negative_slope`` at and below
    (torch's rule)."""

    def __call__(self, z: Tensor) -> Tensor:
        return F.leaky_relu(z, self.negative_slope)

    def derivative(self, z: Tensor) -> Tensor:
        return torch.where(
            z > 0,
            torch.ones((), dtype=z.dtype, device=z.device),
            torch.full((), self.negative_slope, dtype=z.dtype, device=z.device),
        )


REDUCTIONS = {"sum": torch.sum, "mean": torch.mean}
"""``model.filter_reduction`` / ``model.patch_reduction`` names and their torch reductions."""
INITS = ("normal", "torch")
"""``model.init``: N(0, init_std^2), or PyTorch's default ``nn.Conv1d`` init."""


@dataclass(frozen=True)
class ModelForm:
    """What the network computes, apart from its weights (the keys of ``conf/model/toy_cnn.yaml``)."""

    bias: bool = False
    activation: str = "relu"
    q: float = 2.0
    negative_slope: float = 0.01
    filter_reduction: str = "mean"
    patch_reduction: str = "sum"

    @property
    def sigma(self) -> Activation:
        return ACTIVATIONS.get(self.activation)(self.q, self.negative_slope)

    def filter_divisor(self, width: int) -> int:
        """``F_j`` is the sum over filters divided by this: m for the mean (the paper), 1 for the sum."""
        return width if self.filter_reduction == "mean" else 1

    @property
    def patch_factor(self) -> float:
        """The sum over the two patches is multiplied by this: 1 for the sum (the paper), 1/2 for the mean."""
        return 1.0 if self.patch_reduction == "sum" else 0.5

    @property
    def is_paper_relu(self) -> bool:
        """Plain ReLU without bias: the engine's fastest path."""
        return self.activation == "relu" and not self.bias


class TwoLayerReLUCNN(nn.Module):
    """``f(W; x) = F_{+1}(W; x) - F_{-1}(W; x)`` with ``F_j(W; x) = red_r red_p sigma(<w_{j,r}, x_p> + b_{j,r})``
    (the paper: sigma = ReLU, no bias, sum over the 2 patches, mean over the m filters).

    ``weight`` has shape (2, m, d): index 0 holds the filters of output +1, index 1 those of -1; ``bias``
    (2, m) when ``bias``. Only the first layer is trained; the second layer is fixed (+-1/m for the mean
    over filters, +-1 for the sum).
    """

    def __init__(
        self,
        input_dim: int,
        width: int = 40,
        init_std: float = 0.01,
        init: str = "normal",
        bias: bool = False,
        activation: str = "relu",
        q: float = 2.0,
        negative_slope: float = 0.01,
        filter_reduction: str = "mean",
        patch_reduction: str = "sum",
    ) -> None:
        super().__init__()
        if init not in INITS:
            raise ValueError(f"model.init={init!r} is not allowed: must be one of {', '.join(INITS)}")
        self.input_dim, self.width, self.init_std, self.init = input_dim, width, init_std, init
        self.form = ModelForm(bias, activation, q, negative_slope, filter_reduction, patch_reduction)
        self.sigma = self.form.sigma
        self.weight = nn.Parameter(torch.empty(2, width, input_dim))
        self.bias = nn.Parameter(torch.empty(2, width)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw the init from torch's global RNG: every entry N(0, init_std^2) (bias too), or the weights and
        bias of a fresh ``nn.Conv1d(1, 2m, kernel_size=d, stride=d)``."""
        with torch.no_grad():
            if self.init == "torch":
                conv = nn.Conv1d(1, 2 * self.width, self.input_dim, stride=self.input_dim, bias=self.bias is not None)
                self.weight.copy_(conv.weight.view_as(self.weight))
                if self.bias is not None:
                    self.bias.copy_(conv.bias.view_as(self.bias))
                return
            nn.init.normal_(self.weight, mean=0.0, std=self.init_std)
            if self.bias is not None:
                nn.init.normal_(self.bias, mean=0.0, std=self.init_std)

    def hidden(self, x: Tensor) -> Tensor:
        """The 2m hidden activations reduced over the patches, ``red_p sigma(<w_{j,r}, x_p> + b_{j,r})``, for inputs
        ``x`` of shape (N, 2, d): returns (N, 2, m), the features the fixed second layer reads."""
        n, patches, d = x.shape
        pre = x.reshape(n * patches, d) @ self.weight.reshape(-1, d).T  # (N*P, 2m)
        if self.bias is not None:
            pre = pre + self.bias.reshape(-1)
        act = self.sigma(pre).reshape(n, patches, 2, self.width)
        return REDUCTIONS[self.form.patch_reduction](act, dim=1)

    def output_scores(self, x: Tensor) -> Tensor:
        """``F_{+1}`` and ``F_{-1}`` for inputs ``x`` of shape (N, 2, d): returns (N, 2)."""
        return REDUCTIONS[self.form.filter_reduction](self.hidden(x), dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """The margin ``f(W; x)`` of shape (N,); the prediction is its sign."""
        scores = self.output_scores(x)
        return scores[:, 0] - scores[:, 1]

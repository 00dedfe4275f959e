"""The paper's two-layer ReLU CNN on two-patch inputs (docs/design.md section 1)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class TwoLayerReLUCNN(nn.Module):
    """``f(W; x) = F_{+1}(W; x) - F_{-1}(W; x)`` with
    ``F_j(W; x) = (1/m) sum_r [relu(<w_{j,r}, x1>) + relu(<w_{j,r}, x2>)]``.

    ``weight`` has shape (2, m, d): index 0 holds the filters of output +1, index 1 those of -1. Only
    the first layer is trained; the second layer is fixed to +-1/m as in the paper.
    """

    def __init__(self, input_dim: int, width: int = 40, init_std: float = 0.01) -> None:
        super().__init__()
        self.input_dim, self.width, self.init_std = input_dim, width, init_std
        self.weight = nn.Parameter(torch.empty(2, width, input_dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Draw every filter entry from N(0, init_std^2) (from torch's global RNG)."""
        nn.init.normal_(self.weight, mean=0.0, std=self.init_std)

    def output_scores(self, x: Tensor) -> Tensor:
        """``F_{+1}`` and ``F_{-1}`` for inputs ``x`` of shape (N, 2, d): returns (N, 2)."""
        n, patches, d = x.shape
        pre = x.reshape(n * patches, d) @ self.weight.reshape(-1, d).T  # (N*P, 2m)
        act = torch.relu(pre).reshape(n, patches, 2, self.width)
        return act.sum(dim=1).mean(dim=-1)

    def forward(self, x: Tensor) -> Tensor:
        """The margin ``f(W; x)`` of shape (N,); the prediction is its sign."""
        scores = self.output_scores(x)
        return scores[:, 0] - scores[:, 1]

"""The Gram matrix of the synthetic task's Gaussian vectors, sampled without drawing anything in R^d
(``task.sampling=gram``; the derivation is docs/design.md section 3, "Training data without d").

The vectors are the unit signal basis ``B`` (d, 3), random and orthonormal, and blocks of independent
Gaussian vectors ``v_i = s_i z_i`` or ``s_i P z_i`` (``z_i ~ N(0, I_d)``, ``P = I - B B^T``): the noise
patches (projected or not) and the Gaussian inits (never projected). With ``Z`` the stacked ``z_i`` (n, d),
``A = Z B`` (n, 3) is standard Gaussian and independent of ``Z P Z^T``, which is Wishart with identity
scale and ``d - 3`` degrees of freedom (``Z P Z^T = (Z Q)(Z Q)^T`` for an orthonormal basis ``Q`` of the range
of ``P``). Every inner product is a function of the two:
``<v_i, v_j> = s_i s_j (S_ij + f_i f_j A_i . A_j)``, ``<v_i, b_a> = s_i f_i A_ia``, ``<b_a, b_c> = delta_ac``,
with ``f_i`` 1 for an unprojected vector and 0 for a projected one. The Wishart draw uses Bartlett's
decomposition, ``S = L L^T`` with ``L`` lower triangular, ``L_kk^2 ~ chi^2(d - 3 - k)`` (k = 0..n-1) and
standard normal entries below the diagonal: O(n^3), whatever d. Below ``n`` degrees of freedom the
Wishart matrix is singular and is drawn as ``G G^T`` from an (n, d - 3) Gaussian ``G`` instead (then d < n + 3,
so that is cheap too).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

SIGNAL_DIRECTIONS = 3
"""u, v1, v2: the basis the noise is projected off."""
SAMPLINGS = ("dspace", "gram")
"""``task.sampling``: training data and inits drawn in R^d, or their Gram matrix drawn directly."""


@dataclass(frozen=True)
class GaussianBlock:
    """``count`` vectors ``scale * z`` (``projected``: ``scale * P z``) with ``z ~ N(0, I_d)`` independent."""

    count: int
    scale: float
    projected: bool


def bartlett_wishart(n: int, dof: int, rng: np.random.Generator) -> np.ndarray:
    """A draw (n, n) of the Wishart law with identity scale and ``dof`` degrees of freedom (float64)."""
    if dof < n:
        gauss = rng.standard_normal((n, dof))
        return gauss @ gauss.T
    lower = np.tril(rng.standard_normal((n, n)), -1)
    lower[np.diag_indices(n)] = np.sqrt(rng.chisquare(dof - np.arange(n)))
    return lower @ lower.T


def sample_gram(d: int, blocks: Sequence[GaussianBlock], rng: np.random.Generator) -> Tensor:
    """The Gram matrix (float64) of ``[b_u, b_v1, b_v2; block 1; block 2; ...]`` in R^d, drawn from its
    exact law (module docstring) in O(n^3) for n Gaussian vectors."""
    scale = np.concatenate([np.full(b.count, b.scale, dtype=np.float64) for b in blocks])
    full = np.concatenate([np.full(b.count, not b.projected, dtype=np.float64) for b in blocks])
    n = len(scale)
    wishart = bartlett_wishart(n, d - SIGNAL_DIRECTIONS, rng)
    along = rng.standard_normal((n, SIGNAL_DIRECTIONS)) * full[:, None]
    gram = np.empty((SIGNAL_DIRECTIONS + n, SIGNAL_DIRECTIONS + n))
    gram[:SIGNAL_DIRECTIONS, :SIGNAL_DIRECTIONS] = np.eye(SIGNAL_DIRECTIONS)
    gram[SIGNAL_DIRECTIONS:, :SIGNAL_DIRECTIONS] = scale[:, None] * along
    gram[:SIGNAL_DIRECTIONS, SIGNAL_DIRECTIONS:] = gram[SIGNAL_DIRECTIONS:, :SIGNAL_DIRECTIONS].T
    gram[SIGNAL_DIRECTIONS:, SIGNAL_DIRECTIONS:] = np.outer(scale, scale) * (wishart + along @ along.T)
    return torch.from_numpy(gram)


__all__ = ["GaussianBlock", "SAMPLINGS", "bartlett_wishart", "sample_gram"]

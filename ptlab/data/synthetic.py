"""The paper's two-patch synthetic tasks (docs/design.md section 1).

A sample of task k has a clean label ``y`` uniform on {-1, +1}, a signal patch ``y * (u + v_k)`` and a
noise patch ``xi ~ N(0, sigma_pk^2 P)`` with ``P`` the projector onto the orthogonal complement of
span{u, v1, v2}. The observed label is ``y`` flipped with probability ``label_noise``.

Two variants of the benign-overfitting literature (Kou et al. 2023): the noise not projected off the
signals (``project_noise=False``: ``xi ~ N(0, sigma_pk^2 I)``), and the signal patch at a random position
per sample (``signal_position="random"``: the two patches swapped with probability 1/2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ptlab.seeding import derive_seed

DTYPES = {"float32": torch.float32, "float64": torch.float64}
"""``train.dtype`` names and their torch dtypes."""


@dataclass(frozen=True)
class Directions:
    """The universal signal ``u`` and task-specific signals ``v1``, ``v2``, plus their orthonormal basis."""

    u: Tensor
    v1: Tensor
    v2: Tensor
    basis: Tensor  # (d, 3): orthonormal columns spanning u, v1, v2 directions

    def signal(self, task: int) -> Tensor:
        """``u + v_k`` for task k in {1, 2}."""
        return self.u + (self.v1 if task == 1 else self.v2)


@dataclass(frozen=True)
class PatchData:
    """Samples of one task: ``x`` (N, 2, d) with patches [signal, noise] (or, per sample, [noise, signal]
    where ``signal_second``), observed labels ``y`` (N,)."""

    x: Tensor
    y: Tensor
    clean_y: Tensor
    signal_second: Tensor | None = None
    """(N,) bool where the signal patch is the second one (random positions); None: always first."""

    @property
    def noise(self) -> Tensor:
        """The noise patches ``xi`` (N, d)."""
        if self.signal_second is None:
            return self.x[:, 1]
        return self.x[torch.arange(len(self.x)), (~self.signal_second).long()]

    def __len__(self) -> int:
        return self.x.shape[0]


@dataclass(frozen=True)
class SyntheticTransferData:
    """Everything a synthetic pipeline trains and tests on."""

    directions: Directions
    task1_train: PatchData
    task1_test: PatchData
    task2_train: PatchData
    task2_test: PatchData


def make_directions(d: int, u_norm: float, v_norm: float, generator: torch.Generator,
                    dtype: torch.dtype = torch.float32) -> Directions:
    """A seeded random orthonormal triple in R^d scaled to the norms of u, v1 and v2."""
    gauss = torch.randn(d, 3, generator=generator, dtype=torch.float64)
    basis, _ = torch.linalg.qr(gauss)
    u, v1, v2 = (basis[:, i] * norm for i, norm in enumerate((u_norm, v_norm, v_norm)))
    return Directions(u.to(dtype), v1.to(dtype), v2.to(dtype), basis.to(dtype))


SIGNAL_POSITIONS = ("fixed", "random")
"""``task.signal_position``: the signal patch first in every sample, or first or second at random."""


def sample_task(directions: Directions, task: int, n: int, sigma_p: float, label_noise: float,
                generator: torch.Generator, project_noise: bool = True, signal_position: str = "fixed") -> PatchData:
    """Draw ``n`` samples of task ``task`` (1 or 2); the variants draw after the paper's data, so its draws
    do not change."""
    if task not in (1, 2):
        raise ValueError(f"task must be 1 or 2, got {task}")
    dtype = directions.basis.dtype
    basis = directions.basis.double()
    d = basis.shape[0]
    clean_y = torch.randint(0, 2, (n,), generator=generator).to(dtype) * 2 - 1
    flips = torch.rand(n, generator=generator, dtype=torch.float64) < label_noise
    y = torch.where(flips, -clean_y, clean_y)
    gauss = torch.randn(n, d, generator=generator, dtype=torch.float64)
    if project_noise:
        gauss = gauss - (gauss @ basis) @ basis.T
    noise = (sigma_p * gauss).to(dtype)
    signal = clean_y[:, None] * directions.signal(task)[None, :]
    x = torch.stack([signal, noise], dim=1)
    if signal_position == "fixed":
        return PatchData(x=x, y=y, clean_y=clean_y)
    if signal_position != "random":
        raise ValueError(f"task.signal_position={signal_position!r} is not allowed: must be one of "
                         f"{', '.join(SIGNAL_POSITIONS)}")
    second = torch.rand(n, generator=generator, dtype=torch.float64) < 0.5
    x = torch.where(second[:, None, None], x.flip(1), x)
    return PatchData(x=x, y=y, clean_y=clean_y, signal_second=second)


def make_synthetic_data(d: int, n1: int, n2: int, n_test: int, u_norm: float, v_norm: float,
                        label_noise: float, sigma_p1: float, sigma_p2: float, seed: int,
                        dtype: torch.dtype = torch.float32, project_noise: bool = True,
                        signal_position: str = "fixed") -> SyntheticTransferData:
    """Directions, both tasks' training sets and ``n_test``-sample test sets, all from ``seed``.

    Each part draws from its own sub-seed, so the task-2 data do not change when a sweep varies
    task 1 (N1, sigma_p1): the scratch baseline stays fixed along such a sweep.
    """
    def gen(part: str) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(seed, part))

    directions = make_directions(d, u_norm, v_norm, gen("directions"), dtype)

    def part(task: int, n: int, sigma_p: float, name: str) -> PatchData:
        return sample_task(directions, task, n, sigma_p, label_noise, gen(name), project_noise, signal_position)

    return SyntheticTransferData(
        directions=directions,
        task1_train=part(1, n1, sigma_p1, "task1_train"),
        task1_test=part(1, n_test, sigma_p1, "task1_test"),
        task2_train=part(2, n2, sigma_p2, "task2_train"),
        task2_test=part(2, n_test, sigma_p2, "task2_test"),
    )

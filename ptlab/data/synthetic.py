"""The paper's two-patch synthetic tasks (docs/design.md section 1).

A sample of task k has a clean label ``y`` uniform on {-1, +1}, a signal patch ``y * (u + v_k)`` and a
noise patch ``xi ~ N(0, sigma_pk^2 P)`` with ``P`` the projector onto the orthogonal complement of
span{u, v1, v2}. The observed label is ``y`` flipped with probability ``label_noise``.

Two variants of the benign-overfitting literature (Kou et al. 2023): the noise not projected off the
signals (``project_noise=False``: ``xi ~ N(0, sigma_pk^2 I)``), and the signal patch at a random position
per sample (``signal_position="random"``: the two patches swapped with probability 1/2).

Test sets can be kept in response space (``test_space="response"``, ``ResponseTestSet``): a model's
responses to a fresh noise patch are jointly Gaussian with covariance ``sigma_p^2 M P M^T`` (``M`` the rows
the engine takes inner products with), so they are sampled from that law instead of drawing the patches
in R^d (docs/design.md section 3).
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


TEST_SPACES = ("dspace", "response")
"""``task.test_space``: test noise patches drawn in R^d, or their responses drawn from their Gaussian law."""


@dataclass(frozen=True)
class ResponseTestSet:
    """A test set kept in response space: its labels (drawn as ``sample_task`` draws them) and what the noise
    responses are drawn from (``responses``); the signal patches are ``+-(u + v_k)``, known exactly."""

    y: Tensor
    clean_y: Tensor
    sigma_p: float
    project_noise: bool
    state: Tensor
    """The generator state right after the labels: every call of ``responses`` draws from it afresh."""

    def __len__(self) -> int:
        return self.y.shape[0]

    def responses(self, inner: Tensor, along_basis: Tensor) -> Tensor:
        """Responses (n, K) of K rows ``M`` to n fresh noise patches, given ``inner = M M^T`` (K, K) and
        ``along_basis = M B`` (K, 3), B the unit signal basis: Gaussian with covariance ``sigma_p^2 M P M^T``,
        ``P = I - B B^T`` (or I without projection), in float64: O(n K^2), nothing of size d. Rows of zero
        variance (the basis under projection) get 0; the others are drawn through the Cholesky factor of their
        covariance, or, where that is singular (repeated rows, d < K), its eigendecomposition."""
        inner, along_basis = inner.double(), along_basis.double()
        cov = inner - along_basis @ along_basis.T if self.project_noise else inner
        cov = self.sigma_p**2 * (cov + cov.T) / 2
        diagonal = cov.diagonal()
        live = diagonal > 1e-12 * diagonal.max().clamp_min(1e-300)
        generator = torch.Generator().set_state(self.state)
        factor, info = torch.linalg.cholesky_ex(cov[live][:, live])
        if int(info) != 0:
            live = torch.ones_like(live)
            factor = _eigen_factor(cov)
        gauss = torch.randn(len(self), int(live.sum()), generator=generator, dtype=torch.float64)
        out = torch.zeros(len(self), inner.shape[0], dtype=torch.float64)
        out[:, live] = gauss @ factor.T
        return out.to(self.y.dtype)


def _eigen_factor(cov: Tensor) -> Tensor:
    """``F`` with ``F F^T = cov`` for a PSD ``cov`` (eigenvalues clamped at 0), on one thread (LAPACK's threaded
    eigh is ~20x slower on these small matrices)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        values, vectors = torch.linalg.eigh(cov)
    finally:
        torch.set_num_threads(threads)
    return vectors * values.clamp_min(0).sqrt()


@dataclass(frozen=True)
class SyntheticTransferData:
    """Everything a synthetic pipeline trains and tests on."""

    directions: Directions
    task1_train: PatchData
    task1_test: PatchData | ResponseTestSet
    task2_train: PatchData
    task2_test: PatchData | ResponseTestSet


def make_directions(
    d: int, u_norm: float, v_norm: float, generator: torch.Generator, dtype: torch.dtype = torch.float32
) -> Directions:
    """A seeded random orthonormal triple in R^d scaled to the norms of u, v1 and v2."""
    gauss = torch.randn(d, 3, generator=generator, dtype=torch.float64)
    basis, _ = torch.linalg.qr(gauss)
    u, v1, v2 = (basis[:, i] * norm for i, norm in enumerate((u_norm, v_norm, v_norm)))
    return Directions(u.to(dtype), v1.to(dtype), v2.to(dtype), basis.to(dtype))


def sample_labels(n: int, label_noise: float, generator: torch.Generator, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Observed and clean labels in {-1, +1} (n,): clean uniform, each flipped with probability ``label_noise``."""
    clean_y = torch.randint(0, 2, (n,), generator=generator).to(dtype) * 2 - 1
    flips = torch.rand(n, generator=generator, dtype=torch.float64) < label_noise
    return torch.where(flips, -clean_y, clean_y), clean_y


def response_test_set(
    n: int,
    sigma_p: float,
    label_noise: float,
    generator: torch.Generator,
    dtype: torch.dtype = torch.float32,
    project_noise: bool = True,
) -> ResponseTestSet:
    """The labels of ``n`` test samples, drawn from ``generator`` as ``sample_task`` draws them (so they equal
    the d-space test set's), and the state that the noise responses are drawn from."""
    y, clean_y = sample_labels(n, label_noise, generator, dtype)
    return ResponseTestSet(y, clean_y, sigma_p, project_noise, generator.get_state())


PROJECTION_ROWS = 128
"""Noise rows projected off the signal directions at once (``sample_task``): a 1000 x 5500 test set in 8 ms instead of
30 ms for the whole matrix, whose copies do not stay in the caches."""
SIGNAL_POSITIONS = ("fixed", "random")
"""``task.signal_position``: the signal patch first in every sample, or first or second at random."""


def sample_task(
    directions: Directions,
    task: int,
    n: int,
    sigma_p: float,
    label_noise: float,
    generator: torch.Generator,
    project_noise: bool = True,
    signal_position: str = "fixed",
) -> PatchData:
    """Draw ``n`` samples of task ``task`` (1 or 2); the variants draw after the paper's data, so its draws
    do not change."""
    if task not in (1, 2):
        raise ValueError(f"task must be 1 or 2, got {task}")
    dtype = directions.basis.dtype
    basis = directions.basis.double()
    d = basis.shape[0]
    y, clean_y = sample_labels(n, label_noise, generator, dtype)
    gauss = torch.randn(n, d, generator=generator, dtype=torch.float64)
    if project_noise:
        for block in gauss.split(PROJECTION_ROWS):  # in place, a block of rows at a time: the same numbers, no n x d copies
            block.sub_((block @ basis) @ basis.T)
    x = torch.empty(n, 2, d, dtype=dtype)
    torch.mul(clean_y[:, None], directions.signal(task)[None, :], out=x[:, 0])
    x[:, 1] = gauss.mul_(sigma_p)  # in float64, rounded once to dtype
    if signal_position == "fixed":
        return PatchData(x=x, y=y, clean_y=clean_y)
    if signal_position != "random":
        raise ValueError(f"task.signal_position={signal_position!r} is not allowed: must be one of {', '.join(SIGNAL_POSITIONS)}")
    second = torch.rand(n, generator=generator, dtype=torch.float64) < 0.5
    x = torch.where(second[:, None, None], x.flip(1), x)
    return PatchData(x=x, y=y, clean_y=clean_y, signal_second=second)


def make_synthetic_data(
    d: int,
    n1: int,
    n2: int,
    n_test: int,
    u_norm: float,
    v_norm: float,
    label_noise: float,
    sigma_p1: float,
    sigma_p2: float,
    seed: int,
    dtype: torch.dtype = torch.float32,
    project_noise: bool = True,
    signal_position: str = "fixed",
    test_space: str = "dspace",
) -> SyntheticTransferData:
    """Directions, both tasks' training sets and ``n_test``-sample test sets, all from ``seed``.

    Each part draws from its own sub-seed, so the task-2 data do not change when a sweep varies
    task 1 (N1, sigma_p1): the scratch baseline stays fixed along such a sweep. With ``test_space="response"``
    the test sets are ``ResponseTestSet`` s with the labels of the d-space ones.
    """

    def gen(part: str) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(seed, part))

    directions = make_directions(d, u_norm, v_norm, gen("directions"), dtype)

    def part(task: int, n: int, sigma_p: float, name: str) -> PatchData | ResponseTestSet:
        if name.endswith("_test") and test_space == "response":
            return response_test_set(n, sigma_p, label_noise, gen(name), dtype, project_noise)
        if test_space not in TEST_SPACES:
            raise ValueError(f"task.test_space={test_space!r} is not allowed: must be one of {', '.join(TEST_SPACES)}")
        return sample_task(directions, task, n, sigma_p, label_noise, gen(name), project_noise, signal_position)

    return SyntheticTransferData(
        directions=directions,
        task1_train=part(1, n1, sigma_p1, "task1_train"),
        task1_test=part(1, n_test, sigma_p1, "task1_test"),
        task2_train=part(2, n2, sigma_p2, "task2_train"),
        task2_test=part(2, n_test, sigma_p2, "task2_test"),
    )

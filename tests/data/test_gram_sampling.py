"""Gram sampling (``task.sampling=gram``): the Wishart/Bartlett draw of the Gram matrix of [init filters,
task-1 noise, task-2 noise] with the signal projections, against the d-space Gram matrices."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from ptlab.config import ConfigError, validate
from ptlab.data.gram_sampling import bartlett_wishart
from ptlab.engines.gram import GramCell, draws
from ptlab.spec import parse

KEYS = ("gram1", "gram2", "mix", "start1", "start2", "up_start2", "norm2_1", "norm2_2", "cross2", "test_start2")
"""Every block of the Gram matrix the stages read (and two of the test products)."""


def entries(cell: GramCell, seeds: range) -> dict[str, np.ndarray]:
    """Each block of ``prepare_group``'s tensors over ``seeds``: (len(seeds), entries)."""
    out: dict[str, list[np.ndarray]] = {key: [] for key in KEYS}
    for seed in seeds:
        tensors = draws.prepare_group(dataclasses.replace(cell, seed=seed), [0]).tensors
        for key in KEYS:
            out[key].append(tensors[key].double().flatten().numpy())
    return {key: np.stack(value) for key, value in out.items()}


def moment_gaps(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """The largest |difference| over entries of the means and of the variances of ``a`` and ``b`` (draws x
    entries), each in standard errors (entries constant up to rounding in both, like the products of the unit
    basis with projected noise, skipped)."""
    n = len(a)
    var_a, var_b = a.var(0), b.var(0)
    live = (var_a + var_b) > 1e-9 * (var_a + var_b).max()
    mean_z = np.abs(a.mean(0) - b.mean(0))[live] / np.sqrt((var_a + var_b)[live] / n)
    fourth = [((x - x.mean(0)) ** 4).mean(0) for x in (a, b)]
    var_se = np.sqrt((fourth[0] - var_a**2 + fourth[1] - var_b**2)[live] / n)
    var_z = np.abs(var_a - var_b)[live] / var_se
    return float(mean_z.max()), float(var_z.max())


@pytest.mark.parametrize(
    ("d", "extra"),
    [
        (12, ["task.project_noise=true"]),
        pytest.param(7, ["task.project_noise=false"], marks=pytest.mark.slow),
    ],
    ids=["bartlett_projected", "singular_unprojected"],
)
def test_entries_match_dspace_in_mean_and_variance(make_cfg, d: int, extra: list[str]) -> None:
    """Over 600 seeds each, every entry of every Gram block (and the test products) has the d-space path's
    mean and variance (within 5 standard errors); d=7 has fewer degrees of freedom (4) than vectors (9),
    the singular Wishart case."""
    base = parse(
        make_cfg(
            f"task.d={d}",
            "task.n1=3",
            "task.n2=2",
            "model.width=1",
            "task.n_test=2",
            "train.dtype=float64",
            "task.test_space=response",
            "noise.sigma_p1=1.5",
            "noise.sigma_p2=0.7",
            "model.init_std=0.8",
            "upstream_model=toy_cnn",
            "upstream_model.width=1",
            "upstream_model.init_std=1.2",
            *extra,
        )
    )
    cell = GramCell.from_spec(base)
    dspace = entries(cell, range(600))
    sampled = entries(dataclasses.replace(cell, sampling="gram"), range(600))
    for key in KEYS:
        mean_gap, var_gap = moment_gaps(dspace[key], sampled[key])
        assert mean_gap < 5 and var_gap < 5, (key, mean_gap, var_gap)
    # the noise norms: E|xi|^2 = sigma_p^2 (d - 3) projected, sigma_p^2 d not
    dof = d - 3 if "task.project_noise=true" in extra else d
    noise_diagonal = sampled["gram2"].reshape(-1, 5, 5)[:, 3:, 3:].diagonal(axis1=1, axis2=2)
    assert noise_diagonal.mean() == pytest.approx(0.49 * dof, rel=0.05)


def test_bartlett_moments() -> None:
    """Bartlett's decomposition draws Wishart(I, nu): E S = nu I, Var S_ii = 2 nu, Var S_ij = nu."""
    rng = np.random.default_rng(0)
    draws = np.stack([bartlett_wishart(4, 9, rng) for _ in range(20000)])
    assert np.allclose(draws.mean(0), 9 * np.eye(4), atol=0.15)
    assert np.allclose(draws.var(0), 9 * (np.ones((4, 4)) + np.eye(4)), rtol=0.06)


def test_gram_sampling_rules(make_cfg) -> None:
    """gram sampling needs response-space test sets, Gaussian inits and the gram engine: one line each."""
    with pytest.raises(ConfigError, match="task.sampling='gram' is not allowed: must be dspace unless"):
        validate(make_cfg("task.sampling=gram"))
    with pytest.raises(ConfigError, match="model.init='torch' is not allowed with task.sampling=gram"):
        validate(make_cfg("task.sampling=gram", "task.test_space=response", "model.init=torch"))
    with pytest.raises(ConfigError, match="is not allowed with engine=lightning: must be dspace"):
        validate(make_cfg("engine=lightning", "task.sampling=gram", "task.test_space=response"))


def test_cost_does_not_grow_with_d(make_cfg) -> None:
    """With gram sampling a cell at d = 10^7 draws nothing of size d: it prepares as fast as at d = 10^3."""
    import time

    cell = GramCell.from_spec(parse(make_cfg("task.sampling=gram", "task.test_space=response", "transfer=none")))
    timings = {}
    for d in (1000, 10_000_000):
        started = time.perf_counter()
        tensors = draws.prepare_group(dataclasses.replace(cell, d=d), [0]).tensors
        timings[d] = time.perf_counter() - started
        assert torch.isfinite(tensors["gram2"]).all()
    assert timings[10_000_000] < 10 * timings[1000] + 0.05

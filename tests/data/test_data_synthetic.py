"""The synthetic data model of docs/design.md section 1, checked with numbers."""

import pytest
import torch

from ptlab.data import make_directions, make_synthetic_data, sample_task


def test_directions_have_the_requested_norms_and_are_orthogonal():
    dirs = make_directions(500, u_norm=1.5, v_norm=2.5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert dirs.u.norm().item() == pytest.approx(1.5, rel=1e-12)
    assert dirs.v1.norm().item() == pytest.approx(2.5, rel=1e-12)
    assert dirs.v2.norm().item() == pytest.approx(2.5, rel=1e-12)
    gram = torch.stack([dirs.u, dirs.v1, dirs.v2]) @ torch.stack([dirs.u, dirs.v1, dirs.v2]).T
    assert torch.allclose(gram, torch.diag(torch.tensor([1.5**2, 2.5**2, 2.5**2], dtype=torch.float64)), atol=1e-12)
    assert torch.allclose(dirs.basis.T @ dirs.basis, torch.eye(3, dtype=torch.float64), atol=1e-12)


def test_zero_universal_signal_keeps_its_direction_out_of_the_noise():
    dirs = make_directions(200, u_norm=0.0, v_norm=1.0, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert dirs.u.abs().max().item() == 0.0
    data = sample_task(dirs, 1, 50, sigma_p=1.0, label_noise=0.0, generator=torch.Generator().manual_seed(2))
    assert (data.noise @ dirs.basis).abs().max().item() < 1e-12


def test_signal_patch_is_clean_label_times_task_signal_and_noise_is_projected():
    data = make_synthetic_data(
        d=300,
        n1=400,
        n2=300,
        n_test=100,
        u_norm=1.0,
        v_norm=2.0,
        label_noise=0.1,
        sigma_p1=0.5,
        sigma_p2=2.0,
        seed=3,
        dtype=torch.float64,
    )
    dirs = data.directions
    for task, part in ((1, data.task1_train), (2, data.task2_train)):
        expected = part.clean_y[:, None] * dirs.signal(task)[None, :]
        assert torch.equal(part.x[:, 0], expected)
        assert (part.noise @ dirs.basis).abs().max().item() < 1e-10
    # E||xi||^2 = sigma^2 (d - 3): the projector removes three directions.
    mean_sq1 = data.task1_train.noise.pow(2).sum(1).mean().item()
    mean_sq2 = data.task2_train.noise.pow(2).sum(1).mean().item()
    assert mean_sq1 == pytest.approx(0.25 * 297, rel=0.02)
    assert mean_sq2 == pytest.approx(4.0 * 297, rel=0.02)
    assert data.task1_train.x.shape == (400, 2, 300)
    assert data.task2_test.x.shape == (100, 2, 300)


def test_label_flip_rate_matches_label_noise():
    dirs = make_directions(20, 1.0, 1.0, torch.Generator().manual_seed(0))
    data = sample_task(dirs, 2, 40000, sigma_p=1.0, label_noise=0.2, generator=torch.Generator().manual_seed(5))
    flip_rate = (data.y != data.clean_y).double().mean().item()
    assert flip_rate == pytest.approx(0.2, abs=0.01)  # binomial std 0.002
    assert set(data.y.unique().tolist()) == {-1.0, 1.0}
    assert (data.clean_y == 1).double().mean().item() == pytest.approx(0.5, abs=0.01)
    clean = sample_task(dirs, 2, 1000, sigma_p=1.0, label_noise=0.0, generator=torch.Generator().manual_seed(5))
    assert torch.equal(clean.y, clean.clean_y)


def test_same_seed_same_data_other_seed_other_data():
    kwargs = dict(d=50, n1=10, n2=10, n_test=10, u_norm=1.0, v_norm=1.0, label_noise=0.1, sigma_p1=1.0, sigma_p2=1.0)
    a, b, c = (make_synthetic_data(**kwargs, seed=s) for s in (7, 7, 8))
    assert torch.equal(a.task2_train.x, b.task2_train.x) and torch.equal(a.task1_test.y, b.task1_test.y)
    assert not torch.equal(a.task2_train.x, c.task2_train.x)


def test_task2_data_do_not_depend_on_task1_settings():
    kwargs = dict(d=60, n2=15, n_test=20, u_norm=1.0, v_norm=1.0, label_noise=0.1, sigma_p2=1.0, seed=2)
    a = make_synthetic_data(n1=10, sigma_p1=1.0, **kwargs)
    b = make_synthetic_data(n1=80, sigma_p1=3.0, **kwargs)
    assert torch.equal(a.task2_train.x, b.task2_train.x) and torch.equal(a.task2_test.y, b.task2_test.y)
    assert not torch.equal(a.task1_train.x[:10], b.task1_train.x[:10])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("project", [True, False])
def test_noise_drawn_in_place_equals_the_formula(dtype: torch.dtype, project: bool):
    """``sample_task`` projects and scales the noise in place, a block of rows at a time: the same bits as the formula
    sigma (g - (g B) B^T) on the whole float64 draw g, rounded once to ``dtype`` (300 rows: several blocks)."""
    directions = make_directions(257, 1.0, 2.0, torch.Generator().manual_seed(1), dtype)
    data = sample_task(directions, 2, 300, 1.7, 0.1, torch.Generator().manual_seed(4), project_noise=project)
    generator = torch.Generator().manual_seed(4)
    torch.randint(0, 2, (300,), generator=generator)  # the labels' draws come first
    torch.rand(300, generator=generator, dtype=torch.float64)
    gauss = torch.randn(300, 257, generator=generator, dtype=torch.float64)
    basis = directions.basis.double()
    if project:
        gauss = gauss - (gauss @ basis) @ basis.T
    assert torch.equal(data.noise, (1.7 * gauss).to(dtype))
    assert torch.equal(data.x[:, 0], data.clean_y[:, None] * directions.signal(2)[None, :])

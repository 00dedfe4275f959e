"""Test sets in response space (``task.test_space=response``): the law of the sampled responses, and test
accuracies equal in distribution to the d-space path's."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from scipy import stats

from ptlab.data.synthetic import make_directions, response_test_set, sample_task
from ptlab.engines.gram import GramCell, run_cells
from ptlab.pipeline import run_pipeline
from ptlab.pipeline.synthetic import make_data
from ptlab.spec import parse

from ..gram_devices import DEVICES


def rows_and_law(project: bool, sigma: float) -> tuple[torch.Tensor, torch.Tensor, object]:
    """Rows M = [unit basis; 5 random vectors] in R^30, the d-space noise law's covariance of M xi, the basis."""
    directions = make_directions(30, 1.0, 1.0, torch.Generator().manual_seed(0), torch.float64)
    basis = directions.basis
    rows = torch.cat([basis.T, torch.randn(5, 30, generator=torch.Generator().manual_seed(1), dtype=torch.float64)])
    projector = torch.eye(30, dtype=torch.float64) - (basis @ basis.T if project else 0)
    return rows, sigma**2 * rows @ projector @ rows.T, directions


@pytest.mark.parametrize("project", [True, False])
def test_sampled_responses_have_the_formula_covariance(project: bool) -> None:
    """Responses drawn in response space, and responses of d-space noise patches, both have covariance
    sigma_p^2 M P M^T (each entry within 5 standard errors of its sample covariance)."""
    rows, formula, directions = rows_and_law(project, 1.5)
    n = 100_000
    test = response_test_set(n, 1.5, 0.0, torch.Generator().manual_seed(2), torch.float64, project)
    inner = rows @ rows.T
    drawn = test.responses(inner, inner[:, :3])
    patches = sample_task(directions, 2, 20_000, 1.5, 0.0, torch.Generator().manual_seed(3), project_noise=project)
    dspace = patches.noise @ rows.T
    diag = formula.diagonal().clamp_min(0)
    for sample, size in ((drawn, n), (dspace, 20_000)):
        empirical = sample.T @ sample / size
        standard_error = ((diag[:, None] * diag[None, :] + formula**2) / size).sqrt() + 1e-8
        assert ((empirical - formula).abs() / standard_error).max().item() < 5
        assert (sample.mean(0).abs() / ((diag / size).sqrt() + 1e-8)).max().item() < 5
    if project:  # a projected patch has nothing along the signals
        assert drawn[:, :3].abs().max().item() < 1e-6


@pytest.mark.parametrize("device", DEVICES)
def test_labels_equal_the_dspace_test_set(make_cfg, device: str) -> None:
    """The response-space test set draws its labels as the d-space one does: the same labels, the same
    training, the same trained weights (only the test noise is drawn differently), on any device."""
    cfgs = [
        make_cfg(f"task.test_space={space}", "task.label_noise=0.2", "train.dtype=float64", f"engine.device={device}")
        for space in ("dspace", "response")
    ]
    dspace, response = run_cells([GramCell.from_spec(parse(cfg)) for cfg in cfgs])
    # The two cells share a batched program but not a group: the same arithmetic may run in another BLAS kernel,
    # so they agree to a few dozen units of float64's epsilon (relative to the largest coefficient), not bitwise.
    eps = torch.finfo(torch.float64).eps
    for name in ("upstream", "transfer", "scratch"):
        a, b = dspace.stages[name].signal, response.stages[name].signal
        assert (a - b).abs().max() <= 64 * eps * a.abs().max()
        assert dspace.stages[name].final["train_loss"] == pytest.approx(response.stages[name].final["train_loss"], rel=64 * eps)
    data = [make_data(parse(cfg)) for cfg in cfgs]
    for part in ("task1_test", "task2_test"):
        assert torch.equal(getattr(data[0], part).y, getattr(data[1], part).y)
        assert torch.equal(getattr(data[0], part).clean_y, getattr(data[1], part).clean_y)


def test_accuracy_agrees_in_distribution_over_seeds(make_cfg) -> None:
    """Over 60 seeds the test accuracies of the two paths agree in distribution (paired t-test and
    Kolmogorov-Smirnov, at 0.1%), with small test sets so that the test noise dominates the spread."""

    def accuracies(space: str) -> list[float]:
        cell = GramCell.from_spec(
            parse(
                make_cfg(
                    f"task.test_space={space}",
                    "transfer=none",
                    "task.n_test=60",
                    "task.d=300",
                    "task.u_norm=1.5",
                    "task.v_norm=1.5",
                )
            )
        )
        cells = [dataclasses.replace(cell, seed=seed) for seed in range(60)]
        return [result.stages["scratch"].final["test_acc"] for result in run_cells(cells, max_cells=60)]

    dspace, response = accuracies("dspace"), accuracies("response")
    assert 0.6 < sum(dspace) / len(dspace) < 0.95  # a regime where the test noise matters
    assert stats.ttest_rel(dspace, response).pvalue > 1e-3
    assert stats.ks_2samp(dspace, response).pvalue > 1e-3
    assert dspace != response


def test_single_run_and_lightning_rule(make_cfg, tmp_path) -> None:
    """``run_pipeline`` with engine=gram runs a response-space pipeline end to end (transfer pairs with the
    same test labels); engine=lightning refuses it with one line naming the key."""
    summary = run_pipeline(
        make_cfg("engine=gram", "task.test_space=response", "logger=none", "task.n_test=5000"), tmp_path / "out"
    )
    assert all(0.5 < summary[stage]["test_acc"] <= 1.0 for stage in ("upstream", "transfer", "scratch"))
    from ptlab.config import ConfigError, validate

    with pytest.raises(ConfigError, match="task.test_space='response' is not allowed with engine=lightning"):
        validate(make_cfg("engine=lightning", "task.test_space=response"))

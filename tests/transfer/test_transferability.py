"""LogME and LEEP (ptlab.transfer.transferability) against their papers' formulas, their invariances, bad input,
and the scores a pipeline records before downstream training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal
from torch import nn

from ptlab.spec import parse
from ptlab.transfer.transferability import (
    class_probabilities,
    classifier_head,
    leep,
    log_evidence,
    logme,
    maximise_evidence,
    penultimate_features,
    scored,
)


def gaussian_evidence(f: np.ndarray, y: np.ndarray, alpha: float, beta: float) -> float:
    """The marginal likelihood of y = F m + eps with m ~ N(0, I/alpha), eps ~ N(0, I/beta), integrated directly:
    y ~ N(0, F F'/alpha + I/beta) (an independent route to LogME's eq. 2)."""
    return float(multivariate_normal(mean=np.zeros(len(y)), cov=f @ f.T / alpha + np.eye(len(y)) / beta).logpdf(y))


@pytest.mark.parametrize("dim", [1, 3, 12])
def test_evidence_formula_equals_the_gaussian_marginal_likelihood(dim: int) -> None:
    # dim=12 > n=8: F'F is singular, its zero eigenvalues still count in log det A
    rng = np.random.default_rng(dim)
    f = rng.normal(size=(8, dim))
    y = rng.normal(size=8)
    for alpha, beta in ((1.0, 1.0), (0.3, 4.0), (7.0, 0.2)):
        assert log_evidence(f, y, alpha, beta) == pytest.approx(gaussian_evidence(f, y, alpha, beta), rel=1e-10)


def test_one_dimensional_evidence_by_hand() -> None:
    # F = (1, 2)', y = (1, 0), alpha = beta = 1: cov = [[2, 2], [2, 5]], det 6, y' cov^-1 y = 5/6
    f, y = np.array([[1.0], [2.0]]), np.array([1.0, 0.0])
    expected = -np.log(2 * np.pi) - 0.5 * np.log(6.0) - 0.5 * 5 / 6
    assert log_evidence(f, y, 1.0, 1.0) == pytest.approx(expected, rel=1e-12)


def test_fixed_point_satisfies_the_stationarity_equations_and_maximises() -> None:
    rng = np.random.default_rng(0)
    f = rng.normal(size=(60, 5))
    y = f @ rng.normal(size=5) + 0.5 * rng.normal(size=60)
    per_sample, alpha, beta = maximise_evidence(f, y)
    s = np.linalg.svd(f, compute_uv=False) ** 2
    m = np.linalg.solve(alpha * np.eye(5) + beta * f.T @ f, beta * f.T @ y)
    gamma = np.sum(beta * s / (alpha + beta * s))
    assert alpha == pytest.approx(gamma / (m @ m), rel=1e-4)
    assert beta == pytest.approx((60 - gamma) / np.sum((f @ m - y) ** 2), rel=1e-4)
    assert per_sample == pytest.approx(gaussian_evidence(f, y, alpha, beta) / 60, rel=1e-10)
    for a, b in ((alpha * 1.2, beta), (alpha / 1.2, beta), (alpha, beta * 1.2), (alpha, beta / 1.2)):
        assert log_evidence(f, y, a, b) < log_evidence(f, y, alpha, beta)


def test_logme_is_the_mean_of_one_vs_rest_evidences_and_ignores_sample_order() -> None:
    rng = np.random.default_rng(1)
    labels = np.repeat([0, 1, 2], 30)
    f = rng.normal(size=(90, 4)) + labels[:, None] * np.array([1.0, 0.0, -1.0, 0.5])
    expected = np.mean([maximise_evidence(f, (labels == c).astype(float))[0] for c in range(3)])
    assert logme(f, labels) == pytest.approx(expected, rel=1e-12)
    order = rng.permutation(90)
    assert logme(f[order], labels[order]) == pytest.approx(logme(f, labels), rel=1e-9)
    assert logme(torch.tensor(f), torch.tensor(labels) + 5) == pytest.approx(logme(f, labels), rel=1e-12)


def test_a_score_of_one_class_labels_is_nan_in_a_pipeline_and_an_error_alone() -> None:
    """A small task-2 sample may hold one class (a random cell with N2 = 10 and label noise drew one, and its
    ValueError ended a whole batched sweep): the pipelines' ``scored`` gives NaN, the score itself still refuses."""
    features, labels = torch.randn(6, 3), torch.ones(6)
    assert math.isnan(scored(logme, features, labels)) and math.isnan(scored(leep, torch.full((6, 2), 0.5), labels))
    with pytest.raises(ValueError, match="at least 2 classes"):
        logme(features, labels)


def test_logme_of_features_that_fit_every_sample_is_finite() -> None:
    """More feature dimensions than samples, at the scale of a model trained with a huge step (~1e29): every sample is
    fitted, the evidence has no finite optimum, and LogME keeps the last finite pair instead of dividing by zero
    (found through a single run with ``train.lr=1e30``, which raised ZeroDivisionError)."""
    rng = np.random.default_rng(3)
    score = logme(rng.normal(size=(10, 40)) * 1e29, np.repeat([0, 1], 5))
    assert np.isfinite(score)


def test_logme_ranks_informative_features_above_noise() -> None:
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 2, size=200)
    noise = rng.normal(size=(200, 8))
    informative = noise.copy()
    informative[:, 0] += 3 * labels
    assert logme(informative, labels) > logme(noise, labels) + 0.1


def test_leep_of_a_source_that_predicts_the_target_label_is_zero() -> None:
    labels = np.repeat([0, 1, 2], 20)
    theta = np.eye(5)[labels + 2]  # source label z = y + 2, with certainty
    assert leep(theta, labels) == pytest.approx(0.0, abs=1e-12)
    near = 0.999 * theta + 0.001 / 5
    assert -0.01 < leep(near, labels) < 0


def test_leep_of_uniform_predictions_is_minus_log_the_number_of_classes() -> None:
    labels = np.repeat([0, 1, 2, 3], 25)
    assert leep(np.full((100, 7), 1 / 7), labels) == pytest.approx(-np.log(4), rel=1e-12)
    unbalanced = np.array([0] * 30 + [1] * 10)
    assert leep(np.full((40, 3), 1 / 3), unbalanced) == pytest.approx(0.75 * np.log(0.75) + 0.25 * np.log(0.25))


def test_leep_by_hand() -> None:
    # two samples, two source labels: theta = [[1, 0], [0.5, 0.5]], y = (0, 1)
    # P(y, z) = [[0.5, 0], [0.25, 0.25]], P(z) = (0.75, 0.25), P(y|z) = [[2/3, 0], [1/3, 1]]
    # sample 1: 1 * 2/3; sample 2: 0.5 * 1/3 + 0.5 * 1 = 2/3
    assert leep([[1.0, 0.0], [0.5, 0.5]], [0, 1]) == pytest.approx(np.log(2 / 3), rel=1e-12)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: logme(np.ones((5, 2)), np.arange(4)), "labels has 4 entries but there are 5 samples"),
        (lambda: logme(np.ones((5, 2)), np.zeros(5)), "at least 2 classes"),
        (lambda: logme(np.ones(5), np.arange(5)), "features must have 2 dimension"),
        (lambda: logme(np.full((4, 2), np.nan), np.arange(4) % 2), "features must be finite"),
        (lambda: leep(np.full((4, 2), 0.5), np.arange(3)), "labels has 3 entries but there are 4 samples"),
        (lambda: leep(np.full((4, 2), 0.5), np.ones(4)), "at least 2 classes"),
        (lambda: leep(np.full((4, 2), 0.7), np.arange(4) % 2), "sum to 1"),
        (lambda: log_evidence(np.ones((3, 1)), np.ones(3), 0.0, 1.0), "alpha and beta must be > 0"),
    ],
)
def test_bad_input_is_rejected(call, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        call()


def test_model_helpers_read_the_head_input_and_the_softmax() -> None:
    torch.manual_seed(0)
    body = nn.Sequential(nn.Flatten(), nn.Linear(12, 6), nn.ReLU())
    model = nn.Sequential(body, nn.Linear(6, 3)).train()
    x = torch.randn(10, 3, 2, 2)
    assert classifier_head(model) is model[1]
    features = penultimate_features(model, x, batch_size=4)
    assert torch.allclose(features, body(x), atol=1e-6)
    assert torch.allclose(class_probabilities(model, x, batch_size=3), model(x).softmax(-1), atol=1e-6)
    assert model.training
    with pytest.raises(ValueError, match="no nn.Linear classifier head"):
        classifier_head(nn.Conv2d(3, 3, 1))


def test_two_layer_cnn_hidden_features_give_its_output() -> None:
    from ptlab.models import TwoLayerReLUCNN

    torch.manual_seed(0)
    model = TwoLayerReLUCNN(input_dim=5, width=4)
    x = torch.randn(7, 2, 5)
    hidden = model.hidden(x)
    by_hand = torch.relu(x @ model.weight.reshape(8, 5).T).sum(dim=1).reshape(7, 2, 4)
    assert torch.allclose(hidden, by_hand)
    assert torch.allclose(model(x), hidden[:, 0].mean(-1) - hidden[:, 1].mean(-1))


DIGITS = [
    "task=digits",
    "noise=pixels",
    "+pair=vgg16_small_vgg11_small",
    "task.n2=8",
    "task.k=2",
    "task.n1_ratio=2",
    "task.n_test=10",
    "train.upstream_epochs=1",
    "train.downstream_epochs=1",
    "train.batch_size=8",
    "train.progress_bar=false",
    "logger.experiment_name=transferability_tiny",
]


def test_image_summary_carries_the_scores_taken_before_downstream_training(make_cfg, tracking_uri: str, tmp_path: Path) -> None:
    from mlflow.tracking import MlflowClient

    from ptlab.data.images import make_image_tasks
    from ptlab.pipeline import run_pipeline
    from ptlab.pipeline.images import build_image_model
    from ptlab.transfer.transferability import score_subset

    cfg = parse(make_cfg(*DIGITS, "transferability.max_samples=6", small=False))
    summary = run_pipeline(cfg, tmp_path / "out")
    scores = json.loads((tmp_path / "out" / "summary.json").read_text())["transferability"]
    assert set(scores) == {"logme", "leep", "logme_scratch", "samples"} and scores["samples"] == 6
    assert np.log(0.5) - 1e-9 <= scores["leep"] <= 0 and scores["logme"] != scores["logme_scratch"]
    # logme_scratch again by hand: the fresh downstream init (the scratch stage's) on the same seeded subset
    task2 = make_image_tasks(cfg.task, cfg.noise, cfg.seed).task2
    keep = score_subset(len(task2.train), 6, cfg.seed)
    fresh = build_image_model(cfg, 2, "downstream")
    expected = logme(penultimate_features(fresh, task2.train.x[keep]), task2.train.y[keep])
    assert scores["logme_scratch"] == pytest.approx(expected, rel=1e-5)
    metrics = MlflowClient(tracking_uri).get_run(summary["mlflow"]["parent_run_id"]).data.metrics
    assert metrics["transferability/logme"] == pytest.approx(scores["logme"])
    assert metrics["transferability/leep"] == pytest.approx(scores["leep"])


def test_seeded_subset_is_deterministic_and_capped() -> None:
    from ptlab.transfer.transferability import score_subset

    first, again = score_subset(100, 10, 3), score_subset(100, 10, 3)
    assert torch.equal(first, again) and len(first) == 10 and len(set(first.tolist())) == 10
    assert not torch.equal(first, score_subset(100, 10, 4))
    assert torch.equal(score_subset(7, 10, 3), torch.arange(7))


@pytest.mark.parametrize("engine", ["gram", "lightning"])
def test_synthetic_scores_match_the_models_they_describe(make_cfg, engine: str) -> None:
    from ptlab.pipeline.run import make_engine
    from ptlab.pipeline.synthetic import build_model, make_data, run_synthetic, selection_inputs
    from ptlab.pipeline.transferability import two_patch_probabilities
    from ptlab.seeding import derive_seed
    from ptlab.tracking.base import NullTracker
    from ptlab.transfer.apply import Transfer

    cfg = parse(make_cfg(f"engine={engine}", "logger=none", "cache.enabled=false", "train.dtype=float64"))
    stages, extra = run_synthetic(cfg, make_engine(cfg), NullTracker())
    scores = extra["transferability"]
    data = make_data(cfg)
    x, y = data.task2_train.x, data.task2_train.y
    assert scores["samples"] == len(x) == cfg.task.n2
    upstream = stages["upstream"].model
    with torch.no_grad():
        assert scores["leep"] == pytest.approx(leep(torch.sigmoid(torch.stack([-upstream(x), upstream(x)], 1)), y))
        assert torch.allclose(two_patch_probabilities(upstream, x)[:, 1], torch.sigmoid(upstream(x)))
        fresh = build_model(cfg, "downstream")
        assert scores["logme_scratch"] == pytest.approx(logme(fresh.hidden(x).flatten(1), y), rel=1e-9)
        Transfer(
            upstream,
            cfg.transfer.alpha,
            cfg.transfer.selection,
            derive_seed(cfg.seed, "selection"),
            inputs=selection_inputs(data),
        ).apply(fresh)
        assert scores["logme"] == pytest.approx(logme(fresh.hidden(x).flatten(1), y), rel=1e-9)


@pytest.mark.parametrize(
    "variant",
    [
        [],
        [
            "transferability.max_samples=7",
            "model.bias=true",
            "model.activation=leaky_relu",
            "model.patch_reduction=mean",
            "model.filter_reduction=sum",
        ],
        ["transfer=none"],
    ],
)
def test_gram_cell_scores_from_responses_equal_the_dspace_models(make_cfg, variant: list[str]) -> None:
    """The gram engine's scores (from the stage-start responses, the whole-cell and batched path) equal the d-space
    pipeline's (from the models)."""
    from ptlab.engines.gram import GramCell, run_cells
    from ptlab.pipeline.run import make_engine
    from ptlab.pipeline.synthetic import run_synthetic
    from ptlab.tracking.base import NullTracker

    cfg = parse(make_cfg("logger=none", "cache.enabled=false", "train.dtype=float64", *variant))
    _, extra = run_synthetic(cfg, make_engine(cfg), NullTracker())
    gram = run_cells([GramCell.from_spec(cfg)])[0].transferability
    assert set(gram) == set(extra["transferability"])
    assert set(gram) == (
        {"logme_scratch", "samples"} if variant == ["transfer=none"] else {"logme", "leep", "logme_scratch", "samples"}
    )
    for name, value in extra["transferability"].items():
        assert gram[name] == pytest.approx(value, rel=1e-9, abs=1e-12), name


def test_disabled_scores_are_absent(make_cfg) -> None:
    from ptlab.engines.gram import GramCell, run_cells
    from ptlab.pipeline.run import make_engine
    from ptlab.pipeline.synthetic import run_synthetic
    from ptlab.tracking.base import NullTracker

    cfg = parse(make_cfg("logger=none", "cache.enabled=false", "transferability.enabled=false"))
    assert run_synthetic(cfg, make_engine(cfg), NullTracker())[1] == {}
    assert run_cells([GramCell.from_spec(cfg)])[0].transferability is None


def test_bad_transferability_config_stops_with_one_line(tmp_path: Path) -> None:
    from ptlab.cli import compose_config
    from ptlab.config import ConfigError, validate

    from ..conftest import run_cli

    with pytest.raises(ConfigError, match=r"^transferability.max_samples=1 is not allowed: must be an integer >= 2$"):
        validate(compose_config(["transferability.max_samples=1"]))
    done = run_cli(["transferability.max_samples=0", "logger=none"], cwd=tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        "ptlab: transferability.max_samples=0 is not allowed: must be an integer >= 2"
    ]
    assert not any(tmp_path.iterdir())


def test_scores_leave_the_config_hash_alone() -> None:
    """Scores do not change what is trained: a finished run of the same config is still recognised."""
    from ptlab.cli import compose_config
    from ptlab.pipeline.resume import config_hash

    base = config_hash(parse(compose_config([])))
    assert config_hash(parse(compose_config(["transferability.enabled=false", "transferability.max_samples=50"]))) == base
    assert config_hash(parse(compose_config(["transfer.alpha=0.25"]))) != base


def test_head_features_are_timm_pre_logits_and_torchvision_pooled_features() -> None:
    import timm

    from ptlab.models.torchvision_cnn import build_torchvision_cnn

    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=3, depth=2)
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        expected = vit.eval().forward_head(vit.forward_features(x), pre_logits=True)
    assert torch.allclose(penultimate_features(vit, x, batch_size=2), expected, atol=1e-5)
    resnet = build_torchvision_cnn("resnet18", 4, width=0.25).eval()
    with torch.no_grad():
        body = nn.Sequential(*list(resnet.children())[:-1])
        assert torch.allclose(penultimate_features(resnet, x), body(x).flatten(1), atol=1e-5)


def test_a_diverged_upstream_gives_nan_scores_not_an_error(make_cfg) -> None:
    from ptlab.engines.gram import GramCell, run_cells
    from ptlab.transfer.transferability import scored

    assert np.isnan(scored(logme, torch.tensor([[np.nan], [1.0]]), [0, 1]))
    result = run_cells([GramCell.from_spec(parse(make_cfg("noise.sigma_p1=1e30")))])[0]
    assert result.divergence() is not None
    scores = result.transferability
    assert np.isnan(scores["logme"]) and np.isnan(scores["leep"]) and np.isfinite(scores["logme_scratch"])

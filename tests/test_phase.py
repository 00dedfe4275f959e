"""The phase model (ptlab.phase): its features against hand-computed values, the round trip through its
file, and the same prediction from the model, ``python -m ptlab.predict`` and a run's summary and MLflow."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ptlab.phase import ALL_FEATURES, FEATURES, PhaseModel, all_pairs, expand_pairs, feature_matrix, load, save
from ptlab.report.calibrate import FIT, Candidate, _phase_estimator, features_of, fit_phase_model
from ptlab.theory import Setting, phase_features
from tests.conftest import REPO, SMALL, run_cli
from tests.report.test_calibrate import two_designs

BASE = Setting(d=1000, n1=200, n2=20, u_norm=2.0, v_norm=2.0, sigma_p1=1.0, sigma_p2=1.0, alpha=0.5)


def test_features_hand_values() -> None:
    f = phase_features(BASE)
    # D* = 185600 / 70, scratch threshold 20 * 64 = 1280, Gamma = 0.25 * 200 * 16 / 1000 = 0.8,
    # strength 0.5 * 200 / 20 = 5, S2^2 / U^2 = 2 -> ratio 0.4; U^2 / S2^2 = 0.5; condition 4.1: 1000 / 200^2.
    assert f["log_d_over_threshold"] == pytest.approx(math.log10(1000 * 70 / 185600))
    assert f["log_d_over_scratch_threshold"] == pytest.approx(math.log10(1000 / 1280))
    assert f["log_gamma"] == pytest.approx(math.log10(0.8))
    assert f["log_source_strength"] == pytest.approx(math.log10(5))
    assert f["log_negative_transfer_ratio"] == pytest.approx(math.log10(0.4))
    assert f["universal_fraction"] == pytest.approx(0.5) and f["alpha"] == 0.5
    assert f["log_n1_over_n2"] == pytest.approx(1.0)
    assert f["log_condition_4_1_ratio"] == pytest.approx(math.log10(1000 / 40000))
    assert f["log_d"] == pytest.approx(3.0) and f["log_n2"] == pytest.approx(math.log10(20))
    assert f["log_threshold_term"] == pytest.approx(math.log10(185600 / 70))
    assert f["log_scratch_threshold"] == pytest.approx(math.log10(1280))
    assert list(f) == list(ALL_FEATURES) and list(ALL_FEATURES[: len(FEATURES)]) == list(FEATURES)


def test_no_universal_signal_gives_finite_clipped_features() -> None:
    f = phase_features(Setting(1000, 200, 20, 0.0, 2.0, 1.0, 1.0, 0.5))
    assert f["log_gamma"] == -6.0 and f["log_negative_transfer_ratio"] == 6.0 and f["universal_fraction"] == 0.0
    assert all(math.isfinite(v) for v in f.values())


PAIRS = Candidate("pairs", 0.1, ALL_FEATURES)


@pytest.fixture(scope="module")
def fitted() -> tuple[PhaseModel, np.ndarray]:
    """A logistic model over the 13 features and their pairwise products (the kind conf/phase_model.yaml holds)."""
    cells = two_designs()
    model, _ = fit_phase_model(cells[cells["split"] == FIT], {"command": "test"}, [PAIRS])
    return model, features_of(cells, ALL_FEATURES)


def test_the_stored_pairwise_model_predicts_what_sklearn_fitted(fitted) -> None:
    model, x = fitted
    cells = two_designs()
    fit = cells[cells["split"] == FIT]
    estimator = _phase_estimator(PAIRS).fit(features_of(fit, ALL_FEATURES), fit["measured"].astype(str))
    assert model.features == ALL_FEATURES and len(model.params["pairs"]) == 13 * 12 // 2
    assert tuple(estimator.classes_) == model.classes
    np.testing.assert_allclose(model.probabilities(x), estimator.predict_proba(x), atol=1e-6)
    row = np.array([[1.0, 2.0, 3.0]])
    np.testing.assert_array_equal(expand_pairs(row, all_pairs(3)), [[1.0, 2.0, 3.0, 2.0, 3.0, 6.0]])
    with pytest.raises(ValueError, match="pairs"):
        PhaseModel(name="x", kind="logistic", features=("alpha",), classes=("a",), params={"pairs": [[0, 1]]}, gain={})


def test_the_phase_model_round_trips_through_its_file(fitted, tmp_path: Path) -> None:
    model, x = fitted
    path = tmp_path / "phase.yaml"
    save(model, path, "# a comment\n")
    again = load(path)
    assert again == model
    np.testing.assert_array_equal(again.probabilities(x), model.probabilities(x))
    np.testing.assert_array_equal(again.predict_gain(x), model.predict_gain(x))
    row = phase_features(BASE)
    assert again.predict(row) == model.predict(row)
    assert feature_matrix([row]).shape == (1, len(FEATURES))
    assert np.allclose(model.probabilities(x).sum(axis=1), 1.0)


def test_a_logistic_model_is_a_softmax_of_linear_scores() -> None:
    model = PhaseModel(
        name="hand",
        kind="logistic",
        features=("alpha",),
        classes=("a", "b"),
        params={"mean": [0.5], "scale": [0.25], "coef": [[0.0], [2.0]], "intercept": [0.0, -1.0]},
        gain={"mean": [0.5], "scale": [0.25], "coef": [4.0], "intercept": 1.0, "interval_half_width": 2.0},
    )
    # alpha = 0.75: standardised 1, scores (0, 2 - 1 = 1): p_b = e / (1 + e).
    p = model.probabilities(np.array([[0.75]]))[0]
    assert p[1] == pytest.approx(math.e / (1 + math.e)) and model.predict_gain(np.array([[0.75]]))[0] == 5.0
    tree = PhaseModel(
        name="stump",
        kind="tree",
        features=("alpha",),
        classes=("a", "b"),
        params={
            "feature": [0, -2, -2],
            "threshold": [0.5, -2, -2],
            "left": [1, -1, -1],
            "right": [2, -1, -1],
            "value": [[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]],
        },
        gain=model.gain,
    )
    assert tree.predict_outcomes(np.array([[0.3], [0.7]])) == ["a", "b"]
    with pytest.raises(ValueError, match="kind=forest"):
        PhaseModel(name="x", kind="forest", features=(), classes=(), params={}, gain={})


def test_predict_cli_and_a_run_log_the_same_prediction(fitted, tmp_path: Path, tracking_uri: str) -> None:
    model, _ = fitted
    path = tmp_path / "phase.yaml"
    save(model, path)
    overrides = [
        *SMALL,
        "task.u_norm=0.7",
        "transfer.alpha=0.4",
        f"theory.phase_model={path}",
        f"logger.tracking_uri={tracking_uri}",
        f"cache.dir={tmp_path / 'cache'}",
    ]
    setting = Setting(d=200, n1=40, n2=10, u_norm=0.7, v_norm=2.0, sigma_p1=1.0, sigma_p2=1.0, alpha=0.4)
    expected = model.predict(phase_features(setting))
    probe = (
        "import json, sys; from ptlab.predict import prediction_for; r = prediction_for(sys.argv[1:]); "
        "print(json.dumps([r['prediction'], r['theory'], 'torch' in sys.modules, 'mlflow' in sys.modules]))"
    )
    done = subprocess.run([sys.executable, "-c", probe, *overrides], cwd=REPO, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    predicted, theory, torch_loaded, mlflow_loaded = json.loads(done.stdout)
    assert predicted == expected and not torch_loaded and not mlflow_loaded
    run = run_cli([*overrides, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["prediction"] == expected
    assert summary["theory"]["predicted"] == theory["predicted"] and summary["theory"]["rule"] == theory["rule"]
    from ptlab.report.runs import load_pipelines

    runs = load_pipelines(tracking_uri, "default")
    assert runs["params.prediction.outcome"].iloc[0] == expected["outcome"]
    assert runs["metrics.prediction/gain"].iloc[0] == pytest.approx(expected["gain"])
    assert runs["params.theory.rule"].iloc[0] == theory["rule"]
    cli = run_cli([*overrides, "--json"], tmp_path, module="ptlab.predict")
    assert cli.returncode == 0 and json.loads(cli.stdout)["prediction"] == expected
    bad = run_cli(["theory.phase_model=/no/such/file.yaml"], tmp_path, module="ptlab.predict")
    assert bad.returncode == 2 and bad.stderr.strip().startswith("ptlab: theory.phase_model=")


def test_a_batched_gram_sweep_logs_the_same_prediction(fitted, tmp_path: Path, tracking_uri: str) -> None:
    model, _ = fitted
    path = tmp_path / "phase.yaml"
    save(model, path)
    done = run_cli(
        [
            "-m",
            *SMALL,
            "engine=gram",
            "hydra/launcher=ptlab_gram",
            "hydra/sweeper=ptlab_batched",
            "task.u_norm=0.0,1.5",
            f"theory.phase_model={path}",
            f"logger.tracking_uri={tracking_uri}",
            f"cache.dir={tmp_path / 'cache'}",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    summaries = [json.loads(p.read_text()) for p in sorted((tmp_path / "sweep").glob("*/summary.json"))]
    assert len(summaries) == 2
    for summary, u in zip(summaries, (0.0, 1.5)):
        setting = Setting(d=200, n1=40, n2=10, u_norm=u, v_norm=2.0, sigma_p1=1.0, sigma_p2=1.0, alpha=0.5)
        assert summary["prediction"] == model.predict(phase_features(setting))


def test_an_n_aware_model_predicts_the_same_through_predict_and_a_run(tmp_path: Path, tracking_uri: str) -> None:
    from ptlab.predict import prediction_for
    from tests.report.test_n_aware import HAND

    model = HAND.with_seeds(24)
    path = tmp_path / "phase.yaml"
    save(model, path)
    overrides = [
        *SMALL,
        "transfer.alpha=0.4",
        f"theory.phase_model={path}",
        f"logger.tracking_uri={tracking_uri}",
        f"cache.dir={tmp_path / 'cache'}",
    ]
    expected = model.predict({"alpha": 0.4})
    assert expected["seeds"] == 24 and expected["outcome"] == "negative_transfer"  # mu = 2 (-0.4) - 1 = -1.8 points, P 0.93
    assert prediction_for(overrides)["prediction"] == expected
    run = run_cli([*overrides, f"hydra.run.dir={tmp_path / 'run'}"], tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["prediction"] == expected

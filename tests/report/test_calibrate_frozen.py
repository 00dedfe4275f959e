"""The third round's calibration tools (docs/theory.md section 8): class offsets of a frozen logistic phase
model (a bounded grid, recovered from labels made with known offsets, cross-validated), a frozen model scored
without refitting, and fit cells kept near a model's boundary from a seeded random draw."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from ptlab.design import draw_design, load_box
from ptlab.phase import ALL_FEATURES, CONFIDENCE_EDGES, confidence_band, load
from ptlab.report.calibrate import (
    HELD_OUT,
    OFFSET_LIMIT,
    PHASE,
    _offset_grid,
    by_confidence,
    calibrate,
    cell_setting,
    confidence_lines,
    cross_validated_offsets,
    features_of,
    fit_offsets,
    near_boundary,
    offset_agreement,
    report_text,
    with_offsets,
)
from ptlab.report.runs import ReportError
from ptlab.theory import Setting, phase_features
from tests.conftest import REPO
from tests.report.test_calibrate import run_fit_and_held_out_designs, two_designs

BOX = REPO / "conf" / "design" / "calibration.yaml"
MODEL = REPO / "conf" / "phase_model.yaml"


def _logistic_model():
    """The committed phase model's logistic (the model itself, or the logistic inside an n-aware one)."""
    model = load(MODEL)
    return model.logistic_part() if model.kind == "n_aware" else model


def _log_p(model, x: np.ndarray) -> np.ndarray:
    return np.log(model.probabilities(x))


def _random_cells(seed: int, count: int) -> np.ndarray:
    model = _logistic_model()
    rows = [phase_features(cell_setting(c)) for c in draw_design(load_box(BOX), seed, count)]
    return np.array([[r[f] for f in model.features] for r in rows])


def test_the_offset_grid_is_bounded_and_starts_at_zero() -> None:
    grid = _offset_grid(3, 1)
    assert np.array_equal(grid[0], np.zeros(3)) and np.all(grid[:, 1] == 0)
    assert np.all(grid.max(axis=1) - grid.min(axis=1) <= OFFSET_LIMIT + 1e-9) and np.all(np.abs(grid) <= OFFSET_LIMIT + 1e-9)
    sizes = np.abs(grid).max(axis=1)
    assert np.all(np.diff(sizes) >= -1e-12)  # smallest offsets first: ties go to them
    # 41 x 41 values minus the corners where the two free offsets differ by more than 1.0: 41^2 - 2 * (20 * 21 / 2).
    assert len(grid) == 41 * 41 - 2 * 210


def test_fit_offsets_recovers_known_offsets_and_never_flips_a_confident_cell() -> None:
    model = _logistic_model()
    x = _random_cells(3, 300)
    true = np.zeros(3)
    true[list(model.classes).index("negative_transfer")] = 0.6
    true[list(model.classes).index("transfer_helps")] = -0.3
    labels = np.array(with_offsets(model, true).predict_outcomes(x), dtype=object)
    assert (labels != np.array(model.predict_outcomes(x), dtype=object)).sum() > 0  # the offsets matter here
    offsets, agreeing = fit_offsets(model, x, labels)
    assert agreeing == len(x)
    assert np.array_equal(np.array(with_offsets(model, offsets).predict_outcomes(x), dtype=object), labels)
    # Offsets never change the class of a cell the model puts at probability >= 0.75.
    confident = model.probabilities(x).max(axis=1) >= 0.75
    plain = np.array(model.predict_outcomes(x[confident]), dtype=object)
    log_p = _log_p(model, x[confident])
    for o in _offset_grid(3, 1)[::37]:
        assert np.array_equal(np.array(model.classes, dtype=object)[(log_p + o).argmax(axis=1)], plain)
    assert offset_agreement(_log_p(model, x), labels, model.classes, np.array([np.zeros(3), true])).tolist()[1] == len(x)


def test_with_offsets_shifts_only_the_intercepts() -> None:
    model = _logistic_model()
    x = _random_cells(4, 20)
    offsets = np.array([0.5, 0.0, -0.25])
    shifted = with_offsets(model, offsets)
    assert shifted.params["coef"] == model.params["coef"] and shifted.gain == model.gain
    assert np.allclose(shifted.params["intercept"], np.asarray(model.params["intercept"]) + offsets)
    expected = np.exp(_log_p(model, x) + offsets)
    np.testing.assert_allclose(shifted.probabilities(x), expected / expected.sum(axis=1, keepdims=True), rtol=1e-9)
    assert "class offsets (negative_transfer +0.50, transfer_helps -0.25)" in shifted.name
    assert with_offsets(model, np.zeros(3)) is model


def test_cross_validated_offsets_on_the_models_own_labels_change_nothing() -> None:
    model = _logistic_model()
    x = _random_cells(5, 120)
    labels = np.array(model.predict_outcomes(x), dtype=object)
    cv, plain = cross_validated_offsets(model, x, labels, repeats=2)
    assert plain == 1.0 and cv == 1.0
    flipped = labels.copy()
    flipped[:10] = np.where(flipped[:10] == "no_difference", "transfer_helps", "no_difference")
    cv, plain = cross_validated_offsets(model, x, flipped, repeats=2)
    assert plain == pytest.approx(110 / 120) and 0 < cv <= 1


def test_a_frozen_model_is_scored_as_it_is() -> None:
    cells = two_designs()
    frozen = load(MODEL)
    result = calibrate(cells, frozen=frozen)
    assert result.phase is frozen and result.phase_cv == {}
    scored = result.cells
    expected = frozen.predict_outcomes(features_of(scored, frozen.features))
    assert list(scored[PHASE]) == expected
    held = scored[scored["split"] == HELD_OUT]
    s = result.scores[HELD_OUT][PHASE]
    assert s.agreeing == int((held[PHASE] == held["measured"]).sum()) and s.cells == len(held)
    # Its confidence is its largest class probability; the bands split the held-out cells and their agreement.
    probabilities = frozen.probabilities(features_of(held, frozen.features))
    np.testing.assert_allclose(held["phase_confidence"], probabilities.max(axis=1))
    bands = by_confidence(held)
    assert sum(b["cells"] for b in bands) == len(held) and sum(b["agreeing"] for b in bands) == s.agreeing
    text = report_text(result)
    assert "gain model: CV RMSE" in text and f"held-out cells ({len(held)}):" in text


def test_agreement_by_confidence_against_hand_counts() -> None:
    assert [confidence_band(c) for c in (0.0, 0.34, 0.5, 0.599, 0.6, 0.9, 0.95, 1.0)] == [0, 0, 1, 1, 2, 5, 5, 5]
    cells = pd.DataFrame(
        {
            "split": HELD_OUT,
            "phase_confidence": [0.45, 0.55, 0.58, 0.75, 0.92, 0.97, 1.0],
            PHASE: ["a", "a", "b", "a", "a", "b", "a"],
            "measured": ["b", "a", "b", "b", "a", "b", "a"],
        }
    )
    bands = by_confidence(cells)
    assert [(b["low"], b["high"]) for b in bands] == list(zip(CONFIDENCE_EDGES[:-1], CONFIDENCE_EDGES[1:]))
    assert [(b["cells"], b["agreeing"]) for b in bands] == [(1, 0), (2, 2), (0, 0), (1, 0), (0, 0), (3, 3)]

    class Result:
        pass

    result = Result()
    result.cells = cells
    lines = confidence_lines(result)
    # From 0.5 up: 6 cells, 5 agree; from 0.9 up: 3 of 3; the empty band [0.6, 0.7) says so.
    assert "from 0.5 up: 6 cells (86%), 83.3%" in lines[2] and "[0.9, 1.0]: 3/3 = 100.0%" in lines[6]
    assert "[0.6, 0.7): no cell; from 0.6 up: 4 cells (57%), 75.0%" in lines[3]


def test_a_prediction_tells_the_held_out_agreement_of_its_confidence_band() -> None:
    from dataclasses import replace

    model = load(MODEL)
    x = _random_cells(11, 40)
    probabilities = model.probabilities(x)
    bands = [
        {"low": lo, "high": hi, "cells": 10 + i, "agreeing": i}
        for i, (lo, hi) in enumerate(zip(CONFIDENCE_EDGES[:-1], CONFIDENCE_EDGES[1:]))
    ]
    recorded = replace(
        model, provenance={**model.provenance, "held_out": {**model.provenance["held_out"], "by_confidence": bands}}
    )
    bare = replace(model, provenance={})
    for row, p in zip(x, probabilities):
        found = recorded.predict(dict(zip(model.features, row)))
        band = confidence_band(p.max())
        assert found["confidence"] == pytest.approx(p.max(), abs=1e-6)
        assert found["held_out_agreement_at_confidence"] == pytest.approx(band / (10 + band))
        assert found["held_out_cells_at_confidence"] == 10 + band
        none = bare.predict(dict(zip(model.features, row)))
        assert none["held_out_agreement_at_confidence"] is None and none["held_out_agreement"] is None


def test_cell_setting_reads_a_designs_overrides() -> None:
    cell = draw_design(load_box(BOX), 5, 1)[0]
    setting = cell_setting(cell)
    values = dict(o.split("=", 1) for o in cell)
    assert setting == Setting(
        int(values["task.d"]),
        int(values["task.n1"]),
        int(values["task.n2"]),
        float(values["task.u_norm"]),
        float(values["task.v_norm"]),
        float(values["noise.sigma_p1"]),
        float(values["noise.sigma_p2"]),
        float(values["transfer.alpha"]),
    )
    with pytest.raises(ReportError, match="lacks transfer.alpha"):
        cell_setting([o for o in cell if not o.startswith("transfer.alpha")])


def test_near_boundary_keeps_exactly_the_unsure_cells_with_their_own_seeds() -> None:
    design = draw_design(load_box(BOX), 41, 120)
    model = load(MODEL)
    confidence = [model.probabilities([[phase_features(cell_setting(c))[f] for f in model.features]]).max() for c in design]
    for threshold in (0.6, 0.8):
        kept = near_boundary(design, model, threshold)
        assert kept == [c for c, p in zip(design, confidence) if p < threshold]
        assert 0 < len(kept) < len(design)
    assert len(near_boundary(design, model, 0.6)) < len(near_boundary(design, model, 0.8))
    seeds = [c[-1] for c in near_boundary(design, model, 0.8)]
    assert len(set(seeds)) == len(seeds) and all(s.startswith("seed=range(41") for s in seeds)
    with pytest.raises(ReportError, match="max_confidence=0"):
        near_boundary(design, model, 0.0)


def test_design_cli_near_boundary_and_bad_input(tmp_path: Path) -> None:
    from ptlab.report.cli import main

    out = tmp_path / "b.yaml"
    args = ["design", "--seed", "41", "--cells", "120", "--box", str(BOX), "--out", str(out)]
    assert main([*args, "--near-boundary", str(MODEL), "--max-confidence", "0.7"]) == 0
    written = yaml.safe_load(out.read_text())
    assert written["cells"] == near_boundary(draw_design(load_box(BOX), 41, 120), load(MODEL), 0.7)
    assert "--near-boundary" in written["command"] and "--max-confidence 0.7" in written["command"]
    bad = tmp_path / "bad.yaml"
    assert main([*args[:-1], str(bad), "--near-boundary", str(MODEL), "--max-confidence", "0"]) == 2
    assert main([*args[:-1], str(bad), "--near-boundary", str(tmp_path / "none.yaml")]) == 2
    assert not bad.exists()


def test_calibrate_cli_refuses_a_bad_frozen_model_before_reading_runs(tmp_path: Path, capsys) -> None:
    from ptlab.report.cli import main

    (tmp_path / "bad.yaml").write_text("name: x\n")
    assert main(["calibrate", "--fit", "x", "--phase-model", str(tmp_path / "bad.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "ptlab: --phase-model=" in capsys.readouterr().err
    assert main(["calibrate", "--fit", "x", "--offsets", "--out", str(tmp_path / "o")]) == 2
    assert main(["calibrate", "--fit", "x", "--held-out", "y", "--phase-model", str(MODEL), "--offsets"]) == 2
    assert "offsets need a frozen model and fit cells only" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_calibrate_cli_scores_a_frozen_model_and_writes_it_back_unchanged(tmp_path: Path, tracking_uri: str) -> None:
    from ptlab.report.cli import main

    held_uri = f"sqlite:///{tmp_path / 'held.db'}"
    run_fit_and_held_out_designs(tmp_path, BOX, tracking_uri, held_uri)
    out, written = tmp_path / "cal", tmp_path / "phase.yaml"
    common = ["--fit", "fit_design", "--held-out", "held_design", "--min-seeds", "3", "--tracking-uri", tracking_uri]
    args = ["calibrate", *common, "--held-out-tracking-uri", held_uri, "--out", str(out), "--phase-model", str(MODEL)]
    assert main([*args, "--write-phase", str(written)]) == 0
    frozen, again = load(MODEL), load(written)
    assert again.params == frozen.params and again.gain == frozen.gain and again.name == frozen.name
    assert again.provenance["command"] == frozen.provenance["command"]
    assert again.provenance["held_out"]["cells"] == 4 and "--phase-model" in again.provenance["scored_by"]
    assert sum(b["cells"] for b in again.provenance["held_out"]["by_confidence"]) == 4
    # Scored again on the same held-out cells: the score is replaced, not kept twice as an earlier one.
    rescored = tmp_path / "rescored.yaml"
    assert main([*args[:-1], str(written), "--write-phase", str(rescored)]) == 0
    assert load(rescored).provenance.get("earlier_held_out") == again.provenance.get("earlier_held_out")
    cells = pd.read_csv(out / "calibration_cells.csv")
    held = cells[cells["split"] == HELD_OUT]
    assert again.provenance["held_out"]["agreeing"] == int((held[PHASE] == held["measured"]).sum())
    # The frozen model's labels are its own predictions on the held-out settings.
    x = np.array([[row[f] for f in frozen.features] for row in (phase_features(s) for s in _settings(held))])
    assert list(held[PHASE]) == frozen.predict_outcomes(x)
    assert set(ALL_FEATURES) >= set(frozen.features)
    # Class offsets (of a logistic model: the committed model's logistic) fitted on the fit cells only, written
    # with their record; the held-out score is cleared.
    from dataclasses import replace

    from ptlab.phase import save

    logistic_file, offset_file = tmp_path / "logistic.yaml", tmp_path / "offsets.yaml"
    save(replace(_logistic_model(), gain=frozen.gain, provenance=frozen.provenance), logistic_file)
    assert (
        main(
            [
                "calibrate",
                *common[:2],
                *common[-4:],
                "--out",
                str(out),
                "--phase-model",
                str(logistic_file),
                "--offsets",
                "--write-phase",
                str(offset_file),
            ]
        )
        == 0
    )
    shifted = load(offset_file)
    record = shifted.provenance["offsets"]
    assert record["fit_cells"] == 4 and record["fit_experiments"] == ["fit_design"] and shifted.provenance["held_out"] == {}
    values = np.array([record["values"][c] for c in frozen.classes]) if record["kept"] else np.zeros(3)
    intercept = np.asarray(_logistic_model().params["intercept"])
    np.testing.assert_allclose(shifted.params["intercept"], intercept + values, atol=1e-7)
    assert "class offsets on 4 fit cells" in (out / "calibration.txt").read_text()
    assert shifted.provenance["earlier_held_out"][-1]["agreeing"] == frozen.provenance["held_out"]["agreeing"]


def _settings(cells: pd.DataFrame) -> list[Setting]:
    return [
        Setting(
            int(r.d), int(r.n1), int(r.n2), float(r.u_norm), float(r.v_norm), float(r.sigma_p1), float(r.sigma_p2), float(r.alpha)
        )
        for r in cells.itertuples()
    ]

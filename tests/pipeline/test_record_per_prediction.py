"""A prediction's record fields and summary entries, made once per prediction object (a grid's seeds of one setting
share it), are what they were made from and stay fresh dicts for each caller."""

from __future__ import annotations

import math

from ptlab.engines.base import StageResult
from ptlab.pipeline.record import exact, finite_or_none, pipeline_summary, theory_fields
from ptlab.spec import parse
from ptlab.theory import predict_from_spec


def test_theory_fields_and_summary_once_per_prediction(make_cfg) -> None:
    theory = predict_from_spec(parse(make_cfg("task.u_norm=0.0", "task.v_norm=0.0")))  # no signal: non-finite ratios
    assert theory.prediction is not None and any(isinstance(v, float) and not math.isfinite(v) for v in theory.as_dict().values())
    params, metrics = theory_fields(theory)
    assert params == {
        **{f"theory.{k}": v for k, v in theory.as_dict().items() if isinstance(v, str)},
        **{f"prediction.{k}": v for k, v in theory.prediction.items() if isinstance(v, str)},
    }
    expected = {f"theory/{k}": exact(float(v)) for k, v in theory.as_dict().items() if not isinstance(v, str)}
    expected = {k: v for k, v in expected.items() if math.isfinite(v)}
    expected.update(
        {f"prediction/{k}": float(v) for k, v in theory.prediction.items() if isinstance(v, (int, float)) and math.isfinite(v)}
    )
    assert metrics == expected
    kept = dict(params)
    params["theory.rule"] = "changed"  # a caller's changes stay in its own dicts
    metrics.clear()
    assert theory_fields(theory) == (kept, expected)

    stages = {"scratch": StageResult("scratch", None, {"test_acc": 0.75, "train_acc": 1.0, "train_loss": float("nan")})}
    summary = pipeline_summary(stages, 3, {"task": "synthetic"}, theory, {"transferability": {"logme": float("inf")}})
    whole = finite_or_none(
        {
            "upstream": None,
            "transfer": None,
            "scratch": {k: exact(v) for k, v in stages["scratch"].summary().items()},
            "transferability": {"logme": float("inf")},
            "theory": theory.as_dict(),
            "prediction": theory.prediction,
            "seed": 3,
            "choices": {"task": "synthetic"},
            "mlflow": {},
        }
    )
    assert summary == whole and list(summary) == list(whole)
    summary["theory"]["gamma"] = -1.0  # the next cell's summary is not changed by this one's
    assert pipeline_summary(stages, 3, {"task": "synthetic"}, theory, {"transferability": {"logme": float("inf")}}) == whole

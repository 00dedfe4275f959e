"""The one code path that tracks a pipeline's results and writes its summary.

``run_pipeline`` (one config) and the batched sweep (``ptlab.pipeline.batched``, many cells trained
at once) both call these functions: ``open_pipeline`` logs the config and the theory on the parent
run, ``record_stage`` a trained stage on its child run, ``record_pipeline`` the final metrics,
``transfer_gain``, the decomposition figure and ``summary.json``. Nothing about a pipeline is
written anywhere else.
"""

from __future__ import annotations

import json
import math
import struct
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ptlab.config import IMAGE_TRAIN_KEYS, SYNTHETIC_TRAIN_KEYS
from ptlab.engines.base import STAGES, StageResult
from ptlab.errors import DivergenceError
from ptlab.theory import TheoryPrediction
from ptlab.tracking.base import CONFIG_HASH_TAG, NOTE_TAG, NullTracker, Tracker
from ptlab.utils import flatten

ENVIRONMENT_KEYS = ("logger.", "cache.", "resume.", "devices.", "hydra", "trainer.", "experiment")
"""Override keys that say where or how a cell runs, not what it is (left out of its name)."""


MODEL_ROLES = {"upstream_model": "upstream", "model": "downstream"}


def cell_name(overrides: Sequence[str], seed: int) -> str:
    """A short name for what makes this cell itself: its overrides without the environment ones, each
    key shortened to its last part (``task.u_norm=0.0 seed=1``  ->  ``u_norm=0.0 seed=1``); where the
    upstream model is set apart from the downstream one, their keys say which is which
    (``upstream_model.name=resnet34d model.name=resnet18d``  ->  ``upstream=resnet34d downstream=resnet18d``)."""
    parts = []
    keys = [override.lstrip("+~").partition("=")[0] for override in overrides]
    two_models = any(key.split(".", 1)[0] == "upstream_model" for key in keys)
    named = {key.split(".", 1)[0] for key in keys if key.endswith((".name", ".arch"))}
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if not sep or key.startswith(ENVIRONMENT_KEYS):
            continue
        group, _, leaf = key.partition(".")
        if two_models and group in MODEL_ROLES:  # say which model is which: "upstream=resnet34d downstream=resnet18d"
            if not leaf and group in named:  # "model=timm model.name=resnet18d": the name says more
                continue
            role = MODEL_ROLES[group]
            parts.append(f"{role}={value}" if leaf in ("", "name", "arch") else f"{role}.{leaf}={value}")
            continue
        parts.append(f"{key.rsplit('.', 1)[-1]}={value}")
    if not any(part.startswith("seed=") for part in parts):
        parts.append(f"seed={seed}")
    return " ".join(parts)


def pipeline_tags(seed: int, digest: str, choices: Mapping[str, str]) -> dict[str, str]:
    """The tags of a pipeline's parent run (and its children): the group choices in one ``ptlab.choices`` tag
    (``engine=gram task=synthetic ...``), not a tag each, so the run page's tags stay a line or two."""
    return {"ptlab.seed": str(seed), CONFIG_HASH_TAG: digest, "ptlab.choices": " ".join(f"{k}={v}" for k, v in choices.items())}


def used_params(resolved: Mapping[str, Any]) -> dict[str, Any]:
    """The resolved config without the keys this pipeline does not read: image training keys in a
    synthetic pipeline (and the trainer and its devices on the gram engine), synthetic keys and the
    theory's constants in an image pipeline. ``config.yaml`` keeps the whole config."""
    params = {k: v for k, v in resolved.items() if k != "hydra"}
    synthetic = params.get("task", {}).get("name") == "synthetic"
    dropped = IMAGE_TRAIN_KEYS if synthetic else SYNTHETIC_TRAIN_KEYS
    params["train"] = {k: v for k, v in params.get("train", {}).items() if k not in dropped}
    if not synthetic:
        params.pop("theory", None)
    elif params.get("engine", {}).get("name") == "gram":
        params.pop("trainer", None)
        params.pop("devices", None)
    return params


def open_pipeline(tracker: Tracker, resolved: Mapping[str, Any], config_yaml: str, theory: TheoryPrediction | None) -> None:
    """Log the resolved config (params and ``config.yaml``) and the theory's prediction on the parent run:
    categorical fields as ``theory.<name>`` params, finite numbers as ``theory/<name>`` metrics (an
    infinite ratio is left out rather than stored as MLflow's largest float)."""
    tracker.log_params(flatten(resolved))
    tracker.log_text(config_yaml, "config.yaml")
    if theory is not None:
        params, metrics = theory_fields(theory)
        tracker.log_params(params)
        tracker.log_metrics(metrics)


def _per_prediction(theory: TheoryPrediction, name: str, make: Callable[[], Any]) -> Any:
    """``make()`` once per prediction object, kept in its instance dict as ``functools.cached_property`` keeps values
    (the frozen dataclass's fields are untouched): a grid's cells of one setting share their prediction, so its
    fields are formatted once, not once a cell."""
    if name not in theory.__dict__:
        theory.__dict__[name] = make()
    return theory.__dict__[name]


def theory_fields(theory: TheoryPrediction) -> tuple[dict[str, Any], dict[str, float]]:
    """The theory's prediction as a pipeline's params (``theory.<label>``) and metrics (``theory/<number>``, the
    finite ones, rounded for display), and the fitted phase model's (``prediction.*``, ``ptlab.phase``): what a run
    logs and what a grid row holds (new dicts each call, made once per prediction object)."""
    params, metrics = _per_prediction(theory, "_record_theory_fields", lambda: _theory_fields(theory))
    return dict(params), dict(metrics)


def _theory_fields(theory: TheoryPrediction) -> tuple[dict[str, Any], dict[str, float]]:
    params: dict[str, Any] = {f"theory.{k}": v for k, v in theory.labels().items()}
    metrics = {f"theory/{k}": exact(v) for k, v in theory.metrics().items() if math.isfinite(v)}
    if theory.prediction is not None:
        params.update({f"prediction.{k}": v for k, v in theory.prediction.items() if isinstance(v, str)})
        metrics.update(
            {
                f"prediction/{k}": float(v)
                for k, v in theory.prediction.items()
                if isinstance(v, (int, float)) and math.isfinite(v)
            }
        )
    return params, metrics


def record_stage(tracker: Tracker, result: StageResult) -> None:
    """Track a trained stage on its child run: curves, ``final/*`` at the last step, the transfer plan.
    A stage read from the upstream cache has no child run (the parent links the run that trained it)."""
    if result.cached:
        return
    if result.name not in tracker.children:
        tracker.start_stage(result.name)
    tracker.log_curves(result.curves, stage=result.name)
    tracker.log_metrics({f"final/{k}": exact(v) for k, v in result.final.items()}, stage=result.name, step=result.steps)
    if result.plan is not None:
        tracker.log_dict([row.as_dict() for row in result.plan], "transfer_plan.json", stage=result.name)
    tracker.end_stage(result.name)


def record_trained(
    tracker: Tracker, stages: Mapping[str, StageResult], error: DivergenceError | None = None
) -> Mapping[str, StageResult]:
    """Track stages that were trained before being tracked (a whole gram cell, a batched sweep's cell) as a
    single run tracks them while they train: each stage on its child run in order; ``error`` (a diverged stage,
    ``GramResult.divergence``) is raised where that stage's child run starts, so that the tracker marks that run
    and the pipeline FAILED with the single run's message and nothing after it is recorded."""
    failed = error.stage if error is not None else None
    for name in STAGES:
        if name not in stages:
            continue
        if name == failed:
            tracker.start_stage(name)
            raise error
        record_stage(tracker, stages[name])
    if error is not None:
        raise error
    return stages


def exact(value: float) -> float:
    """A final number as MLflow and summary.json show it: a float32 one (an accuracy: correct / n) as the decimal
    it stands for (0.909, not 0.9089999794960022), any other float to 6 significant digits (an image accuracy
    41/45 as 0.911111, not 0.9111111111111111)."""
    if isinstance(value, float) and math.isfinite(value):
        single = struct.unpack("f", struct.pack("f", value))[0]
        return float(f"{value:.7g}") if single == value else float(f"{value:.6g}")
    return value


def final_metrics(stages: Mapping[str, StageResult]) -> dict[str, float]:
    """``<stage>_train_acc``, ``<stage>_test_acc`` and ``transfer_gain`` (transfer - scratch test accuracy)."""
    final = {
        f"{name}_{key}": exact(stages[name].final[key]) for name in STAGES if name in stages for key in ("train_acc", "test_acc")
    }
    if "transfer" in stages and "scratch" in stages:
        final["transfer_gain"] = round(final["transfer_test_acc"] - final["scratch_test_acc"], 12)
    return final


def finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float replaced by ``None`` (JSON has no NaN or infinity)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def log_decomposition_figure(tracker: Tracker, stages: Mapping[str, StageResult], title: str) -> None:
    """Draw every stage's decomposition curves and log the PNG as ``decomposition.png`` on the parent run."""
    if isinstance(tracker, NullTracker):
        return
    from ptlab.modules.decomposition import decomposition_figure  # matplotlib loads only here

    figure = decomposition_figure({name: result.curves for name, result in stages.items()}, title)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "decomposition.png"
        figure.savefig(path, dpi=110)
        tracker.log_artifact(path)


def record_pipeline(
    tracker: Tracker,
    stages: Mapping[str, StageResult],
    output_dir: Path,
    seed: int,
    choices: Mapping[str, str],
    theory: TheoryPrediction | None = None,
    extra: Mapping[str, Any] | None = None,
    record_stages: bool = False,
    figure_title: str | None = None,
    write_file: bool = True,
) -> dict[str, Any]:
    """Track the pipeline's results and return its summary (also ``output_dir/summary.json``).

    ``record_stages``: the stages were trained without being tracked yet (the batched sweep);
    ``figure_title``: draw the decomposition figure (synthetic pipelines); ``extra``: more summary
    entries (the image data sizes); ``write_file``: write ``summary.json`` (rank 0 only under DDP)."""
    if record_stages:
        record_trained(tracker, stages)
    if figure_title is not None:
        log_decomposition_figure(tracker, stages, figure_title)
    summary = pipeline_summary(
        stages,
        seed,
        choices,
        theory,
        extra,
        {"tracking_uri": tracker.tracking_uri, "experiment_id": tracker.experiment_id, "parent_run_id": tracker.parent_run_id},
    )
    tracker.log_metrics(final_metrics(stages))
    tracker.set_tags({NOTE_TAG: description(summary)})
    text = json.dumps(summary, indent=2, allow_nan=False)
    if write_file:
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "summary.json").write_text(text)
    tracker.log_text(text, "summary.json")
    return summary


def pipeline_summary(
    stages: Mapping[str, StageResult],
    seed: int,
    choices: Mapping[str, str],
    theory: TheoryPrediction | None = None,
    extra: Mapping[str, Any] | None = None,
    mlflow: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A pipeline's ``summary.json`` (JSON-safe: non-finite numbers are ``None``), the same for every layout."""
    head: dict[str, Any] = {
        **{name: {k: exact(v) for k, v in stages[name].summary().items()} if name in stages else None for name in STAGES},
        **(extra or {}),
    }
    tail = {"seed": seed, "choices": dict(choices), "mlflow": dict(mlflow or {})}
    if theory is None:
        return finite_or_none({**head, **tail})
    made = _per_prediction(theory, "_record_summary_theory", lambda: finite_or_none(_summary_theory(theory)))
    return {**finite_or_none(head), **{key: dict(value) for key, value in made.items()}, **finite_or_none(tail)}


def _summary_theory(theory: TheoryPrediction) -> dict[str, Any]:
    """The summary's ``theory`` entry and, with a phase model, its ``prediction``."""
    return {"theory": theory.as_dict(), **({"prediction": theory.prediction} if theory.prediction is not None else {})}


def format_table(summary: Mapping[str, Any]) -> str:
    """A short text table of the stages' accuracies."""
    lines = [f"{'stage':<10}{'train_acc':>11}{'test_acc':>10}"]
    for stage in STAGES:
        result = summary.get(stage)
        if result:
            lines.append(f"{stage:<10}{result['train_acc']:>11.4f}{result['test_acc']:>10.4f}")
    if summary.get("transfer") and summary.get("scratch"):
        gain = summary["transfer"]["test_acc"] - summary["scratch"]["test_acc"]
        lines.append(f"transfer - scratch test accuracy: {100 * gain:+.2f} points")
    theory = summary.get("theory")
    if theory:
        lines.append(
            f"theory: {theory['predicted']} (d / D* = {_number(theory['d_over_threshold'])}, Gamma = {_number(theory['gamma'])})"
        )
    if summary.get("prediction"):
        lines.append(prediction_line(summary["prediction"]))
    return "\n".join(lines)


def prediction_line(prediction: Mapping[str, Any]) -> str:
    """The phase model's outcome with its confidence and the held-out agreement of that confidence's band."""
    band = prediction.get("held_out_agreement_at_confidence")
    told = "" if band is None else f"; held-out cells this confident agreed {100 * band:.0f}%"
    return f"phase model: {prediction['outcome']} (confidence {prediction['confidence']:.2f}{told})"


def description(summary: Mapping[str, Any]) -> str:
    """The parent run's MLflow description (markdown): a first line with the gain in points, the theory's
    prediction and the phase model's (MLflow shows the first lines before "Show more"), then the stage table."""
    lines = []
    transfer, scratch, theory = summary.get("transfer"), summary.get("scratch"), summary.get("theory")
    if transfer and scratch:
        gain = 100 * (transfer["test_acc"] - scratch["test_acc"])
        lines.append(
            f"**transfer - scratch: {gain:+.1f} points** (test accuracy {100 * transfer['test_acc']:.1f}% "
            f"vs {100 * scratch['test_acc']:.1f}%)"
        )
    if theory:
        lines.append(
            f"**theory: {theory['predicted']}** (d / D* = {_number(theory['d_over_threshold'])}, "
            f"Gamma = {_number(theory['gamma'])})"
        )
    if summary.get("prediction"):
        lines.append(f"**{prediction_line(summary['prediction'])}**")
    return "  \n".join(lines) + f"\n\n```\n{format_table(summary)}\n```"


def _number(value: float | None) -> str:
    return "inf" if value is None else f"{value:.3g}"

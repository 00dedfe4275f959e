"""The answer a sweep ends with: one row per setting (the swept values, n seeds, transfer, scratch, the paired gain in
points with its 95% t interval, the verdict, the prediction), the counts of finished, skipped and failed cells, and
the command that draws the report.

It reads what every layout leaves in the sweep dir (a job's ``summary.json`` and ``.hydra/overrides.yaml`` in the
run-per-cell layouts, ``summaries.jsonl`` and ``failures.json`` in the grid layout), so it holds for the basic,
joblib, submitit and batched launchers alike; ``SweepSummary``, a Hydra callback, finds the sweep dir and
``ptlab.cli`` prints the table when the sweep ends, failed or not.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from ptlab.pipeline.record import ENVIRONMENT_KEYS

ENVIRONMENT_PREFIXES = (*ENVIRONMENT_KEYS, "seed")
"""Override keys that say where or how a cell runs (``record.ENVIRONMENT_KEYS``), or which seed: not part of a
setting."""
TABLE = "sweep_summary.md"
"""The table's file in the sweep dir (and the sweep run's artifact)."""


@dataclass
class SweepCounts:
    """How many cells of the sweep finished now, were skipped (already finished), or failed."""

    finished: int = 0
    skipped: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class Cell:
    """One finished cell: its setting (the overrides minus seed and environment), seed and summary."""

    setting: tuple[tuple[str, str], ...]
    seed: int
    summary: Mapping[str, Any]


def setting_of(overrides: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """The key/value pairs of ``overrides`` that make a setting (sorted; seed and environment keys left out)."""
    pairs = []
    for override in overrides:
        key, sep, value = override.lstrip("+~").partition("=")
        if sep and not key.startswith(ENVIRONMENT_PREFIXES):
            pairs.append((key, value))
    return tuple(sorted(pairs))


def read_sweep(sweep_dir: Path) -> tuple[list[Cell], SweepCounts]:
    """Every finished cell in ``sweep_dir`` and the counts, from whatever layout wrote it."""
    cells: list[Cell] = []
    counts = SweepCounts()
    grid = sweep_dir / "summaries.jsonl"
    jobs = [] if grid.is_file() else [p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
    for job in sorted(jobs):  # in the grid layout, job dirs are its sampled cells, already in summaries.jsonl
        overrides = (
            yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
            if (job / ".hydra" / "overrides.yaml").is_file()
            else []
        )
        path = job / "summary.json"
        if not path.is_file():
            counts.failed += 1
            continue
        summary = json.loads(path.read_text())
        if "resumed_from" in summary:
            counts.skipped += 1
        else:
            counts.finished += 1
        cells.append(Cell(setting_of(overrides or []), int(summary.get("seed", 0)), summary))
    if grid.is_file():
        for line in grid.read_text().splitlines():
            entry = json.loads(line)
            counts.finished += 1
            cells.append(Cell(setting_of(entry["overrides"]), int(entry["summary"]["seed"]), entry["summary"]))
    failures = sweep_dir / "failures.json"
    if failures.is_file():
        failed = json.loads(failures.read_text())
        counts.failed += len(failed)
        counts.errors += [f["error"] for f in failed]
    skipped = sweep_dir / "skipped.json"
    if skipped.is_file():
        counts.skipped += int(json.loads(skipped.read_text())["cells"])
    return cells, counts


def _accuracy(summary: Mapping[str, Any], stage: str) -> float:
    entry = summary.get(stage)
    if isinstance(entry, Mapping) and entry.get("test_acc") is not None:
        return float(entry["test_acc"])
    metric = summary.get("metrics", {}).get(f"{stage}_test_acc")  # a resumed cell without its summary.json
    return math.nan if metric is None else float(metric)


def _prediction(summary: Mapping[str, Any]) -> str:
    for key, field_name in (("prediction", "outcome"), ("theory", "predicted")):
        entry = summary.get(key)
        if isinstance(entry, Mapping) and entry.get(field_name):
            return str(entry[field_name])
    return ""


def summary_rows(cells: Sequence[Cell]) -> list[dict[str, Any]]:
    """One row per setting, its seeds pooled: swept values, n, means, paired gain in points with its 95% t
    interval (``ptlab.report.runs.paired_ci``) and verdict, and the prediction logged with the cells."""
    import pandas as pd

    from ptlab.report.runs import paired_ci, verdict

    by_setting: dict[tuple, list[Cell]] = {}
    for cell in cells:
        by_setting.setdefault(cell.setting, []).append(cell)
    keys = sorted({key for setting in by_setting for key, _ in setting})
    varying = [k for k in keys if len({dict(s).get(k) for s in by_setting}) > 1] or keys
    rows = []
    for setting, group in by_setting.items():
        values = dict(setting)
        transfer = [_accuracy(c.summary, "transfer") for c in group]
        scratch = [_accuracy(c.summary, "scratch") for c in group]
        gains = [100 * (t - s) for t, s in zip(transfer, scratch)]
        finite = [g for g in gains if not math.isnan(g)]  # paired_ci's dropna, without a Series for every setting
        low, high = paired_ci(pd.Series(finite, dtype=float)) if len(finite) >= 2 else (math.nan, math.nan)
        n = len(finite)
        rows.append(
            {
                **{k: values.get(k, "") for k in varying},
                "n": n,
                "transfer": _fixed(_mean(transfer), "{:.4f}"),
                "scratch": _fixed(_mean(scratch), "{:.4f}"),
                "gain (points)": _fixed(_mean(gains), "{:+.1f}"),
                "95% CI": "" if math.isnan(low) else f"[{low:+.1f}, {high:+.1f}]",
                "verdict": verdict(low, high, n) if n else "",
                "prediction": ", ".join(sorted({_prediction(c.summary) for c in group} - {""})),
            }
        )
    return rows


def _fixed(value: float, form: str) -> str:
    return "" if math.isnan(value) else form.format(value)


def _mean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def format_summary(rows: Sequence[Mapping[str, Any]], counts: SweepCounts) -> str:
    """The table (Markdown) and the counts line."""
    from tabulate import tabulate

    table = tabulate(rows, headers="keys", tablefmt="github", disable_numparse=True) if rows else ""
    line = f"{counts.finished} cells finished, {counts.skipped} skipped (already finished), {counts.failed} failed"
    return f"{table}\n\n{line}" if table else line


def sweep_answer(sweep_dir: Path, tracking_uri: str | None, experiment: str | None) -> str:
    """What a sweep ends with: the table, the counts, where to look, and the report command (also written to
    ``sweep_dir/sweep_summary.md``)."""
    cells, counts = read_sweep(sweep_dir)
    text = format_summary(summary_rows(cells), counts)
    (sweep_dir / TABLE).write_text(text + "\n")
    lines = [text, f"sweep dir: {sweep_dir}"]
    if tracking_uri and experiment:
        lines.append(f"MLflow: mlflow ui --backend-store-uri {tracking_uri} (experiment {experiment!r})")
        lines.append(
            "report: python -m ptlab.report "
            + shlex.quote(experiment)
            + ("" if tracking_uri == "sqlite:///mlflow.db" else f" --tracking-uri {shlex.quote(tracking_uri)}")
        )
    return "\n".join(lines)


def log_answer(sweep_dir: Path, tracking_uri: str, experiment: str, status: str = "FINISHED") -> str | None:
    """The sweep's table as the artifact of a run of its experiment (tag ``ptlab.stage=sweep``, named for the sweep
    dir, ended with ``status``: the sweep's own outcome); its run id, or ``None`` when the experiment does not exist
    (nothing was tracked)."""
    from mlflow.tracking import MlflowClient

    from ptlab.tracking.base import STAGE_TAG
    from ptlab.tracking.mlflow import resolve_tracking_uri

    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    run = client.create_run(
        found.experiment_id, run_name=f"sweep {sweep_dir.name}", tags={STAGE_TAG: "sweep", "ptlab.sweep_dir": str(sweep_dir)}
    )
    client.log_artifact(run.info.run_id, str(sweep_dir / TABLE))
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


class SweepSummary(Callback):
    """Hydra callback: remembers each multirun's sweep dir and tracking target (``started``), for ``ptlab.cli`` to
    print the sweep's answer when it ends. Only the process that runs the sweeper calls it."""

    started: list[tuple[Path, str | None, str | None]] = []

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        logger = config.get("logger", {})
        tracked = logger.get("kind", "none") != "none"
        SweepSummary.started.append(
            (
                Path(str(config.hydra.sweep.dir)).absolute(),
                str(logger.get("tracking_uri")) if tracked else None,
                str(logger.get("experiment_name")) if tracked else None,
            )
        )

"""One config, three layouts: a single run, a batched sweep (a run per cell) and a grid give the same summary,
fail a diverged cell the same way, and the grid carries the theory and resumes."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from ptlab.pipeline import run_pipeline
from ptlab.spec import parse
from ptlab.theory import predict_from_spec

from ..conftest import SMALL, compose_config, run_cli
from ..gram_devices import DEVICES

BATCHED = ["-m", "engine=gram", "hydra/launcher=ptlab_gram", "hydra/sweeper=ptlab_batched"]
FLOAT32_TOLERANCE = 64 * 2.0**-23
"""Across different batch groupings the same float32 arithmetic may run in another order (BLAS picks its kernel
by shape): numbers agree to a few dozen units of float32's epsilon, relative to 1 (accuracies, losses ~ 1)."""


def same_summary(a: Any, b: Any, path: str = "") -> None:
    """``a`` equals ``b`` (summary.json trees): strings, ints and structure exactly, floats within
    ``FLOAT32_TOLERANCE``."""
    if isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), f"{path}: keys {sorted(a)} vs {sorted(b)}"
        for key in a:
            same_summary(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same_summary(x, y, f"{path}[{i}]")
    elif isinstance(a, float) or isinstance(b, float):
        assert a is not None and b is not None and math.isclose(a, b, rel_tol=0, abs_tol=FLOAT32_TOLERANCE), f"{path}: {a} vs {b}"
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def without_mlflow(summary: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in summary.items() if k != "mlflow"}


def sweep(tmp_path: Path, name: str, *overrides: str, layout: str = "runs") -> Any:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    return run_cli(
        [
            *BATCHED,
            *SMALL,
            f"hydra.launcher.tracking={layout}",
            f"logger.tracking_uri={uri}",
            f"logger.experiment_name={name}",
            f"hydra.sweep.dir={tmp_path / name}",
            *overrides,
        ],
        cwd=tmp_path,
    )


@pytest.mark.parametrize("device", DEVICES)
def test_single_batched_and_grid_give_the_same_summary(tmp_path: Path, device: str) -> None:
    """summary.json of a single run, of the batched launcher's job dir and of the grid's summaries.jsonl line agree
    (the mlflow entry aside: each names its own runs), on any device."""
    cell = ["task.u_norm=1.0", "seed=3", f"engine.device={device}"]
    single = run_pipeline(
        compose_config(
            [
                f"logger.tracking_uri=sqlite:///{tmp_path / 'single.db'}",
                *SMALL,
                f"cache.dir={tmp_path / 'cache'}",
                "engine=gram",
                *cell,
            ]
        ),
        tmp_path / "one",
    )
    done = sweep(tmp_path, "batched", *cell)
    assert done.returncode == 0, done.stderr[-3000:]
    batched = json.loads((tmp_path / "batched" / "0" / "summary.json").read_text())
    done = sweep(tmp_path, "grid", *cell, layout="grid")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (tmp_path / "grid" / "summaries.jsonl").read_text().splitlines()
    assert len(lines) == 1
    grid = json.loads(lines[0])["summary"]
    assert single["theory"]["predicted"] and single["upstream"]["train_loss"] is not None
    same_summary(without_mlflow(single), without_mlflow(batched))
    same_summary(without_mlflow(single), without_mlflow(grid))


@pytest.mark.parametrize("layout", ["runs", pytest.param("grid", marks=pytest.mark.slow)])  # grid: also slow (suite time)
def test_a_diverged_cell_fails_as_a_single_run_does(tmp_path: Path, layout: str) -> None:
    """One cell of two diverges: the sweep exits non-zero with the single run's line, no summary holds a null loss,
    the diverged cell is FAILED (its runs, or the grid run that lists it) and the other cell is kept."""
    alone = run_cli([*SMALL, "noise.sigma_p1=1e30", "logger=none", f"hydra.run.dir={tmp_path / 'alone'}"], cwd=tmp_path)
    assert alone.returncode == 1
    line = alone.stderr.strip().splitlines()[-1]
    assert line.startswith("ptlab: stage upstream diverged at step")
    done = sweep(tmp_path, "div", "noise.sigma_p1=1.0,1e30", layout=layout)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines()[-1] == line
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("div").experiment_id
    if layout == "runs":
        parents = {
            r.data.params["noise.sigma_p1"]: r for r in client.search_runs([experiment], "tags.`ptlab.stage` = 'pipeline'")
        }
        assert parents["1.0"].info.status == "FINISHED" and parents["1e+30"].info.status == "FAILED"
        assert parents["1e+30"].data.tags["ptlab.error"] == "DivergenceError: " + line.removeprefix("ptlab: ")
        failed_children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parents['1e+30'].info.run_id}'")
        assert [c.info.status for c in failed_children] == ["FAILED"]  # the upstream stage; nothing after it
        summaries = [json.loads(p.read_text()) for p in (tmp_path / "div").glob("*/summary.json")]
    else:
        (grid,) = client.search_runs([experiment], "tags.`ptlab.stage` = 'grid'")
        assert grid.info.status == "FAILED" and line.removeprefix("ptlab: ") in grid.data.tags["ptlab.error"]
        failures = json.loads((tmp_path / "div" / "failures.json").read_text())
        assert [f["error"] for f in failures] == [line.removeprefix("ptlab: ")]
        table = pd.read_parquet(tmp_path / "div" / "results.parquet")
        assert table["params.noise.sigma_p1"].tolist() == ["1.0"]
        summaries = [json.loads(x)["summary"] for x in (tmp_path / "div" / "summaries.jsonl").read_text().splitlines()]
    assert len(summaries) == 1
    assert all(summaries[0][stage]["train_loss"] is not None for stage in ("upstream", "transfer", "scratch"))
    # the sweep still ends with its answer: the table of what finished, the counts, the report command
    assert "1 cells finished, 0 skipped (already finished), 1 failed" in done.stdout
    assert "report: python -m ptlab.report div --tracking-uri" in done.stdout


def test_the_grid_carries_the_theory_and_resumes(tmp_path: Path) -> None:
    """Each grid row holds the theory's params and metrics as a run per cell logs them; a rerun of the same sweep
    trains only its new cells (the others are in a grid run)."""
    done = sweep(tmp_path, "g", "task.u_norm=0.0,2.0", "seed=0,1", layout="grid")
    assert done.returncode == 0, done.stderr[-3000:]
    table = pd.read_parquet(tmp_path / "g" / "results.parquet")
    for _, row in table.iterrows():
        theory = predict_from_spec(parse(compose_config([*SMALL, f"task.u_norm={row['params.task.u_norm']}"])))
        assert row["params.theory.predicted"] == theory.predicted
        for key, value in theory.metrics().items():
            if math.isfinite(value):
                assert row[f"metrics.theory/{key}"] == pytest.approx(value)
    wider = sweep(tmp_path, "g", "task.u_norm=0.0,2.0", "seed=0,1,2", layout="grid")
    assert wider.returncode == 0, wider.stderr[-3000:]
    assert "skipped 4 of 6 cells" in wider.stdout
    assert "2 cells finished, 4 skipped (already finished), 0 failed" in wider.stdout
    table = (tmp_path / "g" / "sweep_summary.md").read_text()
    assert "| task.u_norm   | n   |" in table and table.count("| 1   |") == 2  # one new seed in each setting
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("g").experiment_id
    grids = client.search_runs([experiment], "tags.`ptlab.stage` = 'grid'")
    assert sorted(int(r.data.metrics["grid/cells"]) for r in grids) == [2, 4]
    sweeps = client.search_runs([experiment], "tags.`ptlab.stage` = 'sweep'", order_by=["attributes.start_time DESC"])
    assert len(sweeps) == 2 and [a.path for a in client.list_artifacts(sweeps[0].info.run_id)] == ["sweep_summary.md"]


@pytest.mark.slow
def test_a_default_experiment_grid_gives_the_runs_layouts_numbers(tmp_path: Path) -> None:
    """The default config names its experiment by a group choice (``${hydra:runtime.choices.experiment}``), which
    no value of a job changes: the grid takes a sweep of it with a fixed value beside the swept one, and its cells
    are the run-per-cell layout's, number for number, in the same experiment."""
    common = [*BATCHED, *SMALL, "seed=0,1", "transfer.alpha=0.3"]
    for layout in ("runs", "grid"):
        done = run_cli(
            [
                *common,
                f"hydra.launcher.tracking={layout}",
                f"logger.tracking_uri=sqlite:///{tmp_path / layout}.db",
                f"hydra.sweep.dir={tmp_path / layout}",
            ],
            cwd=tmp_path,
        )
        assert done.returncode == 0, done.stderr[-3000:]
        client = MlflowClient(f"sqlite:///{tmp_path / layout}.db")
        experiment = client.get_experiment_by_name("default").experiment_id
        stage = "pipeline" if layout == "runs" else "grid"
        assert len(client.search_runs([experiment], f"tags.`ptlab.stage` = '{stage}'")) == (2 if layout == "runs" else 1)
    runs = [json.loads((tmp_path / "runs" / str(job) / "summary.json").read_text()) for job in (0, 1)]
    lines = [json.loads(line) for line in (tmp_path / "grid" / "summaries.jsonl").read_text().splitlines()]
    assert [line["job"] for line in lines] == [0, 1]
    assert runs[0]["transfer"]["test_acc"] != runs[1]["transfer"]["test_acc"]  # two seeds, two cells
    for alone, line in zip(runs, lines):
        same_summary(without_mlflow(alone), without_mlflow(line["summary"]))
    table = pd.read_parquet(tmp_path / "grid" / "results.parquet")
    assert table["params.transfer.alpha"].tolist() == ["0.3", "0.3"] and table["params.seed"].tolist() == ["0", "1"]


def test_auto_takes_a_run_per_cell_where_the_grid_cannot(tmp_path: Path) -> None:
    """Above ``grid_threshold`` cells ``tracking=auto`` picks the grid, unless a value may differ per job (here the
    experiment name reads ``hydra.job.num``): then each job is a run of its own, in its own experiment."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    done = run_cli(
        [
            *BATCHED,
            *SMALL,
            "seed=0,1",
            "hydra.launcher.tracking=auto",
            "hydra.launcher.grid_threshold=1",
            "logger.experiment_name=e${hydra:job.num}",
            f"logger.tracking_uri={uri}",
            f"hydra.sweep.dir={tmp_path / 'auto'}",
        ],
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    client = MlflowClient(uri)
    for job in (0, 1):
        summary = json.loads((tmp_path / "auto" / str(job) / "summary.json").read_text())
        assert summary["seed"] == job
        (run,) = client.search_runs([client.get_experiment_by_name(f"e{job}").experiment_id], "tags.`ptlab.stage` = 'pipeline'")
        assert run.data.params["seed"] == str(job)
    assert not (tmp_path / "auto" / "results.parquet").exists()

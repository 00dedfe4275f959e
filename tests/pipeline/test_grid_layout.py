"""The grid tracking layout of large batched sweeps, and the kou2023 heatmap report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from ptlab.engines.gram import GramCell, run_cells
from ptlab.pipeline.grid_figure import grid_heatmap, grid_means, heatmap_axes
from ptlab.report.cli import make_report
from ptlab.report.kou2023 import kou2023_table
from ptlab.report.runs import load_pipelines
from ptlab.spec import parse

from ..conftest import SMALL, compose_config, run_cli


def test_grid_layout_through_cli(tmp_path: Path) -> None:
    """Above ``grid_threshold`` cells the sweep is one FINISHED grid run with the results table and sampled
    full cells under it; ``load_pipelines`` reads the table as it reads a run per cell, with the numbers
    each cell gets alone."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sweep = ["task.d=50,80", "task.u_norm=0.0,2.0", "seed=0,1"]
    args = [
        "-m",
        "engine=gram",
        "hydra/launcher=ptlab_gram",
        "hydra/sweeper=ptlab_batched",
        *SMALL,
        *sweep,
        "hydra.launcher.grid_threshold=4",
        "hydra.launcher.grid_samples=2",
        f"logger.tracking_uri={uri}",
        "logger.experiment_name=grid",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("grid").experiment_id
    grid_runs = client.search_runs([experiment], "tags.`ptlab.stage` = 'grid'")
    assert len(grid_runs) == 1 and grid_runs[0].info.status == "FINISHED"
    grid_id = grid_runs[0].info.run_id
    assert sorted(a.path for a in client.list_artifacts(grid_id)) == ["grid_heatmap.png", "results.parquet", "summaries.jsonl"]
    assert (tmp_path / "sweep" / "grid_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not client.search_runs([experiment], "tags.`ptlab.stage` = 'pipeline'")
    samples = client.search_runs([experiment], "tags.`ptlab.stage` = 'grid_sample'")
    assert len(samples) == 2 and all(s.data.tags["mlflow.parentRunId"] == grid_id for s in samples)
    for sample in samples:
        children = client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{sample.info.run_id}'")
        assert sorted(c.data.tags["ptlab.stage"] for c in children) == ["scratch", "transfer", "upstream"]
        scratch = next(c for c in children if c.data.tags["ptlab.stage"] == "scratch")
        assert len(client.get_metric_history(scratch.info.run_id, "loss/train")) == 31  # every step
    runs = load_pipelines(uri, "grid")
    assert len(runs) == 8 and (runs["run_id"] == grid_id).all()
    assert (tmp_path / "sweep" / "results.parquet").is_file()
    for _, row in runs.iloc[[0, 7]].iterrows():
        cfg = parse(
            compose_config(
                [
                    "engine=gram",
                    *SMALL,
                    f"task.d={row['params.task.d']}",
                    f"task.u_norm={row['params.task.u_norm']}",
                    f"seed={row['params.seed']}",
                ]
            )
        )
        alone = run_cells([GramCell.from_spec(cfg)])[0]
        for stage in ("upstream", "transfer", "scratch"):
            assert row[f"metrics.{stage}_test_acc"] == pytest.approx(alone.stages[stage].final["test_acc"], abs=1e-6)
        assert row["metrics.transfer_gain"] == pytest.approx(
            row["metrics.transfer_test_acc"] - row["metrics.scratch_test_acc"], abs=1e-9
        )
        for name in ("logme", "leep", "logme_scratch"):
            assert row[f"metrics.transferability/{name}"] == pytest.approx(alone.transferability[name], rel=1e-9)
    assert sorted(runs["params.task.d"].unique()) == ["50", "80"]
    assert runs["params.model.width"].unique().tolist() == ["8"]


def kou_runs(c: float, seeds: int = 2) -> pd.DataFrame:
    """A kou2023-shaped table whose error is 0.1 exactly where ``d <= c * n ||mu||^4`` and 0.5 elsewhere."""
    rows = []
    for d in range(100, 1100, 100):
        for mu in np.arange(0, 5, 0.5):
            for seed in range(seeds):
                error = 0.1 if d <= c * 20 * mu**4 else 0.5
                rows.append(
                    {
                        "params.task.d": str(d),
                        "params.task.v_norm": str(mu),
                        "params.seed": str(seed),
                        "params.task.n2": "20",
                        "params.noise.sigma_p2": "1.0",
                        "params.task.label_noise": "0.1",
                        "metrics.scratch_test_acc": 1 - error,
                    }
                )
    return pd.DataFrame(rows)


def test_kou2023_fit_recovers_the_boundary(tmp_path: Path, monkeypatch) -> None:
    """On a table built from a known boundary constant the fit brackets it and agrees on every cell; the
    renderer writes the heatmap, the cell table and the fit."""
    table, fit, fixed = kou2023_table(kou_runs(0.7), "kou2023")
    assert fit.c_low <= 0.7 < fit.c_high and fit.agreement == 1.0
    assert fixed == {"n": 20.0, "sigma_p": 1.0, "p": 0.1} and len(table) == 100 and (table.seeds == 2).all()
    monkeypatch.setattr("ptlab.report.cli.load_pipelines", lambda uri, name: kou_runs(0.7))
    paths = make_report("kou2023", out_dir=tmp_path, log_to_mlflow=False)
    assert sorted(p.name for p in paths) == [
        "kou2023.csv",
        "kou2023.md",
        "kou2023.pdf",
        "kou2023.png",
        "kou2023_boundary.csv",
        "kou2023_boundary.md",
    ]


def test_grid_heatmap_averages_the_other_swept_keys(tmp_path: Path) -> None:
    """The grid run's heatmap: axes are the two most-swept numeric keys (never the seed), each pixel the mean over
    the other swept keys; nothing is drawn with one numeric key."""
    rows = [
        {
            "params.task.d": str(d),
            "params.task.u_norm": str(u),
            "params.seed": str(s),
            "params.transfer.selection": "random",
            "params.model.width": "8",
            "metrics.transfer_test_acc": 0.5 + 0.01 * d + 0.1 * u + 0.001 * s,
        }
        for d in (10, 20, 30)
        for u in (0.0, 1.0)
        for s in (0, 1, 2, 3)
    ]
    table = pd.DataFrame(rows)
    swept = ["model.width", "seed", "task.d", "task.u_norm", "transfer.selection"]
    assert heatmap_axes(table, swept) == ("task.d", "task.u_norm")
    means = grid_means(table, "task.d", "task.u_norm", "metrics.transfer_test_acc")
    assert means.loc[1.0, 20] == pytest.approx(0.5 + 0.2 + 0.1 + 0.001 * 1.5)
    assert means.shape == (2, 3)
    assert grid_heatmap(table, swept, tmp_path / "grid.png") == tmp_path / "grid.png"
    assert grid_heatmap(table, ["seed", "task.d"], tmp_path / "none.png") is None and not (tmp_path / "none.png").exists()

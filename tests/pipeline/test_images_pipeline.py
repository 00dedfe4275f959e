"""The image pipeline end to end on digits (tiny budget), its MLflow records, and the Table 1 / Figure 3
renderers checked against hand-computed numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from mlflow.tracking import MlflowClient

from ptlab.pipeline import run_pipeline
from ptlab.pipeline.images import build_image_model
from ptlab.report import make_report
from ptlab.report.images import render_fig3, render_table1
from ptlab.spec import parse

TINY = [
    "task=digits",
    "noise=pixels",
    "+pair=vgg16_small_vgg11_small",
    "task.n2=8",
    "task.k=2",
    "task.n1_ratio=2",
    "task.n_test=10",
    "train.upstream_epochs=2",
    "train.downstream_epochs=2",
    "train.batch_size=8",
    "train.progress_bar=false",
    "logger.experiment_name=table1_tiny",
]


def test_digits_pipeline_end_to_end(make_cfg, tracking_uri: str, tmp_path: Path) -> None:
    cfg = make_cfg(*TINY, small=False)
    summary = run_pipeline(cfg, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written["transfer"]["plan"] == summary["transfer"]["plan"]
    plan = written["transfer"]["plan"]
    assert isinstance(plan, list) and len(plan) == 8  # VGG-11 has 8 convs, all matched in VGG-16
    assert plan[0] == {
        "target": "features.0",
        "source": "features.0",
        "copied": 8,
        "total": 16,
        "indices": plan[0]["indices"],
        "strategy": "random",
        "scores": [],
    }
    assert len(plan[0]["indices"]) == 8
    assert written["data"]["n1"] == 16 and written["data"]["n2"] == 8 and written["data"]["n2_test"] == 10
    for stage in ("upstream", "transfer", "scratch"):
        assert 0.0 <= written[stage]["test_acc"] <= 1.0 and written[stage]["epochs"] == 2

    client = MlflowClient(tracking_uri)
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    gain = summary["transfer"]["test_acc"] - summary["scratch"]["test_acc"]
    assert parent.data.metrics["transfer_gain"] == pytest.approx(gain, abs=1e-7)
    children = {
        run.data.tags["ptlab.stage"]: run
        for run in client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    }
    assert set(children) == {"upstream", "transfer", "scratch"}
    assert {run.data.tags["ptlab.precision"] for run in children.values()} == {"32-true"}  # auto, resolved on a CPU
    transfer_run = children["transfer"].info.run_id
    artifacts = {a.path for a in client.list_artifacts(transfer_run)}
    assert {"transfer_plan.json", "transfer_plan.md"} <= artifacts
    curve = client.get_metric_history(transfer_run, "acc/test")
    assert len(curve) == 2  # one point per epoch (eval_every_epochs=1)
    assert children["transfer"].data.metrics["summary/test_acc"] == summary["transfer"]["test_acc"]

    paths = make_report("table1_tiny", tracking_uri, tmp_path / "report", log_to_mlflow=False)
    table = (tmp_path / "report" / "table1_tiny.md").read_text()
    assert {p.name for p in paths} == {"table1_tiny.md", "table1_tiny.csv", "table1_tiny_trend.csv", "table1_tiny.png"}
    assert "vgg16 (x0.25) -> vgg11 (x0.25)" in table and "N1/N2=2" in table


def test_transfer_and_scratch_start_from_the_same_fresh_init(make_cfg) -> None:
    cfg = parse(make_cfg(*TINY, small=False))
    first, second = (build_image_model(cfg, 2, "downstream") for _ in range(2))
    upstream = build_image_model(cfg, 2, "upstream")
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), second.state_dict().values()))
    assert not torch.equal(first.features[0].weight, upstream.features[0].weight)


def fake_runs(swept: str, values: list[float]) -> pd.DataFrame:
    """Finished-run rows as ``load_pipelines`` returns them: two pairs, two seeds per value."""
    rows = []
    for pair, (up, down, width) in enumerate((("resnet101", "resnet34", "1.0"), ("vgg16", "vgg11", "0.25"))):
        for i, value in enumerate(values):
            for seed in (0, 1):
                transfer, scratch = 0.70 + 0.1 * i + 0.02 * seed + 0.01 * pair, 0.60 + 0.02 * seed
                rows.append(
                    {
                        "params.upstream_model.arch": up,
                        "params.model.arch": down,
                        "params.upstream_model.width": width,
                        "params.model.width": width,
                        swept: str(value),
                        "params.seed": str(seed),
                        "metrics.transfer_test_acc": transfer,
                        "metrics.scratch_test_acc": scratch,
                        "metrics.transfer_gain": transfer - scratch,
                    }
                )
    return pd.DataFrame(rows)


def test_table1_renderer_numbers(tmp_path: Path) -> None:
    paths = render_table1(fake_runs("params.task.n1_ratio", [2, 3]), "table1_x", tmp_path)
    md = paths[0].read_text().splitlines()
    row = next(line for line in md if line.startswith("| resnet101 -> resnet34"))
    # scratch of the pair (the same task-2 runs at every ratio, counted once): 60, 62 -> 61.0 ± 1.4;
    # ratio 2: 70, 72 -> 71.0 ± 1.4, paired gains 10, 10 -> +10.0 with a zero-width interval; ratio 3: +20.0
    assert [cell.strip() for cell in row.strip("|").split("|")] == [
        "resnet101 -> resnet34",
        "61.0 ± 1.4",
        "71.0 ± 1.4 (+10.0 [+10.0, +10.0], n=2)",
        "81.0 ± 1.4 (+20.0 [+20.0, +20.0], n=2)",
    ]
    assert any(line.startswith("| vgg16 (x0.25) -> vgg11 (x0.25)") and "72.0 ± 1.4 (+11.0" in line for line in md)
    csv = pd.read_csv(paths[1])
    assert csv["transfer_gain_mean"].round(6).tolist() == [0.10, 0.20, 0.11, 0.21]


def test_fig3_renderer_writes_figure_and_table(tmp_path: Path) -> None:
    paths = render_fig3(fake_runs("params.noise.sigma_p2", [1, 20]), "fig3_x", tmp_path)
    assert paths[0].suffix == ".png" and paths[0].stat().st_size > 10_000
    csv = pd.read_csv(tmp_path / "fig3_x.csv")
    assert csv["noise.sigma_p2"].tolist() == [1, 20, 1, 20]
    assert csv["scratch_test_acc_mean"].round(6).tolist() == [0.61] * 4

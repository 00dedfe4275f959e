"""The paper's Figure 4 redrawn from MLflow: ViT layer transfer ("VanillaLG") against scratch.

Experiments ``fig4*``: for each downstream task (CIFAR-10, CIFAR-100, or digits), the downstream test
accuracy with the inherited blocks and from scratch, mean ± std over seeds, beside the mean of the
paired per-seed gains (left panel, bars), and the test-accuracy curves of both downstream trainings
over the fine-tuning epochs, averaged over seeds (right panel, from the ``transfer`` and ``scratch``
child runs, with the 95% t band over seeds where there are two or more). The bar panel states the paired
gain with its 95% t interval, n and verdict. Files: ``<experiment>.png``/``.pdf`` and the table
``<experiment>.csv``/``.md``.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from ptlab.report.generic import write_table
from ptlab.report.runs import ReportError, paired_ci, seed_stats
from ptlab.tracking.mlflow import STAGE_TAG

TRANSFER, SCRATCH, GAIN = "metrics.transfer_test_acc", "metrics.scratch_test_acc", "metrics.transfer_gain"
TASK = "params.task.name"
STAGES = {"transfer": "VanillaLG (blocks inherited)", "scratch": "scratch"}
STAGE_COLORS = {"transfer": "C0", "scratch": "C1"}
TASK_MARKERS = ("o", "s", "^", "D")
TASK_LABELS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "digits": "digits", "fashion_mnist": "Fashion-MNIST"}


def accuracy_curves(runs: pd.DataFrame) -> pd.DataFrame:
    """Per-epoch ``acc/test`` of the transfer and scratch child runs of ``runs``' pipelines:
    columns task, stage, seed, epoch, acc (empty when no child logged a curve)."""
    client = MlflowClient(mlflow.get_tracking_uri())
    rows = []
    for _, parent in runs.iterrows():
        children = client.search_runs([parent["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{parent['run_id']}'")
        for child in children:
            stage = child.data.tags.get(STAGE_TAG)
            if stage not in STAGES:
                continue
            epochs = {m.step: m.value for m in client.get_metric_history(child.info.run_id, "epoch")}
            for point in client.get_metric_history(child.info.run_id, "acc/test"):
                rows.append(
                    {
                        "task": parent[TASK],
                        "stage": stage,
                        "seed": parent.get("params.seed"),
                        "epoch": epochs.get(point.step, point.step) + 1,
                        "acc": point.value,
                    }
                )
    return pd.DataFrame(rows, columns=["task", "stage", "seed", "epoch", "acc"])


def fig4_table(runs: pd.DataFrame) -> pd.DataFrame:
    """Per task: transfer and scratch test accuracy (%) mean/std over seeds, the mean paired gain, seeds,
    and the gain's 95% t interval with its verdict."""
    stats = seed_stats(runs, [TASK], [TRANSFER, SCRATCH, GAIN])
    return pd.DataFrame(
        {
            "task": stats[TASK].map(lambda t: TASK_LABELS.get(t, t)),
            "transfer_acc_mean": 100 * stats[f"{TRANSFER}_mean"],
            "transfer_acc_std": 100 * stats[f"{TRANSFER}_std"],
            "scratch_acc_mean": 100 * stats[f"{SCRATCH}_mean"],
            "scratch_acc_std": 100 * stats[f"{SCRATCH}_std"],
            "gain_mean": 100 * stats[f"{GAIN}_mean"],
            "seeds": stats[f"{TRANSFER}_count"],
            "gain_ci_low": 100 * stats[f"{GAIN}_ci_low"],
            "gain_ci_high": 100 * stats[f"{GAIN}_ci_high"],
            "verdict": stats["verdict"],
        }
    )


def render_fig4(runs: pd.DataFrame, experiment: str, out_dir: Path) -> list[Path]:
    """Figure 4: bars of transfer vs scratch per task, and the fine-tuning curves."""
    missing = [c for c in (TASK, TRANSFER, SCRATCH, GAIN) if c not in runs.columns]
    if missing:
        raise ReportError(
            f"experiment {experiment!r} runs lack {', '.join(missing)}: are they image pipelines with transfer=layers?"
        )
    runs = runs.dropna(subset=[TRANSFER, SCRATCH])
    table = fig4_table(runs)
    curves = accuracy_curves(runs)

    figure = Figure(figsize=(10, 3.8), layout="constrained")
    bars, lines = figure.subplots(1, 2)
    x = np.arange(len(table))
    for offset, (stage, label) in zip((-0.2, 0.2), STAGES.items()):
        bars.bar(
            x + offset,
            table[f"{stage}_acc_mean"],
            width=0.4,
            yerr=table[f"{stage}_acc_std"].fillna(0),
            capsize=4,
            label=label,
            color=STAGE_COLORS[stage],
        )
    for i, row in table.iterrows():
        top = max(row["transfer_acc_mean"], row["scratch_acc_mean"])
        ci = "" if pd.isna(row["gain_ci_low"]) else f" [{row['gain_ci_low']:+.1f}, {row['gain_ci_high']:+.1f}]"
        bars.annotate(
            f"{row['gain_mean']:+.1f}{ci}\nn={int(row['seeds'])}: {row['verdict']}",
            (x[i], top),
            xytext=(0, 8),
            textcoords="offset points",
            ha="center",
            fontsize=8,
        )
    bars.set_xticks(x, table["task"])
    bars.set_ylabel("downstream test accuracy (%)")
    bars.set_ylim(0, 115)
    bars.set_title("final accuracy, mean ± std (paired gain [95% t])", fontsize=9)
    bars.legend(loc="upper right", fontsize=8)

    markers = (
        {task: TASK_MARKERS[i % len(TASK_MARKERS)] for i, task in enumerate(sorted(curves["task"].unique()))}
        if not curves.empty
        else {}
    )
    for (task, stage), group in curves.groupby(["task", "stage"], sort=True):
        by_epoch = group.groupby("epoch")["acc"]
        mean = by_epoch.mean()
        lines.plot(
            mean.index,
            100 * mean.values,
            marker=markers[task],
            markersize=3,
            linestyle="-" if stage == "transfer" else "--",
            color=STAGE_COLORS[stage],
            label=f"{TASK_LABELS.get(task, task)}: {stage}",
        )
        band = by_epoch.apply(lambda acc: paired_ci(acc)).apply(pd.Series)
        if len(band) and band.notna().all().all():
            lines.fill_between(band.index, 100 * band[0], 100 * band[1], color=STAGE_COLORS[stage], alpha=0.15)
    lines.set_xlabel("fine-tuning epoch")
    lines.set_ylabel("downstream test accuracy (%)")
    lines.set_title("test accuracy during fine-tuning (95% t bands)", fontsize=9)
    lines.grid(alpha=0.3)
    if not curves.empty:
        lines.legend(fontsize=8)
    figure.suptitle(f"{experiment}: ViT layer transfer vs scratch")

    paths = [out_dir / f"{experiment}.png", out_dir / f"{experiment}.pdf"]
    for path in paths:
        figure.savefig(path, dpi=130)
    return [*paths, *write_table(table, out_dir, experiment)]

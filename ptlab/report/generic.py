"""The fallback report: accuracy of every stage per configuration, averaged over seeds."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ptlab.report.runs import RUN_ENVIRONMENT_PARAMS, seed_stats, swept_params  # noqa: F401 - re-exported

STAGE_METRICS = ["metrics.upstream_test_acc", "metrics.transfer_test_acc", "metrics.scratch_test_acc",
                 "metrics.transfer_gain"]


def write_table(table: pd.DataFrame, out_dir: Path, stem: str) -> list[Path]:
    """``stem.csv`` and ``stem.md`` of ``table``."""
    csv, md = out_dir / f"{stem}.csv", out_dir / f"{stem}.md"
    table.to_csv(csv, index=False)
    md.write_text(table.to_markdown(index=False, floatfmt=".4f") + "\n")
    return [csv, md]


def render_generic(runs: pd.DataFrame, experiment: str, out_dir: Path) -> list[Path]:
    """A table of mean/std/count test accuracies for each combination of swept params."""
    metrics = [m for m in STAGE_METRICS if m in runs.columns]
    by = swept_params(runs)
    if not by:
        runs = runs.assign(**{"params.experiment": experiment})
        by = ["params.experiment"]
    table = seed_stats(runs, by, metrics)
    table.columns = [c.removeprefix("params.").removeprefix("metrics.") for c in table.columns]
    return write_table(table, out_dir, experiment)

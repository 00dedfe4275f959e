"""The fallback report: accuracy of every stage per configuration, averaged over seeds."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ptlab.report.runs import seed_stats

STAGE_METRICS = ["metrics.upstream_test_acc", "metrics.transfer_test_acc", "metrics.scratch_test_acc",
                 "metrics.transfer_gain"]


RUN_ENVIRONMENT_PARAMS = ("params.theory.", "params.logger.", "params.cache.", "params.resume.",
                          "params.devices.", "params.trainer.")


def swept_params(runs: pd.DataFrame) -> list[str]:
    """The ``params.*`` columns that differ between runs: the experiment's own knobs, without the seed,
    the theory's outputs and where or how runs were executed (logger, cache, resume, devices)."""
    columns = [c for c in runs.columns if c.startswith("params.") and c != "params.seed"
               and not c.startswith(RUN_ENVIRONMENT_PARAMS)]
    return [c for c in columns if runs[c].astype(str).nunique() > 1]


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

"""Cost of the random-design calibration sweep (``experiment=calibration``, docs/theory.md): cells, CPU
and wall seconds, and what a planned design would cost.

Draws a design with ``python -m ptlab.report design`` (``--seed``, ``--cells``, ``--seeds``; the box of
``conf/design/calibration.yaml``), runs it as one batched gram sweep in a fresh subprocess into a store in
a temporary directory, and prints the machine (CPUs, load average at start and end, date), the sweep's
wall and CPU seconds (its own and its children's ``getrusage``), per cell and per pipeline, and the cost
extrapolated to ``--plan`` cells at the same mean (the cost of a cell grows with N1, which the design
draws log-uniformly, so a few cells give a rough mean: say how many were measured).

Run from the repo root: ``python benchmarks/bench_calibration.py [--cells 6] [--seeds 16] [--seed 99]
[--plan 400]``. Everything it writes goes to a temporary directory.
"""

from __future__ import annotations

import argparse
import datetime
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cells", type=int, default=6)
    parser.add_argument("--seeds", type=int, default=16)
    parser.add_argument("--seed", type=int, default=99, help="design seed (default: %(default)s)")
    parser.add_argument("--plan", type=int, default=400, help="cells to extrapolate to (default: %(default)s)")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    print(f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        design = Path(tmp) / "design.yaml"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "ptlab.report",
                "design",
                "--seed",
                str(args.seed),
                "--cells",
                str(args.cells),
                "--seeds",
                str(args.seeds),
                "--out",
                str(design),
            ],
            cwd=REPO,
            env=env,
            check=True,
            capture_output=True,
        )
        n1 = [
            int(o.split("=")[1]) for cell in yaml.safe_load(design.read_text())["cells"] for o in cell if o.startswith("task.n1=")
        ]
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "ptlab",
                "-m",
                "experiment=calibration",
                f"hydra.sweeper.cells={design}",
                f"logger.tracking_uri=sqlite:///{tmp}/mlflow.db",
                f"hydra.sweep.dir={tmp}/sweep",
                f"cache.dir={tmp}/cache",
            ],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        wall = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        print(done.stderr[-2000:])
        return 1
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    pipelines = args.cells * args.seeds
    print(
        f"design seed {args.seed}: {args.cells} cells x {args.seeds} seeds = {pipelines} pipelines, "
        f"N1 {min(n1)}-{max(n1)} (mean {sum(n1) / len(n1):.0f}; the box's log-uniform mean is 317)"
    )
    print(
        f"sweep: {wall:.1f} s wall, {cpu:.1f} s CPU; per cell {wall / args.cells:.1f} s wall, "
        f"{cpu / args.cells:.1f} s CPU; per pipeline {cpu / pipelines:.2f} s CPU"
    )
    print(
        f"plan: {args.plan} cells x {args.seeds} seeds ~ {cpu / args.cells * args.plan / 3600:.2f} CPU hours "
        f"at this mean, load {os.getloadavg()[0]:.1f} at the end"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

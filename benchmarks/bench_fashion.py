"""CPU time of the Fashion-MNIST presets: one pipeline per cell kind, timed in this process.

For each preset (``table1_fashion``, ``fig3_fashion``, ``fig4_fashion``) the script composes the
preset's config with the overrides of a few representative cells, runs each pipeline through
``run_pipeline`` (the real data, models, Lightning and an MLflow SQLite store under a temporary
folder, the upstream cache in a fresh folder there: Figure 3's cells share one upstream per seed as in
the sweep), and reports the process CPU time and the wall time per pipeline. The preset's cost is the
sum over its cells for one seed times the number of seeds. Python start-up and imports are not included
(they are paid once per sweep).

``--scratch`` prints the scratch test accuracy of each pipeline (the pilot that fixes N2: scratch,
never the gain, is looked at). Run from the repo root with one thread:
``OMP_NUM_THREADS=1 python benchmarks/bench_fashion.py [--presets table1_fashion ...] [--seed 100]
[--scratch] [override ...]``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from ptlab.cli import compose_config
from ptlab.pipeline import run_pipeline

SEEDS = 20
CELLS = {
    "table1_fashion": [
        [f"+pair={pair}", f"task.n1_ratio={ratio}"]
        for pair in ("resnet34_small_resnet18_small", "vgg16_small_vgg11_small")
        for ratio in (1, 2, 4, 8)
    ],
    "fig3_fashion": [["+pair=vgg16_small_vgg11_small", f"noise.sigma_p2={sigma}"] for sigma in (0, 40, 80, 120)],
    "fig4_fashion": [[]],
}
"""The cells of one seed of each preset (as their sweeper params say)."""


def time_pipeline(overrides: list[str], root: Path, name: str) -> tuple[float, float, dict]:
    """(CPU seconds, wall seconds, summary) of one pipeline of ``overrides``."""
    cfg = compose_config([*overrides, f"logger.tracking_uri=sqlite:///{root / 'mlflow.db'}", f"cache.dir={root / 'cache'}"])
    cpu, wall = time.process_time(), time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the pipeline's own table shows the gain: not looked at
        summary = run_pipeline(cfg, root / name)
    return time.process_time() - cpu, time.perf_counter() - wall, summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=list(CELLS))
    parser.add_argument("--seed", type=int, default=100, help="pilot seeds are >= 100, apart from the presets'")
    parser.add_argument("--scratch", action="store_true", help="print scratch test accuracy (the N2 pilot)")
    parser.add_argument("--first", type=int, default=None, help="time only the first N cells of each preset")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("ptlab").setLevel(logging.WARNING)
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average), torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for preset in args.presets:
            total = 0.0
            cells = CELLS[preset][: args.first]
            for i, cell in enumerate(cells):
                overrides = [f"experiment={preset}", f"seed={args.seed}", *cell, *args.overrides]
                cpu, wall, summary = time_pipeline(overrides, root, f"{preset}-{i}")
                total += cpu
                scratch = summary["scratch"]["test_acc"] if args.scratch else None
                print(
                    f"{preset} {' '.join(cell) or '(one cell)'}: cpu {cpu:.1f} s, wall {wall:.1f} s"
                    + ("" if scratch is None else f", scratch test acc {100 * scratch:.1f}%"),
                    flush=True,
                )
            scale = len(CELLS[preset]) / len(cells)
            print(
                f"{preset}: {total * scale:.0f} CPU s per seed ({len(CELLS[preset])} cells), "
                f"{total * scale * SEEDS / 60:.1f} CPU min for {SEEDS} seeds",
                flush=True,
            )
    sys.stdout.flush()


if __name__ == "__main__":
    main()

"""Lightning path vs gram engine, side by side on this machine.

(a) one pipeline at the default (paper) config, each engine end to end with MLflow tracking;
(b) a 10 x 10 fig2 grid x 2 seeds: Lightning per cell measured on a sample of cells and extrapolated
    (printed as such), against the batched gram launcher on the whole grid through the CLI;
(c) cost per cell against d (500 ... 50000) for both engines: Lightning timed on 1/10 of the steps and
    scaled by 10 (printed as such), gram batched at 20 cells per d;
(d) the full ``experiment=fig2`` grid (20 x 20 x 3, paper settings) through the CLI, with MLflow
    (``--no-full`` skips it).

Run from the repo root: ``python benchmarks/bench_gram.py [--sample 2]``. Everything it writes goes to
a temporary directory; the machine's load average is printed beside every timing.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from ptlab.cli import CONFIG_DIR, quiet_lightning
from ptlab.engines.gram import GramCell, run_cells
from ptlab.pipeline import run_pipeline

GRID_D = [500 + 1000 * i for i in range(10)]
GRID_U = [0.4 * i for i in range(10)]
SEEDS = [0, 1]


def config(overrides: list[str], tracking_uri: str) -> DictConfig:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"logger.tracking_uri={tracking_uri}", "cache.enabled=false", *overrides],
                      return_hydra_config=True)
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def timed_pipeline(overrides: list[str], out: Path) -> float:
    cfg = config(overrides, f"sqlite:///{out / 'mlflow.db'}")
    start = time.perf_counter()
    run_pipeline(cfg, out / "job")
    return time.perf_counter() - start


def load() -> str:
    return "load %.1f" % os.getloadavg()[0]


def cli(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ptlab", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sample", type=int, default=2, help="Lightning cells measured for (b)")
    parser.add_argument("--no-full", dest="full", action="store_false", help="skip the full experiment=fig2 grid")
    parser.add_argument("--workers", type=int, default=None, help="gram worker processes (default: torch threads)")
    args = parser.parse_args()
    quiet_lightning()
    root = Path(tempfile.mkdtemp(prefix="bench_gram_"))
    print(f"outputs under {root}")

    print("\n(a) one pipeline, default config (d=2000, m=40, N1=200, N2=20, T1=800, T2=400), with MLflow")
    lightning = timed_pipeline(["engine=lightning"], root / "a_lightning")
    gram = timed_pipeline(["engine=gram"], root / "a_gram")
    print(f"    lightning {lightning:8.2f} s   gram {gram:6.2f} s   ratio {lightning / gram:6.1f}x   ({load()})")
    lightning = timed_pipeline(["engine=lightning", "logger=none"], root / "a_lightning_untracked")
    gram = timed_pipeline(["engine=gram", "logger=none"], root / "a_gram_untracked")
    print(f"    without tracking (logger=none, same data and models): lightning {lightning:8.2f} s   gram {gram:6.2f} s"
          f"   ratio {lightning / gram:6.1f}x   ({load()})")

    print("\n(b) 10 x 10 fig2 grid x 2 seeds = 200 cells (paper settings)")
    cells = [(d, u, s) for d in GRID_D for u in GRID_U for s in SEEDS]
    sample = random.Random(0).sample(cells, args.sample)
    per_cell = []
    for d, u, s in sample:
        seconds = timed_pipeline(["experiment=fig2", "engine=lightning", f"task.d={d}", f"task.u_norm={u:.1f}",
                                  f"seed={s}"], root / f"b_lightning_{d}_{u:.1f}_{s}")
        per_cell.append(seconds)
        print(f"    lightning cell d={d} u={u:.1f} seed={s}: {seconds:.2f} s   ({load()})")
    estimate = sum(per_cell) / len(per_cell) * len(cells)
    grid = ["-m", "experiment=fig2", f"task.d={','.join(map(str, GRID_D))}",
            f"task.u_norm={','.join(f'{u:.1f}' for u in GRID_U)}", f"seed={','.join(map(str, SEEDS))}",
            "logger.tracking_uri=sqlite:///mlflow.db", "hydra.launcher.progress=false"]
    (root / "b_gram").mkdir()
    batched = cli(grid, root / "b_gram")
    print(f"    lightning EXTRAPOLATED from {len(sample)} sampled cells: {estimate:8.1f} s "
          f"({estimate / len(cells):.2f} s/cell)")
    print(f"    gram batched launcher, whole grid, CLI incl. MLflow: {batched:8.1f} s  ratio {estimate / batched:6.1f}x"
          f"   ({load()})")

    print("\n(c) cost per cell against d (paper settings otherwise, no tracking)")
    print(f"    {'d':>6} {'lightning s/cell (1/10 steps x10)':>34} {'gram s/cell (20 batched)':>25} {'gram single':>12}")
    workers = torch.get_num_threads() if args.workers is None else args.workers
    for d in (500, 2000, 5000, 10000, 20000, 50000):
        light = 10 * timed_pipeline(["logger=none", "engine=lightning", f"task.d={d}", "train.upstream_steps=80",
                                     "train.downstream_steps=40"], root / f"c_l_{d}")
        cfgs = [config(["logger=none", "engine=gram", f"task.d={d}", f"task.u_norm={0.2 * i:.1f}"], "")
                for i in range(20)]
        start = time.perf_counter()
        run_cells([GramCell.from_config(cfg) for cfg in cfgs], max_cells=10, workers=workers)
        batched_cell = (time.perf_counter() - start) / len(cfgs)
        start = time.perf_counter()
        run_cells([GramCell.from_config(cfgs[0])])
        single = time.perf_counter() - start
        print(f"    {d:>6} {light:>34.2f} {batched_cell:>25.3f} {single:>12.3f}   ({load()})")

    if args.full:
        print("\n(d) full experiment=fig2 grid (20 x 20 x 3 = 1200 cells, paper settings), CLI incl. MLflow")
        (root / "d_full").mkdir()
        seconds = cli(["-m", "experiment=fig2", "logger.tracking_uri=sqlite:///mlflow.db",
                       "hydra.launcher.progress=false"], root / "d_full")
        print(f"    {seconds:.1f} s   ({load()})")


if __name__ == "__main__":
    main()

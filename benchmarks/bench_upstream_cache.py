"""An alpha sweep with and without the upstream cache, on this machine.

Runs the same sweep (default: 4 alphas at the default, paper-sized synthetic config) one cell after
another in-process, with MLflow tracking to a temporary SQLite store: once with ``cache.enabled=false``
(every cell trains its upstream) and once with an empty cache (the first cell trains it, the others
load it). Each sweep runs ``--repeats`` times, in alternating order, on a fresh store and cache; the
best time of each is kept. Prints both wall times and the speed-up, and checks that both sweeps gave
the same numbers.

    python benchmarks/bench_upstream_cache.py [--alphas 0.25,0.5,0.75,1.0] [--repeats 2] [overrides...]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from ptlab.cli import compose_config, quiet_lightning
from ptlab.pipeline import run_pipeline


def sweep(alphas: list[str], overrides: list[str], workdir: Path, cache: bool) -> tuple[float, list[dict]]:
    """Seconds for the whole sweep, and each cell's per-stage numbers."""
    tag = "cached" if cache else "uncached"
    common = [
        f"logger.tracking_uri=sqlite:///{workdir / 'mlflow.db'}",
        f"logger.experiment_name={tag}",
        f"cache.dir={workdir / 'cache'}",
        f"cache.enabled={str(cache).lower()}",
        *overrides,
    ]
    start = time.perf_counter()
    numbers, cells = [], []
    for alpha in alphas:
        cell_start = time.perf_counter()
        summary = run_pipeline(compose_config([*common, f"transfer.alpha={alpha}"]), workdir / tag / alpha)
        cells.append(time.perf_counter() - cell_start)
        numbers.append({stage: summary[stage]["test_acc"] for stage in ("upstream", "transfer", "scratch")})
    print(f"{tag} cells (s): " + " ".join(f"{seconds:.1f}" for seconds in cells))
    return time.perf_counter() - start, numbers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--alphas", default="0.25,0.5,0.75,1.0")
    parser.add_argument("--repeats", type=int, default=2, help="sweep pairs, in alternating order; best kept")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: robust on a shared machine)")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides for every cell")
    args = parser.parse_args()
    alphas = args.alphas.split(",")
    quiet_lightning()
    torch.set_num_threads(args.threads)
    times: dict[bool, list[float]] = {True: [], False: []}
    results: dict[bool, list[dict]] = {}
    for repeat in range(args.repeats):
        for cache in (True, False) if repeat % 2 == 0 else (False, True):
            with tempfile.TemporaryDirectory() as tmp:
                seconds, results[cache] = sweep(alphas, args.overrides, Path(tmp), cache)
            times[cache].append(seconds)
    cached, uncached, reused, plain = min(times[True]), min(times[False]), results[True], results[False]
    assert plain == reused, "the cached sweep gave different numbers"
    print(f"alpha sweep of {len(alphas)} cells ({' '.join(args.overrides) or 'default config'}):")
    print(f"  without cache: {uncached:7.1f} s  ({len(alphas)} upstream trainings)")
    print(f"  with cache:    {cached:7.1f} s  (1 upstream training, {len(alphas) - 1} loads)")
    print(f"  speed-up: {uncached / cached:.2f}x; identical test accuracies in every cell")


if __name__ == "__main__":
    main()

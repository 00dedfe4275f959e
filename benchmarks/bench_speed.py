"""ptlab against a plain PyTorch loop, and the sweeps against the machine's matmul peak, in one run.

Parts (``--parts``, comma-separated; default all):

    single   ``python -m ptlab`` (the default config, gram engine, MLflow into a NEW SQLite store: each run in a
             fresh empty folder, so its ``mlflow.db`` is new) against ``python benchmarks/plain_loop.py`` (the same
             pipeline as a plain PyTorch script: autograd GD, same seeds), whole processes, each started fresh,
             alternating for ``--rounds`` rounds (the order swapped every round); prints every round, the medians,
             the median of the per-round ratios (bar: plain / ptlab >= 1.5) and checks that both give the same
             final accuracies. The store template is built (and timed) by one run before the rounds.
    costs    the fixed costs of one default run, each in a fresh process: what ``python -X importtime -m ptlab``
             imports (seconds and which heavy packages load), a new store from the template vs MLflow's
             migrations, and drawing ``decomposition.png`` (``logger.figures=true``).
    batch    40 fig2 cells (d = 500..2000 x 10 values of ||u||, seed 0, the preset's settings, d-space data): the
             plain loop cell after cell against the gram engine's batched ``run_cells``, in this process; checks
             equal final test accuracies.
    fig2     the float32 matmul peak (n = 2048, on this process's torch threads, best of 5, measured before and after
             the sweep), the whole ``-m experiment=fig2`` sweep through the CLI with MLflow (2000 cells) and its
             training alone (``iter_chunks`` over the same cells, for the sweep's ``history=last``): FLOPs / seconds /
             peak (bars: 50% and 60%); each against the peak measured just before and after it.
    fig2_training  the training alone of ``fig2``, without the sweep.
    kou2023  ``-m experiment=kou2023`` (100,000 trainings) with MLflow, then ``ptlab.report kou2023`` (bar: < 60 s), with
             the CPU seconds of each (its processes, workers included).

Run from the repo root, at the lowest load you can find (nothing is niced: the ratios are of wall times):
``python benchmarks/bench_speed.py [--parts single,costs] [--rounds 5]``. Everything it writes goes to a
temporary folder; the load average is printed beside every timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PARTS = ("single", "costs", "batch", "fig2", "fig2_training", "kou2023")
HEAVY = (
    "mlflow.genai",
    "mlflow.gateway",
    "mlflow.tracing",
    "torchmetrics",
    "torchmetrics.image",
    "lightning",
    "pytorch_lightning",
    "matplotlib",
    "pandas",
    "alembic",
    "torchvision",
    "timm",
    "scipy",
)
"""Packages whose import the costs part reports (present or not in the default run)."""


def load() -> str:
    return "load " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


THREADS: list[int | None] = [None]
"""``--threads``: OMP_NUM_THREADS of every timed process (None: torch's default, one per core)."""


def env(templates: Path) -> dict[str, str]:
    threads = {"OMP_NUM_THREADS": str(THREADS[0])} if THREADS[0] else {}
    return {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0", "PTLAB_STORE_TEMPLATES": str(templates), **threads}


def children_cpu() -> float:
    """CPU seconds (user + system) of this process's ended children so far (a sweep's workers included)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


LAST_CPU: list[float] = [0.0]
"""CPU seconds of the process tree of the last ``timed`` command."""


def timed(cmd: list[str], cwd: Path, environ: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    cwd.mkdir(parents=True, exist_ok=True)
    start, cpu = time.perf_counter(), children_cpu()
    done = subprocess.run(cmd, cwd=cwd, env=environ, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    LAST_CPU[0] = children_cpu() - cpu
    if done.returncode:
        raise SystemExit(f"{' '.join(cmd)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    return seconds, done


def ptlab_final(cwd: Path) -> dict[str, dict[str, float]]:
    summary = json.loads(next(cwd.glob("outputs/*/*/summary.json")).read_text())
    return {stage: summary[stage] for stage in ("upstream", "transfer", "scratch")}


def close(a: float, b: float) -> bool:
    """Equal accuracies (multiples of 1/n; the summary rounds to 7 digits, float32 counts differ below 1e-7)."""
    return abs(a - b) < 1e-6


def same_accuracies(ptlab: dict[str, dict[str, float]], plain: dict[str, dict[str, float]]) -> bool:
    return all(
        close(ptlab[s]["train_acc"], plain[s]["train_acc"]) and close(ptlab[s]["test_acc"], plain[s]["test_acc"]) for s in ptlab
    )


def part_single(root: Path, rounds: int, before: str | None) -> None:
    print(
        f"\n(single) python -m ptlab (default config, new SQLite store) vs benchmarks/plain_loop.py, {rounds} rounds,"
        " alternating (the order rotated each round), whole processes"
        + (f"; also this repository's commit {before} (git archive)" if before else "")
    )
    templates = root / "templates"
    environ = env(templates)
    commands = {
        "ptlab": ([sys.executable, "-m", "ptlab"], environ),
        "plain": ([sys.executable, str(REPO / "benchmarks" / "plain_loop.py")], environ),
    }
    if before:
        tree = root / "before"
        tree.mkdir()
        archive = subprocess.run(["git", "archive", before], cwd=REPO, capture_output=True, check=True).stdout
        subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
        commands["before"] = ([sys.executable, "-m", "ptlab"], {**environ, "PYTHONPATH": str(tree)})
    cold, _ = timed(commands["ptlab"][0], root / "single" / "cold", environ)
    print(f"    first run, building the store template: {cold:.2f} s   ({load()})")
    names = list(commands)
    rows, ratios = [], []
    for k in range(rounds):
        seconds, finals = {}, {}
        for name in names[k % len(names) :] + names[: k % len(names)]:
            cwd = root / "single" / f"{name}{k}"
            seconds[name], done = timed(*commands[name][:1], cwd, commands[name][1])
            finals[name] = json.loads(done.stdout.strip().splitlines()[-1]) if name == "plain" else ptlab_final(cwd)
        equal = same_accuracies(finals["ptlab"], finals["plain"])
        ratios.append(seconds["plain"] / seconds["ptlab"])
        rows.append(seconds)
        print(
            f"    round {k + 1}: "
            + ", ".join(f"{name} {seconds[name]:.2f} s" for name in names)
            + f"; plain / ptlab {ratios[-1]:.2f}x, equal final accuracies: {equal}   ({load()})"
        )
        if not equal:
            print(f"      ptlab {finals['ptlab']}\n      plain {finals['plain']}")
    medians = {name: statistics.median(r[name] for r in rows) for name in names}
    ratio = statistics.median(ratios)
    print(
        "    medians: "
        + ", ".join(f"{name} {medians[name]:.2f} s" for name in names)
        + f"; median of the per-round ratios plain / ptlab {ratio:.2f}x (bar: >= 1.5x: "
        f"{'met' if ratio >= 1.5 else 'NOT met'})"
    )


IMPORT_PROBE = """
import sys, time
start = time.perf_counter()
import ptlab.cli
cli = time.perf_counter()
import torch
after_torch = time.perf_counter()
import mlflow.tracking
after_mlflow = time.perf_counter()
import ptlab.pipeline.run, ptlab.pipeline.synthetic, ptlab.tracking.mlflow
end = time.perf_counter()
print(f"{cli - start:.3f} {after_torch - cli:.3f} {after_mlflow - after_torch:.3f} {end - after_mlflow:.3f}")
"""

STORE_PROBE = """
import sys, time
import mlflow.tracking
from ptlab.tracking.faults import prepare_sqlite_store
start = time.perf_counter()
prepare_sqlite_store("sqlite:///" + sys.argv[1])
print(f"{time.perf_counter() - start:.3f}")
"""

COMPOSE_PROBE = """
import time
from ptlab.cli import _compose
times = []
for _ in range(4):
    start = time.perf_counter()
    _compose([])
    times.append(time.perf_counter() - start)
print(" ".join(f"{t:.3f}" for t in times))
"""

FIGURE_PROBE = """
import sys, tempfile, time
from pathlib import Path
from ptlab.cli import compose_spec, quiet_lightning
from ptlab.pipeline.run import figure_title, make_engine
from ptlab.pipeline.synthetic import run_synthetic
from ptlab.tracking import NullTracker
cfg = compose_spec(["logger=none", "cache.enabled=false"])
stages, _ = run_synthetic(cfg, make_engine(cfg), NullTracker())
start = time.perf_counter()
from ptlab.modules.decomposition import decomposition_figure
figure = decomposition_figure({name: result.curves for name, result in stages.items()}, figure_title(cfg))
with tempfile.TemporaryDirectory() as tmp:
    figure.savefig(Path(tmp) / "decomposition.png", dpi=110)
print(f"{time.perf_counter() - start:.3f}")
"""


def part_costs(root: Path) -> None:
    print("\n(costs) fixed costs of one default run, each in a fresh process")
    templates = root / "templates"
    environ = env(templates)
    cwd = root / "costs"
    _, done = timed([sys.executable, "-X", "importtime", "-m", "ptlab"], cwd / "importtime", environ)
    lines = [line.split("|") for line in done.stderr.splitlines() if line.startswith("import time:")]
    top = [
        (int(cum), name)
        for _, cum, name in (parts for parts in lines if len(parts) == 3)
        if not name.startswith("  ") and cum.strip().isdigit()
    ]
    total = sum(cum for cum, _ in top) / 1e6
    loaded = {name.strip() for *_, name in lines}
    print(
        f"    python -X importtime -m ptlab: {total:.2f} s of imports (with importtime's own overhead); largest: "
        + ", ".join(f"{name.strip()} {cum / 1e6:.2f} s" for cum, name in sorted(top, reverse=True)[:5])
    )
    print("    heavy packages imported: " + ", ".join(f"{p} {'yes' if p in loaded else 'no'}" for p in HEAVY))
    for k in range(3):
        out = subprocess.run(
            [sys.executable, "-c", IMPORT_PROBE], env=environ, capture_output=True, text=True, check=True
        ).stdout.split()
        print(
            f"    imports (run {k + 1}): ptlab.cli (Hydra, OmegaConf) {out[0]} s, torch {out[1]} s, mlflow.tracking "
            f"{out[2]} s, the pipeline's modules {out[3]} s   ({load()})"
        )
    for k in range(3):
        store = {}
        for name, templates_env in (("template", str(templates)), ("migrations", "off")):
            path = cwd / f"store{k}-{name}.db"
            store[name] = subprocess.run(
                [sys.executable, "-c", STORE_PROBE, str(path)],
                capture_output=True,
                text=True,
                check=True,
                env={**environ, "PTLAB_STORE_TEMPLATES": templates_env},
            ).stdout
        print(
            f"    new SQLite store (run {k + 1}): from the template {float(store['template']):.3f} s, by MLflow's "
            f"migrations {float(store['migrations']):.3f} s   ({load()})"
        )
    composes = subprocess.run(
        [sys.executable, "-c", COMPOSE_PROBE], env=environ, capture_output=True, text=True, check=True
    ).stdout.split()
    print(
        f"    Hydra compositions of the default config in one process: {', '.join(composes)} s (a run composed 4 "
        f"before this change: the preflight twice, @hydra.main twice; now once)   ({load()})"
    )
    figure = [
        float(
            subprocess.run([sys.executable, "-c", FIGURE_PROBE], env=environ, capture_output=True, text=True, check=True).stdout
        )
        for _ in range(2)
    ]
    print(f"    decomposition.png (matplotlib import, drawing, savefig): {figure[0]:.2f} s, {figure[1]:.2f} s   ({load()})")


def part_batch() -> None:
    import plain_loop
    import torch
    from bench_gram import config

    from ptlab.engines.gram import GramCell, run_cells

    print(
        "\n(batch) 40 fig2 cells (d = 500, 1000, 1500, 2000 x ||u|| = 0.0, 0.4, ..., 3.6, seed 0, T1 = 800, T2 = 400,"
        " eval every 100): plain loop cell after cell vs gram run_cells, in this process "
        f"({torch.get_num_threads()} threads)"
    )
    base = GramCell.from_spec(config(["logger=none", "experiment=fig2"], ""))
    grid = [(d, round(0.4 * i, 1)) for d in (500, 1000, 1500, 2000) for i in range(10)]
    cells = [dataclasses.replace(base, d=d, u_norm=u, seed=0) for d, u in grid]
    corner = GramCell.from_spec(config(["logger=none", "experiment=fig2", "task.d=2000", "task.u_norm=3.6"], ""))
    assert corner == cells[-1], (corner, cells[-1])
    run_cells(cells[:1])
    start = time.perf_counter()
    gram = run_cells(cells)
    gram_seconds = time.perf_counter() - start
    print(f"    gram: {gram_seconds:.2f} s   ({load()})")
    start = time.perf_counter()
    plain = [plain_loop.pipeline(plain_loop.Settings(seed=0, d=d, u_norm=u, eval_every=100)) for d, u in grid]
    plain_seconds = time.perf_counter() - start
    print(f"    plain loop: {plain_seconds:.2f} s   ({load()})")
    equal = sum(
        all(close(result.stages[s].final["test_acc"], p[s]["test_acc"]) for s in ("upstream", "transfer", "scratch"))
        for result, p in zip(gram, plain)
    )
    print(f"    ratio {plain_seconds / gram_seconds:.1f}x; cells with equal final test accuracies: {equal} of {len(cells)}")


def fig2_cells() -> list:
    """fig2's 2000 cells as the sweep trains them."""
    from bench_gram import config

    from ptlab.engines.gram import GramCell

    base = GramCell.from_spec(config(["logger=none", "experiment=fig2"], ""))
    return [
        dataclasses.replace(base, d=d, u_norm=round(0.2 * i, 1), seed=s)
        for d in range(500, 10500, 500)
        for i in range(20)
        for s in range(5)
    ]


def peak_around(label: str, measure: Callable[[], float]) -> tuple[float, float]:
    """``measure()``'s seconds and the float32 matmul peak on torch's threads, the best of one before and one after."""
    import torch
    from bench_gram import matmul_peak

    threads = torch.get_num_threads()
    before = matmul_peak(threads)["float32"]
    print(f"    {label}: peak before {before:.1f} GFLOP/s   ({load()})")
    seconds = measure()
    after = matmul_peak(threads)["float32"]
    peak = max(before, after)
    print(f"    {label}: peak after {after:.1f} GFLOP/s; the peak used: {peak:.1f}   ({load()})")
    return seconds, peak


def part_fig2(root: Path) -> None:
    import torch
    from bench_gram import training_flops

    threads = torch.get_num_threads()
    print(
        f"\n(fig2) the whole -m experiment=fig2 sweep (20 x 20 x 5 = 2000 cells) with MLflow, against the float32 "
        f"matmul peak on {threads} threads (n = 2048, best of 5)"
    )
    found: list[str] = []

    def sweep() -> float:
        seconds, done = timed(
            [sys.executable, "-m", "ptlab", "-m", "experiment=fig2", "hydra.launcher.progress=false"],
            root / "fig2",
            env(root / "templates"),
        )
        found.extend(line for line in (done.stdout + done.stderr).splitlines() if "ptlab gram" in line)
        return seconds

    seconds, peak = peak_around("sweep", sweep)
    flops = sum(training_flops(cell) for cell in fig2_cells())
    print(
        f"    sweep: {seconds:.1f} s for {flops / 1e12:.2f} TFLOP = {flops / seconds / 1e9:.1f} GFLOP/s = "
        f"{flops / seconds / 1e9 / peak:.1%} of the peak (bar: >= 50%)   ({load()})"
    )
    if found:
        print(f"    launcher: {found[-1].split('] ', 1)[-1]}")
    part_fig2_training()


def part_fig2_training() -> None:
    """fig2's cells trained alone (``iter_chunks`` as the sweep runs them, ``history=last``), against the peak."""
    import torch
    from bench_gram import final_test_acc, training_flops

    from ptlab.engines.gram import iter_chunks

    threads = torch.get_num_threads()
    cells = fig2_cells()
    flops = sum(training_flops(cell) for cell in cells)

    def training() -> float:
        start = time.perf_counter()
        for _ in iter_chunks(cells, max_cells=60, workers=threads, summarize=final_test_acc, history="last"):
            pass
        return time.perf_counter() - start

    seconds, peak = peak_around("training", training)
    print(
        f"    training alone ({threads} worker processes): {seconds:.1f} s = {flops / seconds / 1e9:.1f} GFLOP/s = "
        f"{flops / seconds / 1e9 / peak:.1%} of the peak (bar: >= 60%); at 100% of the peak the FLOPs take "
        f"{flops / peak / 1e9:.1f} s   ({load()})"
    )


def part_kou2023(root: Path) -> None:
    print("\n(kou2023) -m experiment=kou2023 (100 x 100 x 10 = 100,000 trainings) with MLflow, then its report")
    cwd = root / "kou2023"
    environ = env(root / "templates")
    sweep, done = timed(
        [sys.executable, "-m", "ptlab", "-m", "experiment=kou2023", "hydra.launcher.progress=false"], cwd, environ
    )
    sweep_cpu = LAST_CPU[0]
    report, _ = timed([sys.executable, "-m", "ptlab.report", "kou2023", "--tracking-uri", "sqlite:///mlflow.db"], cwd, environ)
    report_cpu = LAST_CPU[0]
    found = re.findall(r"ptlab gram.*", done.stdout + done.stderr)
    total = sweep + report
    print(
        f"    sweep {sweep:.1f} s, report {report:.1f} s: {total:.1f} s (bar: < 60 s: "
        f"{'met' if total < 60 else 'NOT met'}); CPU seconds (user + system, workers included): sweep {sweep_cpu:.1f}, "
        f"report {report_cpu:.1f}   ({load()})"
    )
    if found:
        print(f"    launcher: {found[-1]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated, of: " + ", ".join(PARTS))
    parser.add_argument("--rounds", type=int, default=5, help="alternating rounds of the single part")
    parser.add_argument("--before", default=None, help="a commit whose default run joins the single part's rounds")
    parser.add_argument(
        "--threads", type=int, default=None, help="OMP_NUM_THREADS of the timed processes (default: unset, one thread per core)"
    )
    args = parser.parse_args()
    THREADS[0] = args.threads
    sys.stdout.reconfigure(line_buffering=True)  # each line out as soon as it is measured (parts are long)
    sys.path[:0] = [str(REPO), str(REPO / "benchmarks")]  # the in-process parts use this tree's ptlab
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown {', '.join(unknown)}; choose from {', '.join(PARTS)}")
    root = Path(tempfile.mkdtemp(prefix="bench_speed_"))
    print(
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, threads "
        f"{args.threads or 'default'}, {load()}; outputs under {root}"
    )
    if "single" in parts:
        part_single(root, args.rounds, args.before)
    if "costs" in parts:
        part_costs(root)
    if "batch" in parts:
        part_batch()
    if "fig2" in parts:
        part_fig2(root)
    elif "fig2_training" in parts:
        part_fig2_training()
    if "kou2023" in parts:
        part_kou2023(root)
    print(f"\ndone, {load()}")


if __name__ == "__main__":
    main()

"""Lightning path vs gram engine, side by side on this machine.

(a) one pipeline at the default (paper) config: the stages alone (data drawn beforehand, no tracking),
    the whole pipeline without tracking, and the whole pipeline with MLflow (an existing SQLite store);
(b) a 10 x 10 fig2 grid x 2 seeds: Lightning per cell measured on a sample of cells and extrapolated
    (printed as such), against the batched gram launcher on the whole grid through the CLI;
(c) cost per cell against d (500 ... 50000) for both engines: Lightning timed on 1/10 of the steps and
    scaled by 10 (printed as such), gram batched at 20 cells per d;
(d) the full ``experiment=fig2`` grid (20 x 20 x 3, paper settings) through the CLI, with MLflow;
the scale bars of issue 15, in one run (the default parts):
(e) this machine's matmul peak on 2 threads (float32 and float64 GFLOP/s, best of 5 at n = 2048);
(f) cost per cell at d = 10^3 vs 10^6 with response-space test sets and gram sampling (bar: within 1.5x);
(g) the full ``experiment=kou2023`` grid (100,000 trainings) through the CLI with tracking, then its
    report with the heatmap (bar: under 120 s);
(h) the full ``fig2`` grid through the CLI with MLflow: main's commit (``--main-commit``, extracted with
    ``git archive``) against this tree with response-space test sets and gram sampling (bar: >= 3x), and
    the grid's training, timed alone in the same worker processes, against the measured peak (bar: >= 50%),
    and the speedup that training at 100% of the peak would allow.

Run from the repo root: ``python benchmarks/bench_gram.py [--parts efgh] [--sample 2]``. Everything it writes goes to
a temporary directory; the machine's load average is printed beside every timing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from unittest import mock

import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from ptlab.cli import CONFIG_DIR, quiet_lightning
from ptlab.data import SyntheticTransferData
from ptlab.engines.gram import GramCell, GramResult, iter_chunks, run_cells
from ptlab.pipeline import run_pipeline, synthetic
from ptlab.pipeline.run import make_engine
from ptlab.pipeline.synthetic import make_data
from ptlab.spec import PipelineSpec, parse
from ptlab.tracking import NullTracker

ENGINES = ("lightning", "gram")
GRID_D = [500 + 1000 * i for i in range(10)]
GRID_U = [0.4 * i for i in range(10)]
SEEDS = [0, 1]


def config(overrides: list[str], tracking_uri: str) -> PipelineSpec:
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[f"logger.tracking_uri={tracking_uri}", "cache.enabled=false", *overrides],
            return_hydra_config=True,
        )
    HydraConfig().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return parse(cfg)


def timed_pipeline(overrides: list[str], out: Path) -> float:
    """Seconds of one ``run_pipeline`` (config composition not counted); repeated calls share ``out/mlflow.db``."""
    cfg = config(overrides, f"sqlite:///{out / 'mlflow.db'}")
    with contextlib.redirect_stdout(io.StringIO()):  # the pipeline's own result table
        start = time.perf_counter()
        run_pipeline(cfg, out / "job")
        return time.perf_counter() - start


def stages_only(cfg: PipelineSpec, drawn: SyntheticTransferData) -> float:
    """Seconds of ``run_synthetic`` (models, the three stages, the transfer) on data drawn beforehand."""
    with mock.patch.object(synthetic, "make_data", lambda _: drawn):
        start = time.perf_counter()
        synthetic.run_synthetic(cfg, make_engine(cfg), NullTracker())
        return time.perf_counter() - start


def best(measure: Callable[[], object], repeats: int) -> float:
    """The fastest of ``repeats`` timed calls after an untimed warm-up call."""
    measure()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        measure()
        times.append(time.perf_counter() - start)
    return min(times)


def best_by_engine(seconds: Callable[[str], float], repeats: int) -> dict[str, float]:
    """The fastest of ``repeats`` measurements per engine after a warm-up each, the engines alternating."""
    for engine in ENGINES:
        seconds(engine)
    times: dict[str, list[float]] = {engine: [] for engine in ENGINES}
    for _ in range(repeats):
        for engine in ENGINES:
            times[engine].append(seconds(engine))
    return {engine: min(values) for engine, values in times.items()}


def report(label: str, seconds: dict[str, float]) -> None:
    print(
        f"    {label}:\n        lightning {seconds['lightning']:7.3f} s   gram {seconds['gram']:6.3f} s   "
        f"ratio {seconds['lightning'] / seconds['gram']:5.1f}x   ({load()})"
    )


def load() -> str:
    return f"load {os.getloadavg()[0]:.1f}"


def cli(args: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ptlab", *args], cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return time.perf_counter() - start


def part_a(root: Path, repeats: int) -> None:
    print(
        "\n(a) one pipeline, default config (d=2000, m=40, N1=200, N2=20, T1=800, T2=400, eval every 10),"
        f" best of {repeats} after a warm-up run, engines alternating"
    )
    cfgs = {engine: config([f"engine={engine}", "logger=none"], "") for engine in ENGINES}
    drawn = make_data(cfgs["gram"])
    data_draw = best(lambda: make_data(cfgs["gram"]), repeats)
    stages = best_by_engine(lambda engine: stages_only(cfgs[engine], drawn), repeats)
    report("stages only (run_synthetic on data drawn beforehand, no tracking)", stages)
    untracked = best_by_engine(lambda engine: timed_pipeline([f"engine={engine}", "logger=none"], root / "a_untracked"), repeats)
    report("whole pipeline without tracking (logger=none)", untracked)
    tracked = best_by_engine(lambda engine: timed_pipeline([f"engine={engine}"], root / "a_tracked"), repeats)
    report("whole pipeline with MLflow (SQLite store created by the warm-up run)", tracked)
    print(
        f"    the same code in both engines: the data draw {data_draw:.3f} s, config checks and summaries, "
        "MLflow runs, params, curves and the decomposition figure"
    )


def part_b(root: Path, sample: int) -> None:
    print("\n(b) 10 x 10 fig2 grid x 2 seeds = 200 cells (paper settings)")
    cells = [(d, u, s) for d in GRID_D for u in GRID_U for s in SEEDS]
    sampled = random.Random(0).sample(cells, sample)
    per_cell = []
    for d, u, s in sampled:
        seconds = timed_pipeline(
            ["experiment=fig2", "engine=lightning", f"task.d={d}", f"task.u_norm={u:.1f}", f"seed={s}"],
            root / f"b_lightning_{d}_{u:.1f}_{s}",
        )
        per_cell.append(seconds)
        print(f"    lightning cell d={d} u={u:.1f} seed={s}: {seconds:.2f} s   ({load()})")
    estimate = sum(per_cell) / len(per_cell) * len(cells)
    grid = [
        "-m",
        "experiment=fig2",
        f"task.d={','.join(map(str, GRID_D))}",
        f"task.u_norm={','.join(f'{u:.1f}' for u in GRID_U)}",
        f"seed={','.join(map(str, SEEDS))}",
        "logger.tracking_uri=sqlite:///mlflow.db",
        "hydra.launcher.progress=false",
    ]
    (root / "b_gram").mkdir()
    batched = cli(grid, root / "b_gram")
    print(f"    lightning EXTRAPOLATED from {len(sampled)} sampled cells: {estimate:8.1f} s ({estimate / len(cells):.2f} s/cell)")
    print(
        f"    gram batched launcher, whole grid, CLI incl. MLflow: {batched:8.1f} s  ratio {estimate / batched:6.1f}x"
        f"   ({load()})"
    )


def part_c(root: Path, workers: int | None) -> None:
    print("\n(c) cost per cell against d (paper settings otherwise, no tracking)")
    print(f"    {'d':>6} {'lightning s/cell (1/10 steps x10)':>34} {'gram s/cell (20 batched)':>25} {'gram single':>12}")
    workers = torch.get_num_threads() if workers is None else workers
    for d in (500, 2000, 5000, 10000, 20000, 50000):
        light = 10 * timed_pipeline(
            ["logger=none", "engine=lightning", f"task.d={d}", "train.upstream_steps=80", "train.downstream_steps=40"],
            root / f"c_l_{d}",
        )
        cfgs = [config(["logger=none", "engine=gram", f"task.d={d}", f"task.u_norm={0.2 * i:.1f}"], "") for i in range(20)]
        start = time.perf_counter()
        run_cells([GramCell.from_spec(cfg) for cfg in cfgs], max_cells=10, workers=workers)
        batched_cell = (time.perf_counter() - start) / len(cfgs)
        start = time.perf_counter()
        run_cells([GramCell.from_spec(cfgs[0])])
        single = time.perf_counter() - start
        print(f"    {d:>6} {light:>34.2f} {batched_cell:>25.3f} {single:>12.3f}   ({load()})")


def part_d(root: Path) -> None:
    print("\n(d) full experiment=fig2 grid (20 x 20 x 3 = 1200 cells, paper settings), CLI incl. MLflow")
    (root / "d_full").mkdir()
    seconds = cli(
        ["-m", "experiment=fig2", "logger.tracking_uri=sqlite:///mlflow.db", "hydra.launcher.progress=false"], root / "d_full"
    )
    print(f"    {seconds:.1f} s   ({load()})")


def matmul_peak(threads: int = 2, size: int = 2048, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of an n x n matmul on ``threads`` threads, best of ``repeats`` (float32 and float64)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    out = {}
    for dtype in (torch.float32, torch.float64):
        a, b = torch.rand(size, size, dtype=dtype), torch.rand(size, size, dtype=dtype)
        out[str(dtype).removeprefix("torch.")] = 2 * size**3 / best(lambda a=a, b=b: a @ b, repeats) / 1e9
    torch.set_num_threads(previous)
    return out


def training_flops(cell: GramCell) -> float:
    """Multiply-add FLOPs of a cell's GD steps in the gram engine (``train_stage_batch``): per step and model,
    the response update (2 Fm K^2), the margins (2 Fm K + 2 K N) and the per-patch slopes (2 N K), with
    Fm = 2m filters and K = N + 2 patches; the downstream batch trains transfer and scratch."""

    def stage(n: int, steps: int) -> float:
        fm, k = 2 * cell.width, n + 2
        return steps * (2 * fm * k * k + 2 * fm * k + 4 * k * n)

    downstream = (2 if cell.transfer else 1) * stage(cell.n2, cell.downstream_steps)
    return downstream + (stage(cell.n1, cell.upstream_steps) if cell.transfer else 0.0)


def part_e() -> dict[str, float]:
    print("\n(e) matmul peak, 2 threads, n = 2048, best of 5")
    peak = matmul_peak()
    print(f"    float32 {peak['float32']:.1f} GFLOP/s   float64 {peak['float64']:.1f} GFLOP/s   ({load()})")
    return peak


def part_f(workers: int | None) -> None:
    print(
        "\n(f) cost per cell vs d, response-space test sets + gram sampling (fig2 settings, 20 cells of one"
        " data group, no tracking)"
    )
    workers = torch.get_num_threads() if workers is None else workers
    per_cell = {}
    for d in (1000, 1_000_000):
        cfgs = [
            config(
                [
                    "logger=none",
                    "engine=gram",
                    "train.eval_every=100",
                    "task.test_space=response",
                    "task.sampling=gram",
                    f"task.d={d}",
                    f"task.u_norm={0.2 * i:.1f}",
                ],
                "",
            )
            for i in range(20)
        ]
        cells = [GramCell.from_spec(cfg) for cfg in cfgs]
        run_cells(cells[:1])
        start = time.perf_counter()
        run_cells(cells, max_cells=20, workers=workers)
        per_cell[d] = (time.perf_counter() - start) / len(cells)
        print(f"    d={d:>8}: {per_cell[d]:.3f} s/cell   ({load()})")
    ratio = max(per_cell.values()) / min(per_cell.values())
    print(f"    ratio {ratio:.2f}x (bar: within 1.5x: {'met' if ratio <= 1.5 else 'NOT met'})")


def timed_cli(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> tuple[float, str]:
    """Seconds of ``python -m <args>`` and its output, stdout then stderr (the launcher's timing line is
    Hydra's log)."""
    cwd.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", *args], cwd=cwd, capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return time.perf_counter() - start, done.stdout + done.stderr


def launcher_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if "ptlab gram" in line]
    return lines[-1].split("] ", 1)[-1] if lines else "(no launcher timing line)"


def part_g(root: Path) -> None:
    print("\n(g) full experiment=kou2023 grid (100 x 100 x 10 = 100,000 trainings), CLI with MLflow, then its report")
    out = root / "g_kou2023"
    sweep, stderr = timed_cli(
        ["ptlab", "-m", "experiment=kou2023", "logger.tracking_uri=sqlite:///mlflow.db", "hydra.launcher.progress=false"], out
    )
    print(f"    sweep {sweep:.1f} s: {launcher_line(stderr)}   ({load()})")
    report, _ = timed_cli(["ptlab.report", "kou2023", "--tracking-uri", "sqlite:///mlflow.db"], out)
    boundary = (out / "reports" / "kou2023" / "kou2023_boundary.md").read_text()
    total = sweep + report
    print(f"    report {report:.1f} s; total {total:.1f} s (bar: < 120 s: {'met' if total < 120 else 'NOT met'})")
    print("    " + boundary.replace("\n", "\n    "))


def part_h(root: Path, peak: dict[str, float] | None, main_commit: str, seeds: int) -> None:
    seed_list = ",".join(map(str, range(seeds)))
    print(
        f"\n(h) fig2 grid (20 x 20 x {seeds} seeds), CLI with MLflow: main {main_commit} vs this tree with "
        "response-space test sets + gram sampling"
    )
    tree = root / "main_tree"
    tree.mkdir()
    archive = subprocess.run(["git", "archive", main_commit], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    grid = [
        "ptlab",
        "-m",
        "experiment=fig2",
        f"seed={seed_list}",
        "logger.tracking_uri=sqlite:///mlflow.db",
        "hydra.launcher.progress=false",
    ]
    main_seconds, main_err = timed_cli(grid, root / "h_main", env={"PYTHONPATH": str(tree)})
    print(f"    main: {main_seconds:.1f} s: {launcher_line(main_err)}   ({load()})")
    here = Path(__file__).resolve().parent.parent
    new_seconds, new_err = timed_cli(
        [*grid, "task.test_space=response", "task.sampling=gram"], root / "h_new", env={"PYTHONPATH": str(here)}
    )
    print(f"    this tree: {new_seconds:.1f} s: {launcher_line(new_err)}   ({load()})")
    speedup = main_seconds / new_seconds
    print(f"    speedup {speedup:.2f}x (bar: >= 3x: {'met' if speedup >= 3 else 'NOT met'})")
    per_cell = training_flops(GramCell.from_spec(config(["logger=none", "experiment=fig2"], "")))  # equal shapes
    flops = per_cell * 400 * seeds
    print(f"    training FLOPs of the grid: {flops / 1e12:.2f} TFLOP ({per_cell / 1e9:.2f} GFLOP a cell)")
    cells = fig2_cells(seeds)
    start = time.perf_counter()
    for _ in iter_chunks(cells, max_cells=60, workers=torch.get_num_threads(), summarize=final_test_acc):
        pass
    training = time.perf_counter() - start
    print(
        f"    training part alone (every cell's data, Gram matrices, GD steps and evaluations; no configs or tracking),"
        f" {torch.get_num_threads()} worker processes: {training:.1f} s = {flops / training / 1e9:.1f} GFLOP/s   ({load()})"
    )
    found = re.search(r"in ([0-9.]+) s \(configs ([0-9.]+) s, summaries and tracking ([0-9.]+) s\)", new_err)
    if found:
        total, configs, tracked = map(float, found.groups())
        print(
            f"    (in the CLI run: {total - configs - tracked:.1f} s besides configs and tracking, which overlaps the "
            "workers' training)"
        )
    if peak is not None:
        fraction = flops / training / 1e9 / peak["float32"]
        print(f"    = {fraction:.1%} of the float32 peak (bar: >= 50%: {'met' if fraction >= 0.5 else 'NOT met'})")
        floor = flops / peak["float32"] / 1e9
        print(
            f"    the grid's training FLOPs at 100% of that peak take {floor:.1f} s: at most "
            f"{main_seconds / floor:.2f}x faster than main's {main_seconds:.1f} s with nothing else counted"
        )


def fig2_cells(seeds: int) -> list[GramCell]:
    """The cells of ``experiment=fig2 seed=0..seeds-1 task.test_space=response task.sampling=gram``: one composed
    config's cell with the swept fields replaced (checked against composed configs at two corners)."""
    overrides = ["logger=none", "experiment=fig2", "task.test_space=response", "task.sampling=gram"]
    base = GramCell.from_spec(config(overrides, ""))
    norms = [round(0.2 * i, 1) for i in range(20)]
    cells = [
        dataclasses.replace(base, d=d, u_norm=u, seed=s) for d in range(500, 10500, 500) for u in norms for s in range(seeds)
    ]
    for corner in (cells[0], cells[-1]):
        composed = GramCell.from_spec(
            config([*overrides, f"task.d={corner.d}", f"task.u_norm={corner.u_norm}", f"seed={corner.seed}"], "")
        )
        assert composed == corner, (composed, corner)
    return cells


def final_test_acc(result: GramResult) -> float:
    return result.stages["transfer"].final["test_acc"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sample", type=int, default=2, help="Lightning cells measured for (b)")
    parser.add_argument("--parts", default="efgh", help="which measurements to run (default: %(default)s)")
    parser.add_argument("--main-commit", default="e8be947", help="main's commit for (h) (default: %(default)s)")
    parser.add_argument("--fig2-seeds", type=int, default=3, help="seeds of the fig2 grid in (h) (3: the full grid)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per engine in (a)")
    parser.add_argument("--workers", type=int, default=None, help="gram worker processes (default: torch threads)")
    args = parser.parse_args()
    quiet_lightning()
    root = Path(tempfile.mkdtemp(prefix="bench_gram_"))
    print(f"outputs under {root}")

    if "a" in args.parts:
        part_a(root, args.repeats)
    if "b" in args.parts:
        part_b(root, args.sample)
    if "c" in args.parts:
        part_c(root, args.workers)
    if "d" in args.parts:
        part_d(root)
    peak = part_e() if "e" in args.parts else None
    if "f" in args.parts:
        part_f(args.workers)
    if "g" in args.parts:
        part_g(root)
    if "h" in args.parts:
        part_h(root, peak, args.main_commit, args.fig2_seeds)


if __name__ == "__main__":
    main()

"""Whole-process wall time of ``python -m ptlab`` commands, each a fresh subprocess.

Commands (names for ``--only``):

    help       python -m ptlab --help
    bad_alpha  python -m ptlab transfer.alpha=1.5           (a bad value: must exit 2)
    bad_task   python -m ptlab task=nosuchtask              (an unknown option: must exit 2)
    gram       python -m ptlab engine=gram <SMALL>          (SMALL: ``--config-overrides``, default none)
    lightning  python -m ptlab engine=lightning <SMALL>     (the same config as gram)
    default    python -m ptlab                              (``make run``: the default config, this code)
    baseline   python -m ptlab                              (the same, on ``--baseline-ref`` in a git worktree)

Every command but ``help`` also gets ``logger.tracking_uri=sqlite:///<tmp>/mlflow.db`` (one store, its
schema created before timing), ``hydra.run.dir=<tmp>/run<k>-<name>`` and ``cache.enabled=false`` (no
upstream-cache hit makes a later repeat cheaper). Each run starts in its own fresh temporary working
directory with ``HYDRA_FULL_ERROR=0``; the repeats are interleaved round-robin (the order rotated each
round) so that a drift in machine load touches every command alike. The baseline runs with the same
interpreter and ``PYTHONPATH=<worktree>`` (checked to import the worktree's ``ptlab``; if the editable
install shadowed it, a ``runpy`` wrapper that drops the editable finder is used instead); the worktree is
removed at the end. Prints the machine (CPUs, load average at start and end, date), a Markdown table of
median / min / max seconds and exit codes per command, and the bars with PASS/FAIL:
``--help`` < 3 s, each bad-input error < 3 s (exit 2), lightning/gram >= 3x, baseline/default >= 2x.

Run from the repo root: ``.venv/bin/python benchmarks/bench_startup.py [--repeats 5]
[--only help,bad_alpha] [--config-overrides "train.upstream_steps=100"] [--skip-baseline]
[--baseline-ref 1d7bb10]``. Everything it writes goes to a temporary directory.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
NAMES = ("help", "bad_alpha", "bad_task", "gram", "lightning", "default", "baseline")
TRACKED = {"gram", "lightning", "default", "baseline"}  # commands that open the MLflow store


@dataclass
class Command:
    name: str
    args: list[str]  # arguments after ``python -m ptlab`` (the per-run overrides are added at run time)
    expect: int  # exit code a correct run gives
    baseline: bool = False
    common: bool = True  # add the tracking / run-dir / cache overrides
    seconds: list[float] = field(default_factory=list)
    codes: list[int] = field(default_factory=list)
    first_failure: str = ""  # stderr tail of the first run with an unexpected exit code


def commands(small: list[str]) -> dict[str, Command]:
    return {
        cmd.name: cmd
        for cmd in [
            Command("help", ["--help"], 0, common=False),
            Command("bad_alpha", ["transfer.alpha=1.5"], 2),
            Command("bad_task", ["task=nosuchtask"], 2),
            Command("gram", ["engine=gram", *small], 0),
            Command("lightning", ["engine=lightning", *small], 0),
            Command("default", [], 0),
            Command("baseline", [], 0, baseline=True),
        ]
    }


def base_env() -> dict[str, str]:
    env = dict(os.environ, HYDRA_FULL_ERROR="0")
    env.pop("PYTHONPATH", None)
    return env


def probe(env: dict[str, str], cwd: Path, code: str) -> str:
    """stdout of ``python -c code`` (raises on failure)."""
    return subprocess.run(
        [sys.executable, "-c", code], env=env, cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


# Where ``ptlab`` and the (namespace) ``hydra_plugins`` launcher package come from, without importing the latter.
WHERE = (
    "import importlib.util, ptlab; print(ptlab.__file__); "
    "print(importlib.util.find_spec('hydra_plugins.ptlab_gram_launcher').origin)"
)
# Fallback launcher for the baseline: drop the editable install's finder, put the worktree first, run ptlab.
WRAPPER = (
    "import sys, runpy; wt = sys.argv[1]; "
    "sys.meta_path[:] = [f for f in sys.meta_path "
    "if not getattr(f, '__module__', '').startswith('__editable__')]; "
    "sys.path.insert(0, wt); sys.argv = ['ptlab', *sys.argv[2:]]; "
    "runpy.run_module('ptlab', run_name='__main__', alter_sys=True)"
)


def setup_baseline(ref: str, tmp: Path) -> tuple[Path, list[str], dict[str, str]]:
    """Worktree of ``ref``; the argv prefix and env that run its ``ptlab`` (verified)."""
    worktree = tmp / "baseline"
    subprocess.run(
        ["git", "-C", str(REPO), "worktree", "add", "--detach", str(worktree), ref], check=True, capture_output=True, text=True
    )
    rev = subprocess.run(
        ["git", "-C", str(worktree), "rev-parse", "--short", "HEAD"], check=True, capture_output=True, text=True
    ).stdout.strip()
    probe_dir = tmp / "probe"
    probe_dir.mkdir()
    env = dict(base_env(), PYTHONPATH=str(worktree))
    where = probe(env, probe_dir, WHERE).splitlines()
    if all(Path(p).resolve().is_relative_to(worktree.resolve()) for p in where):
        prefix = [sys.executable, "-m", "ptlab"]
        how = f"PYTHONPATH={worktree}"
    else:
        print(f"PYTHONPATH is shadowed by the editable install (imports {where}); using a runpy wrapper", file=sys.stderr)
        env = base_env()
        prefix = [sys.executable, "-c", WRAPPER, str(worktree)]
        # The wrapper's path set-up alone, then the same import check.
        check = [sys.executable, "-c", WRAPPER.split("; sys.argv")[0] + "; " + WHERE, str(worktree)]
        where = (
            subprocess.run(check, env=env, cwd=probe_dir, check=True, capture_output=True, text=True).stdout.strip().splitlines()
        )
        if not all(Path(p).resolve().is_relative_to(worktree.resolve()) for p in where):
            raise SystemExit(f"cannot make the baseline import its own ptlab: {where}")
        how = "runpy wrapper (editable finder dropped)"
    print(f"baseline: {ref} = {rev}, worktree {worktree}, via {how}; imports {' and '.join(where)}")
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", str(worktree / "ptlab"), str(worktree / "hydra_plugins")],
        env=env,
        cwd=probe_dir,
        capture_output=True,
    )
    return worktree, prefix, env


def remove_worktree(worktree: Path) -> None:
    subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(worktree)], capture_output=True)
    subprocess.run(["git", "-C", str(REPO), "worktree", "prune"], capture_output=True)


def create_store(uri: str, env: dict[str, str], cwd: Path) -> None:
    """Create the MLflow schema before timing, so that no timed run pays for the migrations."""
    probe(env, cwd, f"import mlflow; mlflow.MlflowClient({uri!r}).search_experiments()")


def run_once(cmd: Command, k: int, prefix: list[str], env: dict[str, str], tmp: Path, uri: str, timeout: float) -> None:
    cwd = tmp / "cwd" / f"{k}-{cmd.name}"
    cwd.mkdir(parents=True)
    extra = [f"logger.tracking_uri={uri}", f"hydra.run.dir={tmp / f'run{k}-{cmd.name}'}", "cache.enabled=false"]
    argv = [*prefix, *cmd.args, *(extra if cmd.common else [])]
    log = tmp / "logs" / f"{k}-{cmd.name}"
    log.parent.mkdir(exist_ok=True)
    with open(f"{log}.out", "wb") as out, open(f"{log}.err", "wb") as err:
        start = time.perf_counter()
        try:
            code = subprocess.run(argv, env=env, cwd=cwd, stdout=out, stderr=err, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = -9
        seconds = time.perf_counter() - start
    cmd.seconds.append(seconds)
    cmd.codes.append(code)
    if code != cmd.expect and not cmd.first_failure:
        tail = Path(f"{log}.err").read_text(errors="replace").strip().splitlines()[-15:]
        cmd.first_failure = "\n".join(tail) or "(no stderr)"
    print(f"  run {k:3d}  {cmd.name:<10} {seconds:7.2f} s  exit {code}", file=sys.stderr, flush=True)


def median(cmd: Command) -> float:
    return statistics.median(cmd.seconds)


def codes_ok(cmd: Command) -> bool:
    return all(code == cmd.expect for code in cmd.codes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="runs per command, interleaved round-robin")
    parser.add_argument("--only", default=",".join(NAMES), help=f"comma-separated subset of {','.join(NAMES)}")
    parser.add_argument(
        "--config-overrides",
        default="",
        help="SMALL: Hydra overrides for gram and lightning, one shell-quoted string (default: none)",
    )
    parser.add_argument("--skip-baseline", action="store_true", help="do not run the baseline ref")
    parser.add_argument("--baseline-ref", default="1d7bb10", help="git ref of the baseline (default: 1d7bb10)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds before one run is killed (exit -9)")
    args = parser.parse_args()
    selected = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(selected) - set(NAMES))
    if unknown:
        parser.error(f"unknown command(s) {unknown}; choose from {','.join(NAMES)}")
    if args.skip_baseline:
        selected = [name for name in selected if name != "baseline"]
    table = commands(shlex.split(args.config_overrides))
    runs = [table[name] for name in NAMES if name in selected]
    if not runs:
        parser.error("nothing to run")

    load_start = os.getloadavg()
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.splitlines()
    print(f"date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(f"CPUs: {os.cpu_count()} (usable: {len(os.sched_getaffinity(0))}); python: {sys.executable}")
    print(f"load average at start (1/5/15 min): {load_start[0]:.2f} {load_start[1]:.2f} {load_start[2]:.2f}")
    print(f"current code: {REPO} at {head}" + (f" + {len(dirty)} modified tracked files" if dirty else ""))
    print(f"SMALL (gram, lightning): {args.config_overrides or 'default config'}; repeats: {args.repeats}")

    worktree = None
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp_name:
        tmp = Path(tmp_name)
        try:
            env = base_env()
            probe_dir = tmp / "probe-current"
            probe_dir.mkdir()
            print(f"current imports {' and '.join(probe(env, probe_dir, WHERE).splitlines())}")
            subprocess.run(
                [sys.executable, "-m", "compileall", "-q", str(REPO / "ptlab"), str(REPO / "hydra_plugins")],
                env=env,
                cwd=probe_dir,
                capture_output=True,
            )
            setups = {False: ([sys.executable, "-m", "ptlab"], env)}
            if any(cmd.baseline for cmd in runs):
                worktree, prefix, baseline_env = setup_baseline(args.baseline_ref, tmp)
                setups[True] = (prefix, baseline_env)
            uri = f"sqlite:///{tmp / 'mlflow.db'}"
            if any(cmd.name in TRACKED for cmd in runs):
                create_store(uri, env, probe_dir)
            print(file=sys.stderr)
            k = 0
            for repeat in range(args.repeats):
                shift = repeat % len(runs)
                print(f"round {repeat + 1}/{args.repeats}", file=sys.stderr, flush=True)
                for cmd in runs[shift:] + runs[:shift]:
                    prefix, cmd_env = setups[cmd.baseline]
                    run_once(cmd, k, prefix, cmd_env, tmp, uri, args.timeout)
                    k += 1
        finally:
            if worktree is not None:
                remove_worktree(worktree)
    load_end = os.getloadavg()

    print()
    print("| command | argv (after `python -m ptlab`) | runs | exit codes | median s | min s | max s |")
    print("|---|---|---:|---|---:|---:|---:|")
    for cmd in runs:
        codes = ",".join(sorted({str(c) for c in cmd.codes}))
        mark = "" if codes_ok(cmd) else f" (expected {cmd.expect})"
        argv = " ".join(cmd.args) or "(none)"
        if cmd.baseline:
            argv += f" [@{args.baseline_ref}]"
        print(
            f"| {cmd.name} | `{argv}` | {len(cmd.seconds)} | {codes}{mark} | {median(cmd):.2f} | "
            f"{min(cmd.seconds):.2f} | {max(cmd.seconds):.2f} |"
        )

    bars: list[tuple[str, str, str, bool]] = []  # (bar, measured, threshold, pass)
    for name in ("help", "bad_alpha", "bad_task"):
        if name in table and table[name] in runs:
            cmd = table[name]
            note = "" if codes_ok(cmd) else f", exit {cmd.codes} != {cmd.expect}"
            bars.append((f"{name} median", f"{median(cmd):.2f} s{note}", "< 3 s", median(cmd) < 3 and codes_ok(cmd)))
    for slow, fast, threshold in (("lightning", "gram", 3.0), ("baseline", "default", 2.0)):
        if table[slow] in runs and table[fast] in runs:
            ratio = median(table[slow]) / median(table[fast])
            ok = codes_ok(table[slow]) and codes_ok(table[fast])
            note = "" if ok else " (a run exited wrongly)"
            bars.append((f"{slow} / {fast} (medians)", f"{ratio:.2f}x{note}", f">= {threshold:g}x", ratio >= threshold and ok))
    if bars:
        print()
        print("| bar | measured | threshold | result |")
        print("|---|---:|---|---|")
        for bar, measured, threshold, ok in bars:
            print(f"| {bar} | {measured} | {threshold} | {'PASS' if ok else 'FAIL'} |")
    print()
    print(f"load average at end (1/5/15 min): {load_end[0]:.2f} {load_end[1]:.2f} {load_end[2]:.2f}")
    for cmd in runs:
        if cmd.first_failure:
            print(f"\n{cmd.name}: first unexpected exit, stderr tail:\n{cmd.first_failure}")


if __name__ == "__main__":
    main()

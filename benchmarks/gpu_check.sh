#!/usr/bin/env bash
# One prepared check of the tracked image pipeline on a real GPU (or, with --cpu, the same steps at
# tiny sizes on a CPU). Every output (MLflow SQLite store, Hydra outputs, upstream cache,
# checkpoints, synthetic CIFAR files, logs) goes under one temp dir, removed at the end unless --keep.
#
# Steps, each timed, each followed by a query of the MLflow store:
#   table1_cifar    a Table 1 cell on synthetic CIFAR-10 files in the real on-disk format (written
#                   here): ResNet-34 -> ResNet-18 at full width, bf16-mixed, trainer=gpu
#                   (--cpu: resnet34_small -> resnet18_small, 1 epoch)
#   table1_digits   a Table 1 cell on digits, resnet34_small -> resnet18_small
#   sweep_digits    a 4-job joblib sweep over transfer.alpha on digits (n_jobs=4, jobs_per_gpu=4;
#                   --cpu: n_jobs=2)
#   deit_layers     a fig4_digits-style DeiT-Small layer-transfer cell at 224 px, random init
#                   (--cpu: DeiT-Tiny at 32 px, patch 8)
#   gram_sweep      a 4-cell batched sweep of the gram engine (hydra/launcher=ptlab_gram) with
#                   engine.device=cuda (--cpu: cpu)
#   gram_cuda_tests the gram engine's exactness tests parametrised over the device, their cuda cases
#                   (pytest -k cuda, from the image's pytest; --cpu: all skipped)
#   throughput_bN   benchmarks/bench_image_throughput.py at batch 128 and 256 (--cpu: 16 and 32)
# Then a table: step, status, seconds, images/s (training images per second of stage wall time, from
# the store; the Lightning module's rate for the benchmark), runs FINISHED, runs RUNNING (must be 0),
# GPU memory peak (torch.cuda.max_memory_allocated in the step's process; "-" where not measurable:
# the sweep's workers, a CPU). Exit 0 when every step passed, else 1 with one line naming the
# failed steps (a step fails when its command fails, a run is left RUNNING or a run is not FINISHED).
#
# Usage: bash benchmarks/gpu_check.sh [--cpu] [--wheelhouse DIR] [--keep] [--logs DIR] [-h|--help]
#   --cpu             tiny sizes, trainer=cpu (a few minutes on 2 cores)
#   --wheelhouse DIR  install ptlab from DIR (built by benchmarks/gpu_wheelhouse.sh) into a fresh venv
#                     made with --system-site-packages from ${PYTHON:-python3}, so the machine's own
#                     torch/torchvision are reused; pip runs with --no-index --find-links DIR
#   --keep            keep the temp dir (its path is printed)
#   --logs DIR        copy every step's log and the table to DIR (e.g. $OUT on the device machine)
# Without --wheelhouse the python is ${PYTHON:-.venv/bin/python} (relative: from the repository root).
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"

usage() { sed -n '2,/^set -uo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_check: $*" >&2; exit 1; }

CPU=0 WHEELHOUSE="" KEEP=0 LOGS=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --cpu) CPU=1; shift ;;
    --keep) KEEP=1; shift ;;
    --wheelhouse) [ $# -ge 2 ] || die "--wheelhouse needs a folder"; WHEELHOUSE="$2"; shift 2 ;;
    --logs) [ $# -ge 2 ] || die "--logs needs a folder"; LOGS="$2"; shift 2 ;;
    *) usage >&2; die "unknown argument '$1'" ;;
  esac
done

unset PYTHONPATH PYTHONHOME PYTHONSTARTUP VIRTUAL_ENV
export PYTHONNOUSERSITE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 MPLBACKEND=Agg
export HYDRA_FULL_ERROR=0 PYTHONWARNINGS=ignore HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

abspath() { case "$1" in /*) echo "$1" ;; *) echo "$ROOT/$1" ;; esac; }
[ -z "$LOGS" ] || { mkdir -p "$LOGS" && LOGS="$(cd "$LOGS" && pwd)"; } || die "cannot create --logs $LOGS"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/ptlab-gpu-check.XXXXXX")" || die "mktemp failed"
if [ "$KEEP" = 1 ]; then trap 'echo "gpu_check: outputs kept in $WORK"' EXIT; else trap 'rm -rf "$WORK"' EXIT; fi
mkdir -p "$WORK/logs"
TOTAL_START=$SECONDS

# --- the python -------------------------------------------------------------------------------
if [ -n "$WHEELHOUSE" ]; then
  [ -d "$WHEELHOUSE" ] || die "no wheelhouse folder '$WHEELHOUSE'"
  WHEELHOUSE="$(cd "$WHEELHOUSE" && pwd)"
  BASE="${PYTHON:-python3}"
  command -v "$BASE" >/dev/null || die "no base python '$BASE' (set PYTHON)"
  LOG="$WORK/logs/install.log"
  T0=$SECONDS
  "$BASE" -m venv --system-site-packages "$WORK/venv" >>"$LOG" 2>&1 \
    || "$BASE" -m venv --system-site-packages --without-pip "$WORK/venv" >>"$LOG" 2>&1 \
    || { tail -n 20 "$LOG" >&2; die "FAILED at step 'install': python -m venv failed"; }
  PY="$WORK/venv/bin/python"
  if "$PY" -m pip --version >/dev/null 2>&1; then PIP=("$PY" -m pip); else PIP=("$BASE" -m pip --python "$PY"); fi
  # Only the wheelhouse and the system site-packages: no pip config file, PIP_* variable or constraint.
  PIP_CONFIG_FILE=/dev/null "${PIP[@]}" --isolated install --no-index --find-links "$WHEELHOUSE" ptlab >>"$LOG" 2>&1 \
    || { tail -n 20 "$LOG" >&2; die "FAILED at step 'install': pip install --no-index --find-links $WHEELHOUSE ptlab"; }
  echo "gpu_check: install: ok ($((SECONDS - T0))s, $(grep -c '' "$LOG") log lines; venv $WORK/venv)"
else
  PY="$(abspath "${PYTHON:-.venv/bin/python}")"
  [ -x "$PY" ] || die "no python at $PY (run \`make venv\`, set PYTHON, or pass --wheelhouse)"
fi

# --- helpers (python): synthetic CIFAR, a ptlab/benchmark runner that reports the GPU memory peak,
#     the store query -----------------------------------------------------------------------------
TOOLS="$WORK/gpu_check_tools.py"
cat >"$TOOLS" <<'PYEOF'
"""gpu_check helpers: cifar ROOT PER_TRAIN PER_TEST | run -m MODULE ARGS... | run SCRIPT ARGS... |
env MODE | query URI EXPERIMENT EXPECTED_PIPELINES LOG."""
import sys


def write_cifar10(root, per_class_train, per_class_test, seed=0):
    """root/cifar-10-batches-py: data_batch_1..5, test_batch, batches.meta, CIFAR's pickle format."""
    import pickle
    from pathlib import Path
    import numpy as np

    def dump(path, entry):
        with path.open("wb") as handle:
            pickle.dump(entry, handle, protocol=2)

    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    train_y = np.repeat(np.arange(10), per_class_train)
    rng.shuffle(train_y)
    train_x = rng.integers(0, 256, size=(len(train_y), 3072), dtype=np.uint8)
    for b, part in enumerate(np.array_split(np.arange(len(train_y)), 5), start=1):
        dump(folder / f"data_batch_{b}", {"batch_label": f"training batch {b} of 5", "labels": train_y[part].tolist(),
                                          "data": train_x[part], "filenames": [f"img{i}.png" for i in part]})
    test_y = np.repeat(np.arange(10), per_class_test)
    test_x = rng.integers(0, 256, size=(len(test_y), 3072), dtype=np.uint8)
    dump(folder / "test_batch", {"batch_label": "testing batch 1 of 1", "labels": test_y.tolist(), "data": test_x,
                                 "filenames": [f"test{i}.png" for i in range(len(test_y))]})
    dump(folder / "batches.meta", {"num_cases_per_batch": 10000, "num_vis": 3072,
                                   "label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                                   "horse", "ship", "truck"]})
    print(f"synthetic CIFAR-10: {len(train_y)} train, {len(test_y)} test images in {folder}")


def run(argv):
    """Run a module (-m NAME) or a script with ``argv``; at exit print the CUDA memory peak."""
    import atexit
    import runpy

    def report():
        torch = sys.modules.get("torch")
        if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
            print(f"gpu_check: peak_gpu_bytes={torch.cuda.max_memory_allocated()}", flush=True)

    atexit.register(report)
    if argv[0] == "-m":
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = list(argv)
        runpy.run_path(argv[0], run_name="__main__")


def env(mode):
    import torch
    import ptlab

    cuda = torch.cuda.is_available()
    print(f"gpu_check: python {sys.version.split()[0]} at {sys.executable}; torch {torch.__version__} "
          f"({torch.__file__.rsplit('/torch/', 1)[0]}); ptlab at {ptlab.__file__.rsplit('/ptlab/', 1)[0]}; "
          + (f"CUDA {torch.version.cuda}, {torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}"
             if cuda else "no CUDA device"))
    if mode == "gpu" and not cuda:
        sys.exit("gpu_check: FAILED at step 'env': torch sees no CUDA device (use --cpu for a CPU run)")


def query(uri, experiment, expected, log):
    """One line: FINISHED RUNNING OTHER PIPELINES IMAGES_PER_S for the experiment's runs."""
    import re
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    runs = [] if found is None else client.search_runs([found.experiment_id], run_view_type=ViewType.ALL,
                                                       max_results=5000)
    status = [r.info.status for r in runs]
    finished, running = status.count("FINISHED"), status.count("RUNNING")
    other = len(status) - finished - running
    parents = {r.info.run_id: r for r in runs  # pipelines: top-level runs, but a sweep's own summary run
               if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("ptlab.stage") != "sweep"}
    pipelines = sum(1 for r in parents.values() if r.info.status == "FINISHED")
    images = seconds = 0.0
    for r in runs:
        parent = parents.get(r.data.tags.get("mlflow.parentRunId"))
        epochs = r.data.metrics.get("summary/epochs")  # final/epochs as MLflow stores it (metric_name)
        if parent is None or epochs is None or not r.info.end_time:
            continue
        stage = r.data.tags.get("ptlab.stage", r.info.run_name or "")
        n = parent.data.metrics.get("data/n1" if "upstream" in stage else "data/n2")
        if n is None:
            continue
        images += n * epochs
        seconds += (r.info.end_time - r.info.start_time) / 1000
    rate = f"{images / seconds:.1f}" if seconds > 0 else "-"
    if expected == 0:  # a benchmark: its own number, no runs
        text = open(log, errors="replace").read()
        match = re.search(r"Lightning module\s*:\s*([0-9.]+) images/s", text)
        rate = match.group(1) if match else "-"
    print(finished, running, other, pipelines, rate)


def peak(log):
    import re
    values = [int(v) for v in re.findall(r"gpu_check: peak_gpu_bytes=(\d+)", open(log, errors="replace").read())]
    print(f"{max(values) / 2**30:.2f}GiB" if values and max(values) > 0 else "-")


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "cifar":
        write_cifar10(args[0], int(args[1]), int(args[2]))
    elif cmd == "run":
        run(args)
    elif cmd == "env":
        env(args[0])
    elif cmd == "query":
        query(args[0], args[1], int(args[2]), args[3])
    elif cmd == "peak":
        peak(args[0])
PYEOF

MODE=gpu; [ "$CPU" = 1 ] && MODE=cpu
"$PY" "$TOOLS" env "$MODE" || exit 1

# --- sizes ------------------------------------------------------------------------------------
URI="sqlite:///$WORK/mlflow.db"
if [ "$CPU" = 1 ]; then
  TRAINER=(trainer=cpu)
  CIFAR_PER_CLASS=(12 4)
  TABLE1_CIFAR=(upstream_model=resnet34_small model=resnet18_small task.n2=20 train.upstream_epochs=1
                train.downstream_epochs=1 train.batch_size=16)
  DIGITS=(train.upstream_epochs=1 train.downstream_epochs=1 task.n2=20)
  SWEEP=(hydra.launcher.n_jobs=2)
  DEIT=(model=deit_tiny upstream_model=deit_tiny model.img_size=32 model.patch_size=8 upstream_model.img_size=32
        upstream_model.patch_size=8 task.image_size=32 task.n1_ratio=2 train.upstream_epochs=1
        train.downstream_epochs=1 train.warmup_epochs=0 train.batch_size=16)
  BENCH=(--arch resnet18 --width 0.25 --images 64 --epochs 2 --repeats 1 --device cpu)
  GRAM=(engine.device=cpu)
  BATCHES=(16 32)
else
  TRAINER=(trainer=gpu train.precision=bf16-mixed)
  CIFAR_PER_CLASS=(1000 200)
  TABLE1_CIFAR=(upstream_model=resnet34 model=resnet18 task.n2=1000 train.upstream_epochs=3
                train.downstream_epochs=3 train.batch_size=128)
  DIGITS=(train.upstream_epochs=5 train.downstream_epochs=5)
  SWEEP=(hydra.launcher.n_jobs=4 devices.jobs_per_gpu=4)
  DEIT=(model=deit_small upstream_model=deit_small model.img_size=224 model.patch_size=16
        upstream_model.img_size=224 upstream_model.patch_size=16 task.image_size=32 train.upstream_epochs=3
        train.downstream_epochs=3 train.warmup_epochs=1 train.batch_size=64)
  BENCH=(--arch resnet18 --width 1.0 --images 16384 --epochs 3 --repeats 1 --device cuda)
  GRAM=(engine.device=cuda)
  BATCHES=(128 256)
fi
common() {  # overrides every pipeline step shares: the store, the cache, outputs under $WORK
  echo "logger.tracking_uri=$URI" "logger.experiment_name=gpu_check_$1" "cache.dir=$WORK/cache" \
    "hydra.run.dir=$WORK/outputs/$1" "hydra.sweep.dir=$WORK/multirun/$1" train.progress_bar=false
}

# --- the steps ----------------------------------------------------------------------------------
ROWS=() FAILED=()
step() {  # step NAME EXPECTED_PIPELINES COMMAND...  (runs in $WORK, logs to $WORK/logs/NAME.log)
  local name="$1" expected="$2"; shift 2
  local log="$WORK/logs/$name.log" start end rc secs q finished running other pipelines rate mem status
  start=$(date +%s.%N)
  (cd "$WORK" && "$@") >"$log" 2>&1
  rc=$?
  end=$(date +%s.%N)
  secs=$(awk -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", b - a }')
  q=$("$PY" "$TOOLS" query "$URI" "gpu_check_$name" "$expected" "$log" 2>>"$log") || q="? ? ? ? -"
  read -r finished running other pipelines rate <<<"$q"
  mem=-; [ "$CPU" = 1 ] || mem=$("$PY" "$TOOLS" peak "$log" 2>/dev/null || echo -)
  status=ok
  local why=""
  if [ "$rc" != 0 ]; then why="exit $rc"
  elif [ "$running" != 0 ]; then why="$running run(s) left RUNNING"
  elif [ "$other" != 0 ]; then why="$other run(s) FAILED/KILLED"
  elif [ "$expected" -gt 0 ] && [ "$pipelines" != "$expected" ]; then why="$pipelines of $expected pipelines FINISHED"
  fi
  if [ -n "$why" ]; then
    status=FAILED
    FAILED+=("$name ($why)")
    tail -n 25 "$log" | sed "s/^/  $name | /" >&2
  fi
  [ "$expected" -gt 0 ] || finished=-
  echo "gpu_check: $name: $status (${secs}s${why:+, $why})"
  ROWS+=("$name|$status|$secs|$rate|$finished|$running|$mem")
}

DATA="$WORK/data"
"$PY" "$TOOLS" cifar "$DATA" "${CIFAR_PER_CLASS[@]}" >"$WORK/logs/cifar_data.log" 2>&1 \
  || { cat "$WORK/logs/cifar_data.log" >&2; die "FAILED at step 'cifar_data': could not write the CIFAR files"; }

step table1_cifar 1 "$PY" "$TOOLS" run -m ptlab experiment=table1_cifar10 task.data_dir="$DATA" \
  "${TABLE1_CIFAR[@]}" "${TRAINER[@]}" $(common table1_cifar)
step table1_digits 1 "$PY" "$TOOLS" run -m ptlab experiment=table1_digits +pair=resnet34_small_resnet18_small \
  "${DIGITS[@]}" "${TRAINER[@]}" $(common table1_digits)
# No experiment preset here: table1_digits' sweeper params would multiply the 4 cells.
step sweep_digits 4 "$PY" -m ptlab -m hydra/launcher=ptlab_joblib "${SWEEP[@]}" task=digits noise=pixels \
  +pair=resnet34_small_resnet18_small train.batch_size=16 train.lr=0.05 "${DIGITS[@]}" "${TRAINER[@]}" \
  transfer.alpha=0.25,0.5,0.75,1.0 $(common sweep_digits)
step deit_layers 1 "$PY" "$TOOLS" run -m ptlab experiment=fig4_digits "${DEIT[@]}" "${TRAINER[@]}" \
  $(common deit_layers)
step gram_sweep 4 "$PY" -m ptlab -m engine=gram hydra/launcher=ptlab_gram hydra/sweeper=ptlab_batched \
  task.u_norm=0.0,2.0 seed=0,1 "${GRAM[@]}" $(common gram_sweep)
step gram_cuda_tests 0 "$PY" -m pytest -q -p no:cacheprovider -k cuda "$ROOT/tests/engines/test_gram_devices.py" \
  "$ROOT/tests/engines/test_gram_engine.py" "$ROOT/tests/engines/test_response_space.py" "$ROOT/tests/pipeline/test_one_driver.py"
for b in "${BATCHES[@]}"; do
  step "throughput_b$b" 0 "$PY" "$TOOLS" run "$ROOT/benchmarks/bench_image_throughput.py" "${BENCH[@]}" --batch-size "$b"
done

# --- the table ----------------------------------------------------------------------------------
TABLE="$WORK/table.txt"
{
  echo "gpu_check: results ($MODE mode, $(basename "$PY") at ${PY#"$WORK"/})"
  printf '%-16s %-7s %9s %10s %9s %8s %13s\n' step status seconds images/s FINISHED RUNNING gpu_mem_peak
  for row in "${ROWS[@]}"; do
    IFS='|' read -r n s t r f u m <<<"$row"
    printf '%-16s %-7s %9s %10s %9s %8s %13s\n' "$n" "$s" "$t" "$r" "$f" "$u" "$m"
  done
} | tee "$TABLE"
if [ -n "$LOGS" ]; then cp "$WORK"/logs/*.log "$TABLE" "$LOGS"/ 2>/dev/null; fi
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "gpu_check: FAILED at step(s): $(IFS=';'; echo "${FAILED[*]}")" >&2
  exit 1
fi
echo "gpu_check: OK ($MODE mode, ${#ROWS[@]} steps in $((SECONDS - TOTAL_START))s)"

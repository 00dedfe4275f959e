#!/usr/bin/env bash
# A wheelhouse holding only what the GPU machine lacks, so that benchmarks/gpu_check.sh --wheelhouse can
# install ptlab there with no package registry: ptlab's own wheel (built like .ci/wheel_check.sh: from a
# copy of the working tree, no build isolation) plus the dependency closure of its requirements, taken
# at the versions installed in $VENV, that stops at every distribution the machine's image already holds
# (--image: benchmarks/gpu_image_packages.txt, with torch, torchvision, numpy, pandas, pyarrow, scipy,
# scikit-learn, matplotlib, pytorch-lightning, timm, torchmetrics, ...): hydra-core, omegaconf,
# antlr4-python3-runtime (sdist only: built into a wheel), mlflow with mlflow-skinny, mlflow-tracing and
# their own dependencies, the Hydra launcher plugins, submitit. Requirement markers are read for the
# target (Python --python-version on Linux x86_64); binary wheels come from `pip download --no-deps
# --only-binary=:all: --python-version X.Y --platform TAG...`, a distribution without one is built with
# `pip wheel --no-deps`. Nothing of torch's is fetched.
#
# Then two checks, each failing the script: every requirement of every wheel (markers for the target)
# is met by a wheel of the wheelhouse or by the image list (its version checked where the list has
# one: ptlab's torch>=... against the image's torch), so `pip install --no-index --find-links OUT ptlab`
# in a venv made with --system-site-packages there resolves; and the total size is at most --max-mib.
#
# Usage: bash benchmarks/gpu_wheelhouse.sh OUT_DIR [--image FILE] [--python-version X.Y]
#                                          [--platform TAG]... [--max-mib N]
#   --image           the image's distributions, a name (or name==version) a line, # comments
#                     (default benchmarks/gpu_image_packages.txt)
#   --python-version  the GPU machine's Python (default 3.12)
#   --platform        pip platform tag(s) (default manylinux2014_x86_64, manylinux_2_17_x86_64,
#                     manylinux_2_28_x86_64)
#   --max-mib         the size limit in MiB (default 60)
# Prints one line per step, the 10 largest wheels, `du -sh` of OUT_DIR and the total.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_wheelhouse: $*" >&2; exit 1; }

OUT="" IMAGE="$ROOT/benchmarks/gpu_image_packages.txt" TARGET_PY="3.12" MAX_MIB=60 PLATFORMS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --image) [ $# -ge 2 ] || die "--image needs a file"; IMAGE="$2"; shift 2 ;;
    --python-version) [ $# -ge 2 ] || die "--python-version needs a value"; TARGET_PY="$2"; shift 2 ;;
    --platform) [ $# -ge 2 ] || die "--platform needs a value"; PLATFORMS+=("$2"); shift 2 ;;
    --max-mib) [ $# -ge 2 ] || die "--max-mib needs a value"; MAX_MIB="$2"; shift 2 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$OUT" ] || die "one OUT_DIR only (got '$OUT' and '$1')"; OUT="$1"; shift ;;
  esac
done
[ -n "$OUT" ] || { usage >&2; die "OUT_DIR is required"; }
[ -x "$PY" ] || die "no python at $PY (run \`make venv\` first)"
[ -f "$IMAGE" ] || die "no image list at $IMAGE"
[ ${#PLATFORMS[@]} -gt 0 ] || PLATFORMS=(manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64)
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
case "$OUT/" in "$ROOT"/*) die "OUT_DIR $OUT is inside the repository; pick a folder outside it" ;; esac
[ -z "$(ls -A "$OUT")" ] || die "OUT_DIR $OUT is not empty (the size and resolution checks read every wheel in it)"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ptlab-wheelhouse.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS
PLAT_ARGS=(); for p in "${PLATFORMS[@]}"; do PLAT_ARGS+=(--platform "$p"); done

# 1. ptlab's wheel from a copy of the tracked and untracked-not-ignored files (no build/ or
#    egg-info written into the repository).
"$PY" - "$ROOT" "$WORK/src" <<'EOF' || die "could not copy the sources"
import shutil, subprocess, sys
from pathlib import Path
root, dest = Path(sys.argv[1]), Path(sys.argv[2])
listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                        check=True, capture_output=True).stdout
for name in filter(None, listed.decode().split("\0")):
    if (root / name).is_file():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest / name)
EOF
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$WORK/src" >"$WORK/ptlab.log" 2>&1 \
  || { tail -n 20 "$WORK/ptlab.log" >&2; die "pip wheel of ptlab failed"; }
echo "gpu_wheelhouse: ptlab wheel: $(cd "$OUT" && ls ptlab-*.whl)"

# 2. What the machine lacks: the closure of the wheel's requirements over $VENV's installed metadata, with
#    markers for the target, not descending into what the image holds.
TOOLS="$ROOT/benchmarks/gpu_wheelhouse_tools.py"
"$PY" "$TOOLS" closure "$(ls "$OUT"/ptlab-*.whl)" "$IMAGE" "$TARGET_PY" "$WORK/need.txt"

# 3. Their wheels for the target: binary (or pure) wheels from pip download, else built from the sdist.
BUILT=()
while read -r spec; do
  [ -n "$spec" ] || continue
  if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" "${PLAT_ARGS[@]}" \
      -d "$OUT" "$spec" >"$WORK/download.log" 2>&1; then
    "$PY" -m pip wheel -q --no-deps -w "$OUT" "$spec" >"$WORK/wheel.log" 2>&1 \
      || { tail -n 20 "$WORK/download.log" "$WORK/wheel.log" >&2; die "no wheel of $spec for Python $TARGET_PY"; }
    BUILT+=("$spec")
  fi
done <"$WORK/need.txt"
[ ${#BUILT[@]} -eq 0 ] || echo "gpu_wheelhouse: built from sdists: ${BUILT[*]}"
cp "$WORK/need.txt" "$OUT/requirements-wheelhouse.txt"

# 4. Checks: nothing of torch's, the install resolves, the size.
if ls "$OUT" | grep -Eiq '^(torch|torchvision|triton|nvidia)[-_]'; then
  die "the wheelhouse holds torch/torchvision/triton/nvidia wheels: $(ls "$OUT" | grep -Ei '^(torch|torchvision|triton|nvidia)[-_]' | tr '\n' ' ')"
fi
"$PY" "$TOOLS" check "$OUT" "$IMAGE" "$TARGET_PY"
"$PY" - "$OUT" "$MAX_MIB" <<'EOF'
import sys
from pathlib import Path
wheels = sorted(Path(sys.argv[1]).glob("*.whl"), key=lambda p: -p.stat().st_size)
total, limit = sum(p.stat().st_size for p in wheels), float(sys.argv[2])
print("gpu_wheelhouse: largest wheels:")
for p in wheels[:10]:
    print(f"  {p.stat().st_size / 2**20:8.1f} MiB  {p.name}")
print(f"gpu_wheelhouse: {len(wheels)} wheels, total {total / 2**20:.1f} MiB (limit {limit:g} MiB)")
if total > limit * 2**20:
    sys.exit(f"gpu_wheelhouse: OVER the {limit:g} MiB limit")
EOF
echo "gpu_wheelhouse: du -sh: $(du -sh "$OUT" | cut -f1)"
echo "gpu_wheelhouse: done in $((SECONDS - START))s"

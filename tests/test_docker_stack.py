"""docker/test-stack.sh end to end: the image built, the stack started, a pipeline tracked in it.

Takes about a quarter of an hour and several GB the first time (it installs podman and builds every
image), so it runs only when asked: ``PTLAB_DOCKER=1 pytest -m slow tests/test_docker_stack.py``
(or ``make test-docker``, which runs the script directly). docker/README.md says what it checks.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parent.parent / "docker"
STEPS = [
    "tools",
    "configure",
    "debian-base",
    "standin-pytorch",
    "standin-postgres",
    "standin-mlflow",
    "cuda-check",
    "project-image",
    "ptlab-help",
    "stack-up",
    "pipeline-run",
    "check-runs",
    "reaper",
    "report",
    "down",
]


def test_dockerfile_checks_the_cuda_of_its_base_tag() -> None:
    """The build's CUDA check defaults to the CUDA version named by the FROM tag."""
    text = (DOCKER / "Dockerfile").read_text()
    tag_cuda = re.search(r"^FROM \S+-cuda(\d+\.\d+)-", text, re.M).group(1)
    assert re.search(r"^ARG TORCH_CUDA=(\S+)$", text, re.M).group(1) == tag_cuda
    assert "torch.version.cuda == '${TORCH_CUDA}'" in text


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("PTLAB_DOCKER") != "1", reason="set PTLAB_DOCKER=1 to build and start the stack")
def test_stack_builds_starts_and_tracks_a_pipeline() -> None:
    done = subprocess.run(["bash", str(DOCKER / "test-stack.sh")], capture_output=True, text=True, timeout=3600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    steps = [line.split()[1] for line in done.stdout.splitlines() if re.fullmatch(r"test-stack: \S+ +ok +\d+s", line)]
    assert steps == STEPS
    assert "test-stack: passed" in done.stdout

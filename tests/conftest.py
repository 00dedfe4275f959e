"""Shared fixtures: configs composed from conf/ with every output under tmp_path."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from ptlab.cli import compose_config

REPO = Path(__file__).resolve().parent.parent

SMALL = [
    "task.d=200",
    "task.n1=40",
    "task.n2=10",
    "task.n_test=100",
    "train.upstream_steps=60",
    "train.downstream_steps=30",
    "train.eval_every=10",
    "model.width=8",
]
"""Overrides that make a synthetic pipeline take about a second."""


@pytest.fixture(autouse=True, scope="session")
def store_templates(tmp_path_factory: pytest.TempPathFactory) -> None:
    """New SQLite stores copy their pre-migrated template from a folder of this test session (subprocesses too),
    not from the user's cache (``ptlab.tracking.store_template``)."""
    os.environ.setdefault("PTLAB_STORE_TEMPLATES", str(tmp_path_factory.mktemp("store_templates")))


@pytest.fixture
def tracking_uri(tmp_path: Path) -> str:
    """A fresh SQLite MLflow store under tmp_path."""
    return f"sqlite:///{tmp_path / 'mlflow.db'}"


@pytest.fixture
def make_cfg(tracking_uri: str, tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg(*overrides, small=True)``: a composed config logging to the tmp_path store, with the
    upstream cache under tmp_path too."""

    def make(*overrides: str, small: bool = True) -> DictConfig:
        return compose_config(
            [f"logger.tracking_uri={tracking_uri}", *(SMALL if small else []), f"cache.dir={tmp_path / 'cache'}", *overrides]
        )

    return make


def run_cli(args: list[str], cwd: Path, module: str = "ptlab", timeout: float = 600) -> subprocess.CompletedProcess:
    """Run ``python -m <module> <args>`` in ``cwd`` (outputs land there) and capture its output."""
    env = {**os.environ, "HYDRA_FULL_ERROR": "0", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env
    )

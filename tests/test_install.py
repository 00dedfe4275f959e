"""Packaging: the configs are found in a checkout and ship in the wheel as ptlab/conf."""

from __future__ import annotations

import subprocess
import tomllib
from pathlib import Path

import pytest

from ptlab.paths import config_dir

REPO = Path(__file__).resolve().parent.parent


def test_config_dir_holds_the_primary_config_and_the_groups():
    conf = Path(config_dir())
    assert conf.is_absolute()
    assert (conf / "config.yaml").is_file()
    for group in ("task", "model", "experiment"):
        assert any((conf / group).glob("*.yaml")), f"no {group} configs in {conf}"


def test_config_dir_is_the_repository_conf_in_a_checkout():
    assert Path(config_dir()) == REPO / "conf"


def test_pyproject_packages_every_package_folder_and_the_configs():
    setuptools = pytest.importorskip("setuptools")
    cfg = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    found = setuptools.find_namespace_packages(where=str(REPO), include=["ptlab*", "hydra_plugins*"])
    folders = {name for name in found if "__pycache__" not in name} | {"ptlab.conf"}
    listed = set(cfg["packages"])
    assert listed == folders, (
        f"pyproject.toml [tool.setuptools] packages: add {sorted(folders - listed)}, remove {sorted(listed - folders)}"
    )
    assert cfg["package-dir"]["ptlab.conf"] == "conf"
    assert "**/*.yaml" in cfg["package-data"]["ptlab.conf"]


@pytest.mark.slow
def test_wheel_installs_and_runs_a_pipeline_outside_the_repository():
    result = subprocess.run(["bash", str(REPO / ".ci" / "wheel_check.sh")], cwd=REPO, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "wheel_check: OK" in result.stdout

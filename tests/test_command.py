"""The ``ptlab`` command: its console scripts, its help page and its shell completion (bash and zsh)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ptlab.help import user_groups

REPO = Path(__file__).resolve().parent.parent


def _env(bin_dir: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    if bin_dir is not None:
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


@pytest.fixture(scope="module")
def ptlab_bin(tmp_path_factory) -> Path:
    """A ``ptlab`` executable as pip writes one for ``[project.scripts]`` (the same import and call)."""
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, function = scripts["ptlab"].partition(":")
    bin_dir = tmp_path_factory.mktemp("bin")
    script = bin_dir / "ptlab"
    script.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {function}\nsys.exit({function}())\n")
    script.chmod(0o755)
    return bin_dir


def test_console_scripts_name_the_hydra_app_and_the_report():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["ptlab"] == "ptlab.cli:main"
    assert scripts["ptlab-report"] == "ptlab.report.cli:main"
    assert scripts["ptlab-predict"] == "ptlab.predict:main"
    result = subprocess.run(
        [sys.executable, "-m", "ptlab.report", "--help"],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=REPO,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and result.stdout.startswith("usage: ptlab-report ")


def test_help_leads_with_examples_and_lists_only_the_groups_a_user_picks(ptlab_bin: Path, tmp_path: Path):
    result = subprocess.run(
        ["ptlab", "--help"], capture_output=True, text=True, env=_env(ptlab_bin), cwd=tmp_path, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout
    assert "usage: ptlab " in text and "__main__" not in text
    assert text.index("Examples:") < text.index("Groups (group=option):") < text.index("--multirun")
    assert "schema" not in text and "hydra/launcher" not in text
    assert sum(line.startswith("  ptlab") for line in text.splitlines()) >= 3
    groups = user_groups()
    assert {"task", "model", "transfer", "transfer/selection", "experiment"} <= set(groups)
    for group, options in groups.items():
        assert f"  {group} " in text
        assert all(option in text for option in options)
    assert 'eval "$(ptlab -sc install=bash)"' in text


def test_shell_completion_without_a_command_says_how_to_install_it(ptlab_bin: Path, tmp_path: Path):
    result = subprocess.run(
        ["ptlab", "--shell-completion"],
        capture_output=True,
        text=True,
        env=_env(ptlab_bin),
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0 and "Traceback" not in result.stderr
    assert 'eval "$(ptlab -sc install=bash)"' in result.stdout and "bashcompinit" in result.stdout


COMPLETE = """eval "$(ptlab -sc install=bash)"
COMP_LINE='ptlab task=ci'
COMP_POINT=${#COMP_LINE}
COMP_WORDS=(ptlab task=ci)
COMP_CWORD=1
complete -p ptlab
hydra_bash_completion
printf '%s\\n' "${COMPREPLY[@]}"
"""


def test_bash_completion_installs_and_completes_group_options(ptlab_bin: Path, tmp_path: Path):
    result = subprocess.run(
        ["bash", "--norc", "-c", COMPLETE],
        capture_output=True,
        text=True,
        env=_env(ptlab_bin),
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    registered, *candidates = result.stdout.splitlines()
    assert registered.endswith("-F hydra_bash_completion ptlab")
    assert candidates == ["task=cifar10", "task=cifar100"]


ZSH_COMPLETE = """autoload -U +X compinit && compinit -u
autoload -U +X bashcompinit && bashcompinit
eval "$(ptlab -sc install=bash)"
words=(ptlab task=ci)
CURRENT=2
COMP_LINE='ptlab task=ci'
COMP_POINT=${#COMP_LINE}
COMP_CWORD=$((CURRENT - 1))
compgen -o nospace -o default -F hydra_bash_completion -- task=ci
"""


@pytest.mark.skipif(shutil.which("zsh") is None, reason="zsh is not installed")
def test_zsh_completion_through_bashcompinit(ptlab_bin: Path, tmp_path: Path):
    """zsh runs the bash completion through bashcompinit's ``compgen -F`` (in sh emulation), as on a Tab."""
    result = subprocess.run(
        ["zsh", "-f", "-c", ZSH_COMPLETE],
        capture_output=True,
        text=True,
        env=_env(ptlab_bin),
        cwd=tmp_path,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["task=cifar10", "task=cifar100"]

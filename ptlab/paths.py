"""Where ptlab's Hydra configs are, however ptlab was installed.

The configs live at the repository's top-level ``conf/`` and are also packaged into the wheel as
``ptlab/conf`` (pyproject.toml maps the package ``ptlab.conf`` onto ``conf/``). A source checkout or
an editable install (``make venv``) must read the repository's ``conf/``, so that an edited YAML
file takes effect without reinstalling; a wheel or ``pip install .`` has no repository beside the
package and reads its own packaged copy. Standard library only: importing this module is instant.
"""

from __future__ import annotations

import functools
import os
from importlib.resources import files
from pathlib import Path

CONFIG_NAME = "config.yaml"
"""The primary config: a folder without it is not a config folder."""


def _repo_conf() -> Path | None:
    """``conf/`` of the source checkout this module sits in, if it sits in one."""
    root = Path(__file__).resolve().parent.parent
    conf = root / "conf"
    if (root / "pyproject.toml").is_file() and (conf / CONFIG_NAME).is_file():
        return conf
    return None


def _package_conf() -> Path | None:
    """The ``ptlab/conf`` folder installed with the package (a wheel's copy of ``conf/``)."""
    conf = Path(str(files("ptlab").joinpath("conf")))
    return conf if (conf / CONFIG_NAME).is_file() else None


@functools.cache
def config_dir() -> str:
    """Absolute path of the Hydra config folder: the repository's ``conf/`` in a source checkout or
    editable install, else the installed package's ``ptlab/conf`` (found once a process: a grid's theory asks for
    it once a setting)."""
    conf = _repo_conf() or _package_conf()
    if conf is None:
        here = Path(__file__).resolve().parent
        raise FileNotFoundError(
            f"ptlab configs not found: no {CONFIG_NAME} in {here.parent / 'conf'} "
            f"(source checkout) or {here / 'conf'} (installed package); reinstall ptlab"
        )
    return str(conf)


def preset_description(name: str | None) -> str:
    """The leading comment of ``conf/experiment/<name>.yaml`` (what the preset reproduces), as text."""
    if not name:
        return ""
    try:
        text = (Path(config_dir()) / "experiment" / f"{name}.yaml").read_text()
    except OSError:
        return ""
    lines = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        if not line.startswith("# @package"):
            lines.append(line[1:].strip())
    return " ".join(lines).strip()


STORE_TEMPLATES_ENV = "PTLAB_STORE_TEMPLATES"
"""Environment variable: the folder of ptlab's pre-migrated MLflow store templates (default
``$XDG_CACHE_HOME/ptlab/mlflow-stores``, else ``~/.cache/ptlab/mlflow-stores``); ``off`` makes every new store migrate
as MLflow does."""


def store_template_dir() -> Path | None:
    """The folder of the store templates (``ptlab.tracking.store_template`` writes them, the preflight's store check
    reads them); ``None`` when ``PTLAB_STORE_TEMPLATES=off``."""
    chosen = os.environ.get(STORE_TEMPLATES_ENV, "").strip()
    if chosen.lower() == "off":
        return None
    if chosen:
        return Path(chosen).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip() or str(Path.home() / ".cache")
    return Path(cache) / "ptlab" / "mlflow-stores"

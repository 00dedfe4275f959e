"""``ptlab --help``: examples first, then the config groups a user picks (not the internal ``schema/*``).

The page is Hydra's own help (``conf/hydra/help/ptlab.yaml``); its group list comes from the resolver
``${ptlab_groups:}`` registered here, which lists the option files of the config folder, so a new
option shows up without editing the template. Standard library and OmegaConf only: ``--help`` stays fast.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from omegaconf import OmegaConf

from ptlab.paths import config_dir

HIDDEN_GROUPS = ("hydra", "schema")
"""Top-level config folders that are no choice of the user's (Hydra's own, the schemas)."""


def user_groups(conf: str | Path | None = None) -> dict[str, list[str]]:
    """``{group: [option, ...]}`` of every folder of YAML options under ``conf`` (``transfer/selection``
    included), without ``HIDDEN_GROUPS``; sorted."""
    root = Path(conf or config_dir())
    groups: dict[str, list[str]] = {}
    for path in sorted(root.rglob("*.yaml")):
        group = path.parent.relative_to(root).as_posix()
        if group != "." and group.split("/", 1)[0] not in HIDDEN_GROUPS:
            groups.setdefault(group, []).append(path.stem)
    return dict(sorted(groups.items()))


def groups_text(conf: str | Path | None = None) -> str:
    """A line per group, ``  group  option, option, ...``, wrapped at 110 columns under the options."""
    groups = user_groups(conf)
    width = max(map(len, groups), default=0)
    return "\n".join(
        textwrap.fill(
            ", ".join(options),
            110,
            initial_indent=f"  {group:<{width}}  ",
            subsequent_indent=" " * (width + 4),
            break_on_hyphens=False,
        )
        for group, options in groups.items()
    )


if not OmegaConf.has_resolver("ptlab_groups"):
    OmegaConf.register_new_resolver("ptlab_groups", lambda: groups_text())

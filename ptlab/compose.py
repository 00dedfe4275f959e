"""One composer for every place that turns override lists into job configs: the preflight (``ptlab.cli``) and the
batched launcher (``ptlab.pipeline.batched``).

Hydra composes one config per **template**: the override lists that differ only in plain ``key=value`` overrides
(``is_value_override``: a leaf value, not a group choice, not Hydra's) share it. A job is its template with its values
set by ``OmegaConf.update``, which gives what composing with them gives (``tests/test_cli.py`` checks it): a Hydra
composition costs ~0.25 s, setting a value well under a millisecond, and a sweep over 100 values composes once. The
caller gives the composition itself (``load``): the preflight its ``compose`` call, the launcher Hydra's sweep loader.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import DictConfig, OmegaConf, open_dict

from ptlab.config import is_value_override

TemplateKey = tuple[tuple[str, ...], tuple[str, ...]]
"""A template's identity: its sorted non-value override lines and the sorted keys of its value overrides."""


@dataclass
class Job:
    """An override list split against its template: the ``parsed`` overrides, the plain ``values`` among them and
    the template's ``key``; ``config`` is the template's composed config (with its ``hydra`` node)."""

    parsed: list[Override]
    values: list[Override]
    key: TemplateKey
    config: DictConfig
    composed: bool
    """Whether this job's template was composed for it (its first job)."""


class Composer:
    """Templates composed once each by ``load`` (override lines -> the composed config, ``hydra`` node included)."""

    def __init__(self, load: Callable[[list[str]], DictConfig], first: DictConfig | None = None) -> None:
        """``first``: the composed config of the first override list the caller will ask for, when it has it."""
        self.load = load
        self.parser = OverridesParser.create()
        self.probe = first
        self.templates: dict[TemplateKey, DictConfig] = {}
        self.parsed: dict[str, Override] = {}
        self.is_value: dict[str, bool] = {}

    def parse(self, line: str) -> Override:
        """One override, parsed once per distinct text (Hydra's parser costs ~0.1 ms an override)."""
        if line not in self.parsed:
            self.parsed[line] = self.parser.parse_overrides([line])[0]
        return self.parsed[line]

    def key(self, overrides: list[str]) -> tuple[list[Override], list[Override], TemplateKey]:
        """The parsed overrides, the value ones and the template key of ``overrides`` (values judged against the first
        composed config: the key of a leaf does not depend on the group choices of the others)."""
        parsed = [self.parse(line) for line in overrides]
        if self.probe is None:
            self.probe = self.load(list(overrides))
        for override in parsed:
            if override.input_line not in self.is_value:
                self.is_value[override.input_line] = is_value_override(override, self.probe)
        values = [o for o in parsed if self.is_value[o.input_line]]
        value_lines = {o.input_line for o in values}
        key = (
            tuple(sorted(o.input_line for o in parsed if o.input_line not in value_lines)),
            tuple(sorted(o.key_or_group for o in values)),
        )
        return parsed, values, key

    def job(self, overrides: list[str]) -> Job:
        """``overrides`` split against its template, composed on first use (the first list reuses ``first``)."""
        parsed, values, key = self.key(overrides)
        composed = key not in self.templates
        if composed:
            self.templates[key] = self.probe if not self.templates and self.probe is not None else self.load(list(overrides))
        return Job(parsed, values, key, self.templates[key], composed)

    def job_config(self, job: Job) -> DictConfig:
        """The job's config without the ``hydra`` node: a copy of its template's with its values set."""
        config = job.config
        cfg = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        with open_dict(cfg):
            for override in job.values:
                OmegaConf.update(cfg, override.key_or_group, override.value(), merge=True)
        return cfg

"""``python -m ptlab``: the Hydra entry point that runs one pipeline per (multi)run job.

Before Hydra starts, every job's config is composed and validated once (``preflight``), so a bad
value or unknown option stops the whole command with one line naming the key and what is allowed,
before anything trains. This module imports only Hydra, OmegaConf and ptlab's light modules: torch,
Lightning, MLflow, torchvision and timm load inside the job, where they are used, so ``--help`` and a
bad-input error answer in about a second.
"""

from __future__ import annotations

import argparse
import atexit
import difflib
import gc
import itertools
import logging
import math
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import hydra
from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser  # private: the only way to parse argv exactly as @hydra.main will
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

import ptlab.devices  # noqa: F401 - registers the ${ptlab_gpu_count:} resolver the launcher configs use
import ptlab.help  # noqa: F401 - registers the ${ptlab_groups:} resolver of `ptlab --help`
from ptlab.build_checks import write_decoded
from ptlab.checks import check_paths
from ptlab.compose import Composer
from ptlab.config import (
    ConfigError,
    check_gram_cells,
    check_trainer_overrides,
    register_configs,
    validate,
)
from ptlab.context import job_context
from ptlab.distributed import is_global_zero, multirun_safe_strategy
from ptlab.engines.lightning import quiet_lightning
from ptlab.errors import DivergenceError
from ptlab.paths import config_dir
from ptlab.progress import start_line
from ptlab.utils import flatten

if TYPE_CHECKING:
    from ptlab.spec import PipelineSpec

register_configs()

CONFIG_DIR = config_dir()
"""The repository's top-level ``conf/``, or the copy installed with the package (``ptlab/conf``)."""

PREFIXES = {OverrideType.ADD: "+", OverrideType.FORCE_ADD: "++", OverrideType.DEL: "~", OverrideType.CHANGE: ""}


def _single_valued(override: Override, value: str) -> str:
    package = f"@{override.package}" if override.package else ""
    return f"{PREFIXES[override.type]}{override.key_or_group}{package}={value}"


MAX_JOBS_CHECKED = 1000
"""A sweep of up to this many jobs has every job checked by the preflight; a larger one every value of every
swept key once (a job per value, not the whole product)."""


def job_override_sets(overrides: list[str], every_job: bool = False) -> list[list[str]]:
    """Override lists that together use every value of every sweep once; with ``every_job``, one per job of
    the sweep (the product of the swept values, in the order of Hydra's basic sweeper) when it has at most
    ``MAX_JOBS_CHECKED`` jobs."""
    parsed = OverridesParser.create().parse_overrides(overrides)
    fixed = [o.input_line for o in parsed if not o.is_sweep_override()]
    sweeps = [(o, list(o.sweep_string_iterator())) for o in parsed if o.is_sweep_override()]
    if not sweeps:
        return [fixed]
    if every_job and math.prod(len(values) for _, values in sweeps) <= MAX_JOBS_CHECKED:
        return [
            fixed + [_single_valued(o, value) for (o, _), value in zip(sweeps, combination)]
            for combination in itertools.product(*(values for _, values in sweeps))
        ]
    longest = max(len(values) for _, values in sweeps)
    return [fixed + [_single_valued(o, values[min(i, len(values) - 1)]) for o, values in sweeps] for i in range(longest)]


def closest_key(key: str, known: list[str]) -> str:
    """``"; did you mean <key>?"`` for the known key closest to a misspelled one (or nothing)."""
    match = difflib.get_close_matches(key, [k for k in known if k != key], n=1, cutoff=0.6)
    return f"; did you mean {match[0]}?" if match and key not in known else ""


def config_keys(cfg: DictConfig) -> list[str]:
    """Every key of ``cfg``, dotted: the groups (``trainer``) and every leaf (``train.lr``)."""
    leaves = list(flatten(OmegaConf.to_container(cfg, resolve=False)))
    return [*dict.fromkeys(key.split(".", 1)[0] for key in leaves), *leaves]


def describe_error(err: BaseException, known_keys: list[str] | None = None) -> str:
    """One line for a composition or validation error: the key and what is allowed."""
    if isinstance(err, ConfigError):
        return str(err)
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options is not None:
        group, _, option = err.missing_cfg_file.rpartition("/")
        return f"{group}={option} is not an option: choose one of {', '.join(sorted(err.options))}"
    cause = err
    while cause.__cause__ is not None and not isinstance(cause, OmegaConfBaseException):
        cause = cause.__cause__
    if isinstance(cause, OmegaConfBaseException) and getattr(cause, "full_key", None):
        line = f"{cause.full_key}: {str(cause.msg).splitlines()[0]}"
        return line + (closest_key(str(cause.full_key), known_keys) if known_keys else "")
    return " ".join(str(err).split("\n\n")[0].split())


@dataclass(frozen=True)
class ConfigSource:
    """Where Hydra reads the config: the primary folder (``--config-path``), an extra folder searched first
    (``--config-dir``) and the primary config's name (``--config-name``), as ``@hydra.main`` would."""

    primary: str = CONFIG_DIR
    extra: str | None = None
    name: str = "config"

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ConfigSource:
        primary = CONFIG_DIR
        if args.config_path:
            primary = str(
                Path(args.config_path) if Path(args.config_path).is_absolute() else Path(__file__).parent / args.config_path
            )
        extra = None
        if args.config_dir:
            extra = str(Path(args.config_dir).absolute())
            if not Path(extra).is_dir():
                raise ConfigError(f"--config-dir={args.config_dir} is not allowed: no such folder ({extra})")
        return cls(primary, extra, args.config_name or "config")


_SOURCE = [ConfigSource()]
"""The config source ``_compose`` reads (the preflight sets it from the command line)."""


def _compose(overrides: list[str]) -> DictConfig:
    from hydra._internal.hydra import Hydra  # private, as in hydra.initialize_config_dir: --config-dir needs it
    from hydra._internal.utils import create_config_search_path
    from hydra.core.config_search_path import SearchPathQuery

    source = _SOURCE[0]
    GlobalHydra.instance().clear()
    try:
        if source.extra is None:
            with initialize_config_dir(config_dir=source.primary, version_base="1.3"):
                return compose(source.name, overrides=overrides, return_hydra_config=True)
        search_path = create_config_search_path(source.primary)
        search_path.prepend(provider="command-line", path=f"file://{source.extra}", anchor=SearchPathQuery(provider="schema"))
        Hydra.create_main_hydra2(task_name="ptlab", config_search_path=search_path)
        return compose(source.name, overrides=overrides, return_hydra_config=True)
    finally:
        GlobalHydra.instance().clear()


def compose_job(overrides: list[str], multirun: bool = False) -> tuple[DictConfig, str]:
    """The config ``python -m ptlab <overrides>`` would run and the folder Hydra would write it to
    (``hydra.run.dir``, or ``hydra.sweep.dir`` under ``-m``), with HydraConfig set so ``${hydra:...}``
    interpolations resolve."""
    cfg = _compose(overrides)
    HydraConfig().set_config(cfg)
    output_dir = str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg, output_dir


def compose_config(overrides: list[str]) -> DictConfig:
    """The config ``python -m ptlab <overrides>`` would run (for tests, benchmarks and notebooks)."""
    return compose_job(overrides)[0]


def compose_spec(overrides: list[str]) -> PipelineSpec:
    """The spec ``python -m ptlab <overrides>`` would run: ``compose_config`` parsed (``ConfigError`` on a bad value)."""
    from ptlab.spec import parse

    return parse(compose_config(overrides))


def with_preset_sweeps(overrides: list[str]) -> list[str]:
    """``overrides`` plus the sweep a preset declares in ``hydra.sweeper.params`` (the command line
    wins for a key it sets), as Hydra's sweeper combines them under ``-m``."""
    params = _compose(job_override_sets(overrides)[0]).hydra.sweeper.get("params") or {}
    given = {o.key_or_group for o in OverridesParser.create().parse_overrides(overrides)}
    preset = [f"{key}={value}" for key, value in params.items() if key.lstrip("+~") not in given]
    return preset + overrides


def job_configs(
    jobs: list[list[str]], multirun: bool, first_composed: DictConfig | None = None
) -> Iterator[tuple[DictConfig, str]]:
    """``compose_job`` of each override list, through the one composer (``ptlab.compose``: Hydra composes a template
    once, a job sets its plain values on it; the 100 sweep values of kou2023 took about 15 s composed one by one).
    ``first_composed``: ``_compose(jobs[0])`` when the caller has it already."""
    composer = Composer(_compose, first_composed)
    current = None
    for overrides in jobs:
        job = composer.job(overrides)
        if job.config is not current:
            current = job.config
            HydraConfig().set_config(current)
        yield composer.job_config(job), str(current.hydra.sweep.dir if multirun else current.hydra.run.dir)


FREE_FORM_KEYS = ("hydra.", "trainer.", "model.options.", "upstream_model.options.", "transfer.selection.")
"""Where ``+key=value`` may add a key the schema does not list: Lightning's Trainer arguments, a library
model's constructor options, a selection strategy's options (checked when the strategy is built)."""


def check_sweep_flag(parsed: list[Override], multirun: bool) -> None:
    """A swept value (``a=1,2``) needs ``-m``."""
    if multirun:
        return
    for override in parsed:
        if override.is_sweep_override():
            raise ConfigError(
                f"{override.input_line} is a sweep: add -m to run one job per value (a list value "
                f"is written in brackets: {override.key_or_group}=[...])"
            )


def check_added_keys(parsed: list[Override], composed: DictConfig) -> None:
    """``+key=value``/``++key=value`` name a key of the config (or a free-form node, ``FREE_FORM_KEYS``): an added
    misspelled key would be logged as a param and change nothing."""
    added = [
        o
        for o in parsed
        if o.type in (OverrideType.ADD, OverrideType.FORCE_ADD)
        and "/" not in o.key_or_group
        and o.key_or_group not in composed.hydra.runtime.choices
        and not o.key_or_group.startswith(FREE_FORM_KEYS)
    ]
    if not added:
        return
    base = _compose([o.input_line for o in parsed if o not in added and not o.is_sweep_override()])
    known = config_keys(OmegaConf.masked_copy(base, [k for k in base if k != "hydra"]))
    for override in added:
        if override.key_or_group not in known:
            raise ConfigError(
                f"{override.input_line} is not allowed: {override.key_or_group} is not a key of the "
                f"config (+ adds a key, but the schema does not know this one)"
                f"{closest_key(override.key_or_group, known)}"
            )


LAUNCHER_HISTORIES = ("full", "eval", "last")
LAUNCHER_TRACKING = ("auto", "runs", "grid")
LAUNCHER_EXECUTORS = ("pool", "submitit_local", "submitit_slurm")
"""``hydra.launcher.executor`` of ``hydra/launcher=ptlab_gram``: where the chunks train (``pool``: forked workers
here; submitit's local or SLURM executor: one job a chunk; ``ptlab.engines.gram.workers.SUBMITIT_EXECUTORS``)."""
"""``hydra.launcher.history`` and ``hydra.launcher.tracking`` of ``hydra/launcher=ptlab_gram``
(``ptlab.engines.gram.HISTORIES``, ``ptlab.pipeline.batched.TRACKING_LAYOUTS``, which import torch; a test
checks the lists agree)."""


def check_launcher(launcher: DictConfig) -> None:
    """The options of the ptlab_gram launcher (``hydra_plugins.ptlab_gram_launcher``) and joblib's ``n_jobs``."""
    target = str(launcher.get("_target_", ""))

    def check(key: str, ok: bool, allowed: str) -> None:
        if not ok:
            raise ConfigError(f"hydra.launcher.{key}={launcher.get(key)!r} is not allowed: must be {allowed}")

    if target.endswith("PtlabGramLauncher"):
        check("history", launcher.get("history") in LAUNCHER_HISTORIES, "one of " + ", ".join(LAUNCHER_HISTORIES))
        check("tracking", launcher.get("tracking") in LAUNCHER_TRACKING, "one of " + ", ".join(LAUNCHER_TRACKING))
        check("max_cells", launcher.get("max_cells", 1) >= 1, ">= 1 (cells per batched chunk)")
        check("workers", launcher.get("workers") is None or launcher.get("workers") >= 1, "null or >= 1")
        check("grid_threshold", launcher.get("grid_threshold", 0) >= 0, ">= 0")
        check("grid_samples", launcher.get("grid_samples", 0) >= 0, ">= 0")
        check(
            "executor",
            launcher.get("executor", "pool") in LAUNCHER_EXECUTORS,
            "one of " + ", ".join(LAUNCHER_EXECUTORS) + " (where the chunks train)",
        )
        if launcher.get("executor", "pool") != "pool":
            check_submitit_options(launcher.get("submitit") or {})
    elif target.endswith("JoblibLauncher"):
        n_jobs = launcher.get("n_jobs")
        check(
            "n_jobs",
            n_jobs is None or (isinstance(n_jobs, int) and n_jobs != 0),
            "a number of parallel jobs >= 1, or -1 for one per CPU core (-2: all but one)",
        )


def check_submitit_options(options: DictConfig) -> None:
    """``hydra.launcher.submitit.*`` (but ``folder``) are parameters that ``submitit.AutoExecutor.update_parameters``
    takes (checked by submitit itself, on its debug executor in a temporary folder)."""
    import tempfile

    import submitit

    parameters = {
        key: OmegaConf.to_container(options[key], resolve=True) if isinstance(options[key], DictConfig) else options[key]
        for key in options
        if key != "folder"
    }
    with tempfile.TemporaryDirectory() as folder:
        try:
            submitit.AutoExecutor(folder=folder, cluster="debug").update_parameters(**parameters)
        except (NameError, AssertionError, ValueError, TypeError) as err:
            first = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(
                f"hydra.launcher.submitit={parameters} is not allowed: {first} (submitit's "
                "AutoExecutor parameters: timeout_min, cpus_per_task, gpus_per_node, mem_gb, "
                "slurm_partition, ...)"
            ) from None


def grid_templates(sweeps: list[list[str]], first_job: list[str], first: DictConfig) -> Iterator[tuple[DictConfig, list[str]]]:
    """Each template of the sweeps (override lists, sweeps included) as the batched launcher builds them (the one
    composer, ``ptlab.compose``: one per combination of the values of the swept overrides that are not plain values),
    composed once, with the keys of its value overrides; ``first``: the composed ``first_job``."""
    composer = Composer(_compose, first)
    job = composer.job(first_job)
    yield job.config, list(job.key[1])
    for overrides in sweeps:
        parsed = composer.parser.parse_overrides(overrides)
        lines = [
            [_single_valued(o, v) for v in o.sweep_string_iterator()] if o.is_sweep_override() else [o.input_line] for o in parsed
        ]
        plain = [composer.key([values[0]])[2][1] != () for values in lines]  # a plain value: its values share the template
        for combination in itertools.product(*([values[0]] if value else values for values, value in zip(lines, plain))):
            job = composer.job(list(combination))
            if job.composed:
                yield job.config, list(job.key[1])


def check_grid_layout(sweeps: list[list[str]], first_job: list[str], first: DictConfig) -> None:
    """``hydra.launcher.tracking=grid`` takes a sweep whose every template the grid can build its cells from
    (``ptlab.pipeline.sweep_templates.grid_refusal``); refused in one line before anything is written."""
    from ptlab.pipeline.sweep_templates import grid_refusal

    for composed, value_keys in grid_templates(sweeps, first_job, first):
        refusal = grid_refusal(composed, value_keys)
        if refusal is not None:
            raise ConfigError(refusal)


def with_cells(path: str, overrides: list[str], jobs: list[list[str]]) -> tuple[list[list[str]], list[list[str]]]:
    """A sweep of ``hydra.sweeper.cells`` (``PtlabBatchedSweeper``: each cell's jobs crossed with the sweep's): the
    sweeps to check for the grid (each cell with ``overrides``) and the jobs to check: every job of the sweep when
    it has at most ``MAX_JOBS_CHECKED``, else each cell job (each cell's first, above that many) with the first of
    ``jobs`` and each of ``jobs`` with the first cell job."""
    from ptlab.design import DesignError, read_cells

    try:
        cells = read_cells(path)
    except DesignError as err:
        raise ConfigError(str(err)) from None
    given = {line.split("=", 1)[0] for line in jobs[0]}
    expanded = []
    for number, cell in enumerate(cells):
        cell_jobs = job_override_sets(cell, every_job=True)
        clash = {line.split("=", 1)[0] for line in cell_jobs[0]} & given
        if clash:
            raise ConfigError(
                f"hydra.sweeper.cells={path}: cell {number} sets {', '.join(sorted(clash))}, which the "
                "sweep's params or command line set too"
            )
        expanded += cell_jobs
    sweeps = [[*cell, *overrides] for cell in cells]
    if len(expanded) * len(jobs) <= MAX_JOBS_CHECKED:
        return sweeps, [[*cell, *job] for cell in expanded for job in jobs]
    if len(expanded) > MAX_JOBS_CHECKED:  # every cell once (each with the values its own sweeps start from)
        expanded = [job_override_sets(cell)[0] for cell in cells]
    return sweeps, [[*cell, *jobs[0]] for cell in expanded] + [[*expanded[0], *job] for job in jobs[1:]]


def gpu_elsewhere(launcher: DictConfig) -> bool:
    """Whether the gram launcher trains on a cluster's machines (``executor=submitit_slurm``): the GPU that
    ``engine.device=cuda`` needs is checked there, not here."""
    return str(launcher.get("_target_", "")).endswith("PtlabGramLauncher") and launcher.get("executor") == "submitit_slurm"


def preflight(argv: list[str]) -> str | None:
    """Compose and validate the config of every job of ``argv`` (every sweep value, and every job of a sweep
    of up to ``MAX_JOBS_CHECKED``), and check what each builds; the error line, or ``None``."""
    return checked_config(argv)[0]


def checked_config(argv: list[str]) -> tuple[str | None, DictConfig | None]:
    """``preflight``'s error line (or ``None``) and the first job's composed config, with its ``hydra`` node
    (``None`` on an error or for a page such as ``--help``): a single run starts from it (``run_composed``)."""
    args = get_args_parser().parse_args(argv)
    if args.help or args.hydra_help or args.info or args.shell_completion:
        return None, None
    first, accepted = None, False
    try:
        _SOURCE[0] = ConfigSource.from_args(args)
        parser = OverridesParser.create()
        check_sweep_flag(parser.parse_overrides(list(args.overrides)), args.multirun)
        check_trainer_overrides(list(args.overrides))
        overrides = with_preset_sweeps(args.overrides) if args.multirun else list(args.overrides)
        jobs, sweeps = job_override_sets(overrides, every_job=True), [overrides]
        first = _compose(jobs[0])
        cells = first.hydra.sweeper.get("cells") if args.multirun else None
        if cells:
            sweeps, jobs = with_cells(str(cells), overrides, jobs)
            first = _compose(jobs[0])
        check_launcher(first.hydra.launcher)
        check_added_keys(parser.parse_overrides(jobs[0]), first)
        elsewhere = gpu_elsewhere(first.hydra.launcher) if args.multirun else False
        batched = args.multirun and str(first.hydra.launcher.get("_target_", "")).endswith("PtlabGramLauncher")
        if batched and first.hydra.launcher.get("tracking") == "grid":
            check_grid_layout(sweeps, jobs[0], first)
        for cfg, output_dir in job_configs(jobs, args.multirun, first):
            validate(cfg)
            if batched and cfg.engine.get("name") == "gram" and cfg.task.name == "synthetic":
                check_gram_cells(cfg)  # the batched sweep trains gram cells (what a single gram run allows may not be)
            check_paths(
                cfg, output_dir, output_key="hydra.sweep.dir" if args.multirun else "hydra.run.dir", gpu_elsewhere=elsewhere
            )
        accepted = True
    except OverrideParseException as err:
        return f"could not read the overrides: {str(err).splitlines()[0]}", None
    except (HydraException, OmegaConfBaseException, ConfigError) as err:
        return describe_error(err, _default_keys()), None
    finally:
        _SOURCE[0] = ConfigSource()  # compose_config and the next preflight read the repository's conf/ again
        write_decoded(accepted)  # what the image checks decoded is remembered only for an accepted command
    return None, first


def _default_keys() -> list[str]:
    """The keys of the default config (for suggestions); empty when even that does not compose."""
    try:
        return config_keys(compose_config([]))
    except (HydraException, OmegaConfBaseException):
        return []


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def hydra_main(cfg: DictConfig) -> float | None:
    """Run the pipeline of the composed config; returns the transfer test accuracy (for sweepers)."""
    logging.getLogger("ptlab").info(start_line(cfg))  # before torch loads: the job's first sign of life
    from ptlab.processes import bind_sweep_worker, exit_quietly_on_stop

    bind_sweep_worker()
    from ptlab.tracking.background import discard_warm, warm_up

    context = job_context()
    if is_global_zero():  # MLflow loads in a helper process while torch loads here
        warm_up(
            cfg.logger.kind,
            cfg.task.name,
            context.multirun,
            cfg.resume.skip_finished,
            cfg.logger.tracking_uri,
            cfg.logger.sqlite_wal,
        )
    from ptlab.pipeline.run import run_pipeline  # torch (and Lightning for its engine) load here
    from ptlab.tracking.faults import Terminated

    quiet_lightning()
    notice = multirun_safe_strategy(cfg, context.multirun)
    if notice:
        print(notice, file=sys.stderr)
    try:
        summary = run_pipeline(cfg, context.output_dir or Path.cwd(), context)
    except (ConfigError, DivergenceError) as err:
        raise SystemExit(f"ptlab: {err}") from None
    except Terminated as err:
        print(f"ptlab: stopped by {err}; its MLflow runs are marked KILLED", file=sys.stderr)
        exit_quietly_on_stop()
        raise SystemExit(err.exit_code) from None
    except KeyboardInterrupt:
        print("ptlab: stopped by SIGINT (Ctrl-C); its MLflow runs are marked KILLED", file=sys.stderr)
        exit_quietly_on_stop()
        raise SystemExit(130) from None
    finally:
        discard_warm()
    best = summary.get("transfer") or summary.get("scratch")
    return best["test_acc"] if best else None


COMPLETION_HELP = """ptlab: --shell-completion needs a command: install=bash, uninstall=bash or query=bash
  bash: eval "$(ptlab -sc install=bash)"   (add the line to ~/.bashrc to keep it)
  zsh:  autoload -U bashcompinit && bashcompinit && eval "$(ptlab -sc install=bash)"   (in ~/.zshrc)"""


def _as_ptlab_command(argv: list[str]) -> int | None:
    """Name the program ``ptlab`` in Hydra's help and completion (``python -m ptlab`` would say
    ``__main__.py`` and bind completion to ``python``); 0 after printing how to install completion when
    ``--shell-completion`` has no command (Hydra raises a traceback there); else ``None``."""
    args = get_args_parser().parse_args(argv)
    if not (args.help or args.hydra_help or args.shell_completion):
        return None
    sys.argv[0] = "ptlab"  # only these pages: a run keeps argv for Lightning's DDP re-launch
    if args.shell_completion and not any(o.partition("=")[0] in ("install", "uninstall", "query") for o in args.overrides):
        print(COMPLETION_HELP)
        return 0
    return None


def runs_composed(argv: list[str], composed: DictConfig | None) -> bool:
    """Whether ``argv`` is one plain run (no ``-m``, no page such as ``--cfg``, the default config source) that
    ``run_composed`` can start from the preflight's config."""
    args = get_args_parser().parse_args(argv)
    plain = not (
        args.multirun
        or args.cfg
        or args.info
        or args.resolve
        or args.package
        or args.experimental_rerun
        or args.config_path
        or args.config_dir
        or args.config_name
    )
    return plain and composed is not None and composed.hydra.mode in (None, RunMode.RUN)


def run_composed(cfg: DictConfig) -> None:
    """Run the job of the preflight's composed config as ``@hydra.main`` runs one (``Hydra.run``: its callbacks,
    then ``run_job``: the run folder, ``.hydra/``, the job's logging), without composing the config twice more
    (``@hydra.main`` composes it to read ``hydra.mode``, then again to run it: about 0.3 s each)."""
    from hydra._internal.callbacks import Callbacks  # private, as Hydra.run builds them
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path, run_and_report
    from hydra.core.utils import configure_log, run_job
    from hydra.types import HydraContext

    def run() -> None:
        GlobalHydra.instance().clear()
        hydra = Hydra.create_main_hydra2(task_name="ptlab", config_search_path=create_config_search_path(CONFIG_DIR))
        try:
            configure_log(cfg.hydra.hydra_logging, cfg.hydra.verbose)
            if cfg.hydra.mode is None:  # recorded in .hydra/hydra.yaml as @hydra.main records it
                with read_write(cfg.hydra):
                    cfg.hydra.mode = RunMode.RUN
                    cfg.hydra.overrides.hydra.append("hydra.mode=RUN")
            callbacks = Callbacks(cfg)
            callbacks.on_run_start(config=cfg, config_name="config")
            ret = run_job(
                hydra_context=HydraContext(config_loader=hydra.config_loader, callbacks=callbacks),
                task_function=hydra_main.__wrapped__,
                config=cfg,
                job_dir_key="hydra.run.dir",
                job_subdir_key=None,
                configure_logging=True,
            )
            callbacks.on_run_end(config=cfg, config_name="config", job_return=ret)
            _ = ret.return_value  # raises the job's exception, as Hydra.run does
        finally:
            GlobalHydra.instance().clear()

    run_and_report(run)


_EXIT_FROZEN: list[bool] = []
"""Whether ``main`` registered ``gc.freeze`` to run at exit (once a process)."""


def main() -> None:
    """``ptlab [-m] [overrides]`` (also ``python -m ptlab``): preflight, then Hydra (a plain run starts from the
    preflight's composed config: ``run_composed``)."""
    if not _EXIT_FROZEN:
        _EXIT_FROZEN.append(True)
        atexit.register(gc.freeze)  # at exit, Python's last collections need not walk torch's objects (0.3-1 s)
    if _as_ptlab_command(sys.argv[1:]) == 0:
        return
    error, composed = checked_config(sys.argv[1:])
    if error:
        print(f"ptlab: {error}", file=sys.stderr)
        raise SystemExit(2)
    if not any(arg in ("-m", "--multirun") for arg in sys.argv[1:]):
        if runs_composed(sys.argv[1:], composed):
            run_composed(composed)
        else:
            hydra_main()
        return
    from ptlab.errors import Terminated
    from ptlab.processes import SWEEP_PID_ENV, forward_stop_signals

    os.environ[SWEEP_PID_ENV] = str(os.getpid())  # the sweep's workers die with this process

    status = "FINISHED"  # the sweep's answer run ends as the sweep did
    try:
        with forward_stop_signals():
            hydra_main()
    except Terminated as err:
        status = "KILLED"
        print(f"ptlab: sweep stopped by {err}; its workers were stopped and their runs marked KILLED", file=sys.stderr)
        raise SystemExit(err.exit_code) from None
    except SystemExit as err:
        if err.code == 2:  # the launcher refused the sweep before it ran a job: nothing to answer, nothing to log
            from ptlab.sweep_summary import SweepSummary

            SweepSummary.started.clear()
        if err.code not in (0, None):
            status = "FAILED"
        raise
    except BaseException as err:
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        raise
    finally:
        print_sweep_answers(status)


def print_sweep_answers(status: str = "FINISHED") -> None:
    """Each sweep this process ran ends with its answer (``ptlab.sweep_summary``), whatever its outcome; the answer's
    run ends with ``status`` (the sweep's: KILLED after a stop signal, FAILED after an error)."""
    from ptlab.sweep_summary import SweepSummary, log_answer, sweep_answer

    while SweepSummary.started:
        sweep_dir, tracking_uri, experiment = SweepSummary.started.pop(0)
        if not sweep_dir.is_dir():
            continue
        print(sweep_answer(sweep_dir, tracking_uri, experiment))
        if tracking_uri and experiment:
            try:
                log_answer(sweep_dir, tracking_uri, experiment, status)
            except Exception as err:  # the table is printed and in the sweep dir; the store may be what failed
                print(f"ptlab: the sweep's table was not logged to MLflow: {str(err).splitlines()[0]}", file=sys.stderr)


__all__ = ["CONFIG_DIR", "compose_config", "hydra_main", "main", "preflight"]

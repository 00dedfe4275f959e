"""A whole Hydra sweep of ``engine=gram`` synthetic pipelines in one process (the ``ptlab_gram`` launcher).

The launcher turns overrides into jobs and picks a recorder; the driver (``ptlab.pipeline.driver.drive``) does the
rest, as for a single run. Every job is tracked by the same code as ``run_pipeline`` (``ptlab.pipeline.record``): its sweep
subdir with ``summary.json`` (and ``.hydra/config.yaml``, ``overrides.yaml``), a FINISHED MLflow parent
run with the resolved config as params, ``config.yaml``/``summary.json`` artifacts, the theory's
prediction and the final metrics, and a child run per stage with its curves and the transfer plan.
One artifact is skipped: ``decomposition.png`` (0.25 s a cell to draw, longer than the cell's
training; the curves it draws are in every child run). What changes is the cost:

- Composition (``ptlab.compose``, the preflight's composer too): Hydra composes one job per distinct set of group
  choices (a template, ~0.3 s); each
  distinct ``key=value`` override is applied and validated once with OmegaConf, and a job is the
  template's resolved container with its values set (about 5 ms a job instead of ~250 ms).
- Training: all cells run through ``GramEngine.run`` (``iter_chunks``), batched by shape, in
  single-threaded worker processes (``workers``, default: torch's thread count).
- Tracking: pipelines are recorded in a ``MemoryTracker`` and written per chunk by ``run_writer``'s writer (direct
  SQL rows into a local SQLite store, MLflow's public client into any other). ``history``
  sets how many curve points go to MLflow: ``full`` (every point, as a single run logs them), ``eval``
  (the eval steps) or ``last`` (the last point of every curve: same metric names, one point each).

Jobs that are not ``engine=gram`` synthetic pipelines run one by one as Hydra's basic launcher runs them.

**Executors** (``hydra.launcher.executor``): the chunks train in forked workers here (``pool``), or as submitit jobs,
one a chunk, on this machine (``submitit_local``) or a SLURM cluster (``submitit_slurm``); only the training moves:
composition, tracking and the sweep's files stay in this process, so the numbers and the runs are the pool's
(docs/scaling.md). A chunk trains on its cells' ``engine.device``.

**Grid layout** (``hydra.launcher.tracking``: ``auto``, ``runs`` or ``grid``). A run per cell stops scaling
at a few thousand cells (a parent and three children, a Hydra subdir and a ``summary.json`` each). Above
``grid_threshold`` cells (``auto``; ``grid`` forces it, ``runs`` forbids it) the sweep is recorded as one
MLflow parent run for the grid (tagged ``ptlab.stage=grid``) holding ``results.parquet``: one row per
cell with the columns ``ptlab.report.load_pipelines`` returns for a run per cell (``params.*`` as the
strings MLflow stores, the parent's final ``metrics.*``, ``tags.ptlab.seed``, ``tags.ptlab.cell``) and
``grid_heatmap.png`` (the final test accuracy over the two most-swept keys, ``ptlab.pipeline.grid_figure``), plus
``grid_samples`` sampled cells recorded in full (a pipeline run with its stage children and full curves,
tagged ``ptlab.stage=grid_sample`` under the grid run). Cells are built from the job's value overrides
without a config per job (each distinct override value is applied and validated once and changes its
``GramCell`` fields). Each row carries the theory's params and metrics (computed once per config minus the seed);
``summaries.jsonl`` holds each finished cell's ``summary.json`` (the single run's, ``pipeline_summary``); cells that
a grid run of the experiment already holds are skipped (``resume.skip_finished``); the sweep dir gets the table,
the summaries and the heatmap too.

**Failures** are the single run's: a cell whose loss is not finite (``GramResult.divergence``) is tracked FAILED in
the run-per-cell layout (``record_trained`` raises where its stage starts) and listed in ``failures.json`` in the
grid layout (whose run then ends FAILED); the other cells are kept, and the sweep ends with the first error's line
and exit 1 (``raise_failures``).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from hydra._internal.config_loader_impl import get_overrides_dirname  # private: how Hydra names a job's overrides
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.types import Override
from hydra.core.utils import JobReturn, JobStatus, filter_overrides, run_job
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from tqdm import tqdm

from ptlab.compose import Composer
from ptlab.config import ConfigError, validate
from ptlab.engines.base import PipelineJob, PipelineResult
from ptlab.engines.gram import HISTORIES, GramCell, GramEngine
from ptlab.engines.gram.batching import ChunkMap
from ptlab.engines.gram.workers import submitit_map
from ptlab.errors import DivergenceError
from ptlab.pipeline.driver import drive
from ptlab.pipeline.grid_figure import FIGURE as GRID_FIGURE
from ptlab.pipeline.grid_figure import grid_heatmap
from ptlab.pipeline.record import (
    cell_name,
    final_metrics,
    open_pipeline,
    pipeline_summary,
    pipeline_tags,
    record_pipeline,
    record_trained,
    theory_fields,
    used_params,
)
from ptlab.pipeline.resume import finished_runs, finished_summary, hash_resolved, should_skip_finished
from ptlab.pipeline.sweep_templates import GridRefused, grid_refusal, node_aliases, per_job_value
from ptlab.pipeline.transferability import record_scores
from ptlab.spec import PipelineSpec, from_resolved, parse, schema_types
from ptlab.theory import TheoryPrediction, predict_from_spec
from ptlab.tracking.base import GRID_KEY_TAG, PARENT_RUN_TAG, STAGE_TAG, MemoryTracker, NullTracker
from ptlab.tracking.bulk import RunWriter, run_writer
from ptlab.tracking.faults import prepare_sqlite_store
from ptlab.tracking.grid import RESULTS, grid_rows
from ptlab.tracking.mlflow import resolve_tracking_uri
from ptlab.utils import flatten

log = logging.getLogger(__name__)


@dataclass
class SweepJob:
    """One job of the sweep: where it writes, what it is, and (once run) what it returned."""

    index: int
    overrides: list[str]
    output_dir: Path
    run_name: str
    choices: dict[str, str]
    resolved: dict[str, Any]
    cell: GramCell
    digest: str
    tracker: MemoryTracker | None = None
    writer: RunWriter | None = None
    theory: TheoryPrediction | None = None
    summary: dict[str, Any] | None = None
    error: DivergenceError | None = None
    written: bool = False
    spec: PipelineSpec | None = None
    yaml_text: str = ""


def _set_leaf(container: dict[str, Any], key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    for part in parents:
        container = container[part]
    container[leaf] = value


TRACKING_LAYOUTS = ("auto", "runs", "grid")
"""``hydra.launcher.tracking``: a run per cell below ``grid_threshold`` cells and the grid layout above (auto)."""
SUMMARIES = "summaries.jsonl"
"""The grid run's summaries: a line per finished cell, its ``summary.json`` (``_grid_summaries``)."""
FAILURES = "failures.json"
"""The grid run's failed cells: job, cell name and the error line."""


class _Template:
    """A fully composed job config; its jobs differ from it only in plain value overrides.

    Each distinct override value is applied once with OmegaConf (type conversion) and validated once;
    a job is then the template's resolved container with its values set. That shortcut needs values
    that no interpolation reads and a plain ``hydra.job.num`` subdir; other templates take the slow
    path (OmegaConf update, resolve and validate per job)."""

    PLACEHOLDER = "ptlab_value_{}_placeholder"

    def __init__(self, config: DictConfig, value_keys: tuple[str, ...]) -> None:
        self.config = config
        self.task = OmegaConf.masked_copy(config, [k for k in config if k != "hydra"])
        HydraConfig.instance().set_config(config)
        hydra = config.hydra
        self.choices = {k: str(v) for k, v in hydra.runtime.choices.items() if not k.startswith("hydra") and "schema" not in k}
        self.value_keys = value_keys
        self.sweep_dir = Path(str(hydra.sweep.dir)).absolute()
        self.aliases = dict(node_aliases(OmegaConf.to_container(self.task, resolve=False)))
        self.fast = per_job_value(config, value_keys) is None
        self.skip_finished = should_skip_finished(self.task.resume, self.task.logger, multirun=True)
        self.types = schema_types(self.task)
        self.values: dict[str, tuple[Any, str]] = {}
        self.changes: dict[str, dict[str, Any]] = {}
        self.base_cell: GramCell | None = None
        if self.fast:
            validate(self.task)
            self.resolved = OmegaConf.to_container(self.task, resolve=True)
            marked = copy.deepcopy(self.resolved)
            for i, key in enumerate(value_keys):
                self._set(marked, key, self.PLACEHOLDER.format(i))
            self.yaml = _dump_yaml(marked)

    @functools.cached_property
    def digest(self) -> str:
        """The config hash of the template itself (fast templates only)."""
        return hash_resolved(self.resolved)

    def _set(self, container: dict[str, Any], key: str, value: Any) -> None:
        """Set ``key`` in a resolved container, and its copies under nodes that alias one above it
        (``upstream_model: ${model}`` copies ``model.width``)."""
        _set_leaf(container, key, value)
        for alias, target in self.aliases.items():
            if key == target or key.startswith(f"{target}."):
                _set_leaf(container, alias + key[len(target) :], value)

    def value(self, override: Override) -> tuple[Any, str]:
        """An override's value as OmegaConf converts it (validated in the template) and as YAML text."""
        line = override.input_line
        if line not in self.values:
            key = override.key_or_group
            with read_write(self.task), open_dict(self.task):
                OmegaConf.update(self.task, key, override.value(), merge=True)
            validate(self.task)
            value = OmegaConf.select(self.task, key)
            self.values[line] = (value, _dump_yaml(value).removesuffix("\n").removesuffix("\n...").strip())
        return self.values[line]

    def spec(self, resolved: dict[str, Any]) -> PipelineSpec:
        """The spec of a resolved job config of this template (its values validated by ``value``)."""
        return from_resolved(resolved, self.types)

    def job(self, index: int, parsed: list[Override], values: list[Override]) -> tuple[PipelineSpec, Path, str]:
        """Job ``index``: its spec, output dir and run name."""
        if self.fast:
            resolved = copy.deepcopy(self.resolved)
            for override in values:
                self._set(resolved, override.key_or_group, self.value(override)[0])
            spec = self.spec(resolved)
            output_dir = self.sweep_dir / str(index)
        else:
            with read_write(self.task), open_dict(self.task):
                for override in values:
                    OmegaConf.update(self.task, override.key_or_group, override.value(), merge=True)
            hydra = self.config.hydra
            with read_write(hydra), open_dict(hydra):  # the job's own hydra values, as Hydra's launcher and run_job set
                hydra.job.num = hydra.job.id = index
                task = [o for o in parsed if not o.is_hydra_override()]
                hydra.overrides.task = [o.input_line for o in task]
                naming = hydra.job.config.override_dirname
                hydra.job.override_dirname = get_overrides_dirname(
                    task, list(naming.exclude_keys), naming.item_sep, naming.kv_sep
                )
                output_dir = Path(str(hydra.sweep.dir), str(OmegaConf.select(self.config, "hydra.sweep.subdir"))).absolute()
                hydra.runtime.output_dir = str(output_dir)
            HydraConfig.instance().set_config(self.config)  # a copy: ${hydra:...} reads the job's values from there
            spec = parse(self.task)
        return spec, output_dir, cell_name([o.input_line for o in parsed], spec.seed)

    def cell(self, values: list[Override]) -> GramCell:
        """A job's ``GramCell`` without its config (fast templates only): the template's cell with the fields each
        value override changes (worked out, and validated, once per distinct override)."""
        if self.base_cell is None:
            self.base_cell = GramCell.from_spec(self.spec(self.resolved))
        changes: dict[str, Any] = {}
        for override in values:
            line = override.input_line
            if line not in self.changes:
                resolved = copy.deepcopy(self.resolved)
                self._set(resolved, override.key_or_group, self.value(override)[0])
                cell = GramCell.from_spec(self.spec(resolved))
                self.changes[line] = {
                    f.name: getattr(cell, f.name)
                    for f in dataclasses.fields(cell)
                    if f.compare and getattr(cell, f.name) != getattr(self.base_cell, f.name)
                }
            changes.update(self.changes[line])
        return dataclasses.replace(self.base_cell, **changes) if changes else self.base_cell

    def yaml_text(self, resolved: dict[str, Any], values: list[Override]) -> str:
        """``resolved`` as YAML (from the template's text on the fast path)."""
        if not self.fast:
            return _dump_yaml(resolved)
        by_key = {o.key_or_group: self.value(o)[1] for o in values}
        text = self.yaml
        for i, key in enumerate(self.value_keys):
            text = text.replace(self.PLACEHOLDER.format(i), by_key[key])
        return text


def _dump_yaml(data: Any) -> str:
    return yaml.dump(
        data, Dumper=getattr(yaml, "CSafeDumper", yaml.SafeDumper), sort_keys=False, default_flow_style=False, allow_unicode=True
    )


def track_pipeline(job: SweepJob, result: PipelineResult) -> dict[str, Any] | None:
    """Hand one trained cell to ``record_pipeline`` (as a single run's recorder does) and write its Hydra files; a
    cell with a diverged stage is tracked FAILED with the single run's error, and has no summary."""
    tracker = job.tracker if job.tracker is not None else NullTracker()
    summary = None
    try:
        with tracker:
            record_trained(tracker, result.stages, result.error)
            extra = {"transferability": record_scores(tracker, result.scores)} if result.scores is not None else None
            summary = record_pipeline(tracker, result.stages, job.output_dir, job.cell.seed, job.choices, job.theory, extra)
    except DivergenceError:
        pass
    write_hydra_files(job)
    return summary


def write_hydra_files(job: SweepJob) -> None:
    """The job dir's ``.hydra/config.yaml`` and ``overrides.yaml``, as Hydra writes them for a job it runs (a job
    skipped as finished gets them too: the sweep dir then describes this sweep, not an earlier one)."""
    hydra_dir = job.output_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    config_yaml = job.tracker.artifact_text("config.yaml") if job.tracker is not None else _dump_yaml(job.resolved)
    (hydra_dir / "config.yaml").write_text(config_yaml)
    (hydra_dir / "overrides.yaml").write_text(_dump_yaml(job.overrides))


class RunsRecorder:
    """The batched sweep's ``Recorder``: a run per cell, recorded in a ``MemoryTracker`` and written a chunk at a time
    by its store's ``RunWriter``; a job whose config the store holds FINISHED gets that run's summary (resume)."""

    def __init__(
        self, jobs: list[SweepJob], returns: dict[int, JobReturn], progress: Any = None, tags: dict[str, str] | None = None
    ) -> None:
        self.jobs, self.returns, self.progress, self.tags = jobs, returns, progress, tags or {}
        self.batch: list[SweepJob] = []

    def finished(self, index: int) -> bool:
        job = self.jobs[index]
        if job.summary is None:
            return False
        job.output_dir.mkdir(parents=True, exist_ok=True)
        (job.output_dir / "summary.json").write_text(json.dumps(job.summary, indent=2))
        write_hydra_files(job)
        self.returns[job.index] = _return(job, JobStatus.COMPLETED, _best(job.summary))
        return True

    def open(self, index: int) -> None:
        job = self.jobs[index]
        job.theory = predict_from_spec(job.spec)
        if job.writer is not None:
            job.tracker = job.writer.tracker(job.run_name, pipeline_tags(job.resolved["seed"], job.digest, job.choices))
            open_pipeline(job.tracker, used_params(job.resolved), job.yaml_text, job.theory)

    def record(self, index: int, result: PipelineResult) -> None:
        job = self.jobs[index]
        job.summary = track_pipeline(job, result)
        job.error = result.error
        failed = job.error is not None
        status = JobStatus.FAILED if failed else JobStatus.COMPLETED
        self.returns[job.index] = _return(job, status, job.error if failed else _best(job.summary))
        if job.tracker is not None and self.tags:
            job.tracker.set_tags(self.tags)
        self.batch.append(job)

    def flush(self) -> None:
        by_writer: dict[int, tuple[RunWriter, list[MemoryTracker]]] = {}
        for job in self.batch:
            if job.tracker is not None:
                by_writer.setdefault(id(job.writer), (job.writer, []))[1].append(job.tracker)
        for writer, trackers in by_writer.values():
            writer.write(trackers)
        for job in self.batch:
            job.written = True
        if self.progress is not None:
            self.progress.update(len(self.batch))
        self.batch = []

    def abandon(self, status: str) -> None:
        """End the runs of the jobs a stopped sweep did not write (where the store already holds them)."""
        by_writer: dict[int, tuple[RunWriter, list[MemoryTracker]]] = {}
        for job in self.jobs:
            if job.tracker is not None and not job.written:
                by_writer.setdefault(id(job.writer), (job.writer, []))[1].append(job.tracker)
        for writer, trackers in by_writer.values():
            writer.abandon(trackers, status)

    def close(self) -> None:
        return None


def _return(job: SweepJob, status: JobStatus, value: Any) -> JobReturn:
    ret = JobReturn(overrides=job.overrides, working_dir=str(Path.cwd()), task_name="ptlab", status=status)
    ret.return_value = value
    return ret


class _Jobs:
    """Job configs of a sweep through the one composer (``ptlab.compose``: one Hydra composition per template, the
    rest by value overrides), each template wrapped once in a ``_Template``."""

    def __init__(self, hydra_context: HydraContext, config: DictConfig) -> None:
        self.composer = Composer(lambda overrides: hydra_context.config_loader.load_sweep_config(config, overrides))
        self.templates: dict[tuple, _Template] = {}
        self.current: _Template | None = None

    def template(self, overrides: list[str]) -> tuple[_Template, list[Override], list[Override]]:
        """The template of ``overrides`` (composed on first use), the parsed overrides and the value ones."""
        job = self.composer.job(overrides)
        if job.key not in self.templates:
            self.templates[job.key] = _Template(job.config, job.key[1])
            self.current = self.templates[job.key]
        template = self.templates[job.key]
        if template is not self.current:
            HydraConfig.instance().set_config(template.config)
            self.current = template
        return template, job.parsed, job.values


def _build_job(
    template: _Template,
    index: int,
    overrides: list[str],
    parsed: list[Override],
    values: list[Override],
    writers: dict[tuple, RunWriter],
    finished: dict[tuple, dict[str, Any]],
) -> SweepJob:
    """One job: its spec, cell and store writer, or (resume) the summary of the FINISHED run of its config."""
    spec, output_dir, run_name = template.job(index, parsed, values)
    resolved = dict(spec.resolved)
    job = SweepJob(
        index, overrides, output_dir, run_name, template.choices, resolved, GramCell.from_spec(spec), hash_resolved(resolved)
    )
    job.spec = spec
    logger = resolved["logger"]
    if logger["kind"] == "none":
        return job
    key = (logger["tracking_uri"], logger["experiment_name"], logger.get("artifact_location"))
    if key not in writers:
        uri = resolve_tracking_uri(logger["tracking_uri"])
        if logger.get("sqlite_wal", True):
            prepare_sqlite_store(uri)
        writers[key] = run_writer(uri, logger["experiment_name"], logger.get("artifact_location"))
        finished[key] = finished_runs(uri, logger["experiment_name"])
    run = finished[key].get(job.digest) if template.skip_finished else None
    if run is not None:
        job.summary = finished_summary(logger["tracking_uri"], run)
        return job
    job.writer = writers[key]
    job.yaml_text = template.yaml_text(resolved, values)
    return job


def launch_batched(
    hydra_context: HydraContext,
    task_function: TaskFunction,
    config: DictConfig,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
    max_cells: int = 60,
    history: str = "last",
    progress: bool = True,
    workers: int | None = None,
    tracking: str = "auto",
    grid_threshold: int = 2000,
    grid_samples: int = 5,
    executor: str = "pool",
    submitit: dict[str, Any] | None = None,
) -> list[JobReturn]:
    """Run the jobs of one sweep batch: ``engine=gram`` synthetic ones batched, the others one by one; above
    ``grid_threshold`` jobs (or with ``tracking=grid``) in the grid layout (module docstring); the chunks train where
    ``executor`` says (``chunk_map``)."""
    if history not in HISTORIES:
        raise ConfigError(f"hydra.launcher.history={history!r} is not allowed: must be one of {', '.join(HISTORIES)}")
    if tracking not in TRACKING_LAYOUTS:
        raise ConfigError(f"hydra.launcher.tracking={tracking!r} is not allowed: must be one of {', '.join(TRACKING_LAYOUTS)}")
    if tracking == "grid" or (tracking == "auto" and len(job_overrides) > grid_threshold):
        try:
            return launch_grid(
                hydra_context,
                config,
                job_overrides,
                initial_job_idx,
                max_cells,
                progress,
                workers,
                grid_samples,
                executor,
                submitit,
            )
        except GridRefused as err:  # raised before anything is written; auto then takes a run per cell
            if tracking == "grid":
                raise
            log.info("ptlab: a run per cell: %s", err)
    started = time.perf_counter()
    composer = _Jobs(hydra_context, config)
    writers: dict[tuple, RunWriter] = {}
    finished: dict[tuple, dict[str, Any]] = {}
    jobs: list[SweepJob] = []
    others: list[tuple[int, list[str]]] = []
    returns: dict[int, JobReturn] = {}
    for offset, overrides in enumerate(job_overrides):
        index, overrides = initial_job_idx + offset, list(overrides)
        template, parsed, values = composer.template(overrides)
        if OmegaConf.select(template.task, "engine.name") != "gram" or template.task.task.name != "synthetic":
            others.append((index, overrides))
            continue
        jobs.append(_build_job(template, index, overrides, parsed, values, writers, finished))
    composed = time.perf_counter()
    skipped = sum(job.summary is not None for job in jobs)
    if skipped:
        print(f"ptlab: skipped {skipped} of {len(job_overrides)} jobs: their config already FINISHED (resume.skip_finished)")
    for index, overrides in others:  # one by one, as Hydra's basic launcher runs them
        returns[index] = _run_basic(hydra_context, task_function, config, index, overrides)
    pending = len(jobs) - skipped
    with tqdm(total=pending, desc="gram sweep", unit="cell", disable=True if not progress or not pending else None) as bar:
        cells = [job.cell for job in jobs if job.summary is None]
        drive(
            [PipelineJob(job.spec, cell=job.cell) for job in jobs],
            GramEngine(),
            RunsRecorder(jobs, returns, bar),
            history=history,
            max_cells=max_cells,
            workers=torch.get_num_threads() if workers is None else workers,
            chunk_map=chunk_map(executor, submitit or {}, cells),
        )
    if pending:
        log.info(
            "ptlab gram sweep: %d cells in %.1f s (configs %.1f s)", pending, time.perf_counter() - started, composed - started
        )
    return [returns[initial_job_idx + offset] for offset in range(len(job_overrides))]


def _best(summary: dict[str, Any]) -> float | None:
    best = summary.get("transfer") or summary.get("scratch")
    return best["test_acc"] if isinstance(best, dict) and "test_acc" in best else None


def _run_basic(
    hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig, index: int, overrides: list[str]
) -> JobReturn:
    """One job as Hydra's ``BasicLauncher`` runs it."""
    log.info("\t#%d : %s", index, " ".join(filter_overrides(overrides)))
    sweep_config = hydra_context.config_loader.load_sweep_config(config, overrides)
    with open_dict(sweep_config):
        sweep_config.hydra.job.id = index
        sweep_config.hydra.job.num = index
    return run_job(
        hydra_context=hydra_context,
        task_function=task_function,
        config=sweep_config,
        job_dir_key="hydra.sweep.dir",
        job_subdir_key="hydra.sweep.subdir",
    )


def _grid_job(composer: _Jobs, overrides: list[str], checked: set[int]) -> tuple[_Template, list[Override], list[Override]]:
    """The template and overrides of a grid job; ``GridRefused`` when the grid layout cannot take it (checked once
    per template: ``checked`` holds the ids of those that passed)."""
    template, parsed, values = composer.template(overrides)
    if id(template) in checked:
        return template, parsed, values
    refusal = grid_refusal(template.config, template.value_keys)
    if refusal is not None:
        raise GridRefused(refusal)
    checked.add(id(template))
    return template, parsed, values


@dataclass
class GridCell:
    """One job of a grid sweep: its template, value overrides, name, cell and (once known) theory and outcome."""

    position: int
    template: _Template
    values: list[Override]
    name: str
    cell: GramCell
    key: str
    overrides: list[str]
    theory: TheoryPrediction | None = None
    outcome: PipelineResult | None = None


GRID_HISTORY = "last"
"""The curve points a grid cell keeps (none cross back but the finals): its cells train for this history."""


def grid_finals(result: PipelineResult) -> dict[str, float]:
    """A grid row's final metrics: the parent run's (``record.final_metrics``) and its ``transferability/*`` scores."""
    scores = {f"transferability/{k}": v for k, v in (result.scores or {}).items() if k != "samples"}
    return {**final_metrics(result.stages), **scores}


def grid_extra(result: PipelineResult) -> dict[str, Any] | None:
    """The summary's ``transferability`` entry, when the cell has scores."""
    return None if result.scores is None else {"transferability": result.scores}


@dataclass
class GridSweep:
    """A grid sweep as its recorder writes it: its jobs (``composer``'s, from ``job_overrides`` numbered from
    ``initial_job_idx``), its cells and those to train (``todo``), its first template, the store (``uri``, the
    ``logger`` group), ``samples`` cells to track in full and where they train, and its start and composed times."""

    composer: _Jobs
    job_overrides: Sequence[Sequence[str]]
    initial_job_idx: int
    cells: list[GridCell]
    todo: list[GridCell]
    first: _Template
    uri: str | None
    logger: dict[str, Any]
    samples: int
    executor: str
    submitit: dict[str, Any]
    started: float
    composed: float = 0.0


class GridRecorder:
    """The grid layout's ``Recorder``: a cell that a grid run of the experiment holds is finished (resume); each
    result is kept on its cell (with the theory, computed once per config minus the seed); ``close`` writes the
    table, the summaries, the failures and the grid run (``write_grid``)."""

    def __init__(self, sweep: GridSweep, done: set[str], progress: Any) -> None:
        self.sweep, self.done, self.progress = sweep, done, progress
        self.known: dict[tuple, TheoryPrediction] = {}
        self.recorded = 0

    def finished(self, index: int) -> bool:
        return self.sweep.cells[index].key in self.done

    def open(self, index: int) -> None:
        return None  # a grid cell has no run of its own: its row is made when its result comes back (``record``)

    def record(self, index: int, result: PipelineResult) -> None:
        """Keep the result on its cell with the theory's prediction, computed here, once per config minus the seed:
        while the workers train the next chunks, not before the first one starts."""
        cell = self.sweep.cells[index]
        key = (id(cell.template), tuple(sorted(o.input_line for o in cell.values if o.key_or_group != "seed")))
        if key not in self.known:
            resolved = copy.deepcopy(cell.template.resolved)
            for override in cell.values:
                cell.template._set(resolved, override.key_or_group, cell.template.value(override)[0])
            self.known[key] = predict_from_spec(cell.template.spec(resolved))
        cell.theory = self.known[key]
        cell.outcome = result
        self.recorded += 1

    def flush(self) -> None:
        if self.progress is not None:
            self.progress.update(self.recorded)
        self.recorded = 0

    def abandon(self, status: str) -> None:
        return None  # the grid run is created by ``close``, after every cell trained

    def close(self) -> None:
        if self.sweep.todo:
            write_grid(self.sweep, time.perf_counter())


def grid_key(template: _Template, name: str) -> str:
    """A grid row's identity: its template's config hash and its cell name (the report keeps the latest row of each;
    resume skips a key that a grid run of the experiment already holds)."""
    return hashlib.sha256(f"{template.digest}|{name}".encode()).hexdigest()[:32]


def _grid_table(cells: list[GridCell]) -> Any:
    """The results table: one row per finished cell, in ``load_pipelines``' columns (see the module docstring),
    with the theory's params and metrics as a run per cell logs them."""
    import pandas as pd

    frames = []
    by_template: dict[int, list[GridCell]] = {}
    for cell in cells:
        by_template.setdefault(id(cell.template), []).append(cell)
    for group in by_template.values():
        template = group[0].template
        constant = {f"params.{k}": str(v) for k, v in flatten(used_params(template.resolved)).items()}
        columns: dict[str, list[Any]] = {}
        for cell in group:
            for override in cell.values:
                columns.setdefault(f"params.{override.key_or_group}", []).append(str(template.value(override)[0]))
        frame = pd.DataFrame(
            {**{k: v for k, v in constant.items() if k not in columns}, **columns}, index=pd.RangeIndex(len(group))
        )
        extra = []
        for cell in group:
            row: dict[str, Any] = {f"metrics.{k}": v for k, v in grid_finals(cell.outcome).items()}  # type: ignore[union-attr]
            if cell.theory is not None:
                params, metrics = theory_fields(cell.theory)
                row.update({f"params.{k}": str(v) for k, v in params.items()})
                row.update({f"metrics.{k}": v for k, v in metrics.items()})
            extra.append(row)
        frame = pd.concat([frame, pd.DataFrame(extra)], axis=1)
        frame["tags.ptlab.seed"] = frame.get("params.seed", str(template.resolved["seed"]))
        frame["tags.ptlab.cell"] = [cell.name for cell in group]
        frame[f"tags.{GRID_KEY_TAG}"] = [cell.key for cell in group]
        frame["position"] = [cell.position for cell in group]
        frames.append(frame)
    return pd.concat(frames, ignore_index=True).sort_values("position").drop(columns="position").reset_index(drop=True)


def _grid_summaries(cells: list[GridCell], path: Path, mlflow: dict[str, Any]) -> None:
    """``summaries.jsonl``: a line per finished cell, ``{"job", "cell", "summary"}``, the summary being what
    ``summary.json`` holds for the same config run alone (``pipeline_summary``), its ``mlflow`` entry the grid
    run's; ``overrides`` are the job's."""
    with path.open("w") as out:
        for cell in cells:
            summary = pipeline_summary(
                cell.outcome.stages,
                cell.cell.seed,
                cell.template.choices,  # type: ignore[union-attr]
                cell.theory,
                grid_extra(cell.outcome),
                mlflow=mlflow,
            )  # type: ignore[union-attr]
            out.write(
                json.dumps(
                    {"job": cell.position, "cell": cell.name, "overrides": cell.overrides, "summary": summary}, allow_nan=False
                )
                + "\n"
            )


def finished_grid_keys(tracking_uri: str, experiment_name: str) -> set[str]:
    """The grid keys of every row that the experiment's grid runs hold (each row is a finished cell)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return set()
    rows = grid_rows(client, experiment.experiment_id)
    return set() if rows.empty else set(rows[f"tags.{GRID_KEY_TAG}"])


def chunk_map(executor: str, options: dict[str, Any], cells: Sequence[GramCell]) -> ChunkMap | None:
    """How the chunks of ``cells`` run (``hydra.launcher.executor``): ``None`` for the pool, else submitit jobs with
    ``options`` (``hydra.launcher.submitit``). ``gpus_per_node: null`` asks for what the cells' device needs: on
    SLURM one GPU a job for cuda (none otherwise: ``auto`` there means the CPU unless the partition gives GPUs); locally
    the visible GPUs for cuda or auto (submitit hides them from a job that asks for none)."""
    if executor == "pool":
        return None
    options = dict(options)
    folder = options.pop("folder")
    if options.get("gpus_per_node") is None:
        devices = {cell.device for cell in cells}
        if executor == "submitit_slurm":
            options["gpus_per_node"] = 1 if "cuda" in devices else 0
        else:
            options["gpus_per_node"] = torch.cuda.device_count() if devices & {"cuda", "auto"} else 0
    return submitit_map(executor, folder, options)


def launch_grid(
    hydra_context: HydraContext,
    config: DictConfig,
    job_overrides: Sequence[Sequence[str]],
    initial_job_idx: int,
    max_cells: int,
    progress: bool,
    workers: int | None,
    samples: int,
    executor: str = "pool",
    submitit: dict[str, Any] | None = None,
) -> list[JobReturn]:
    """Run a sweep in the grid layout (module docstring): train every cell not yet in a grid run of the experiment,
    write the results table and the summaries to one grid run (and the sweep dir) and ``samples`` sampled cells in
    full under it. A diverged cell is left out of the table and ends the sweep as ``raise_failures`` says."""
    started = time.perf_counter()
    composer = _Jobs(hydra_context, config)
    cells: list[GridCell] = []
    checked: set[int] = set()
    for position, overrides in enumerate(job_overrides):
        template, parsed, values = _grid_job(composer, list(overrides), checked)
        cell = template.cell(values)
        name = cell_name([o.input_line for o in parsed], cell.seed)
        cells.append(GridCell(position, template, values, name, cell, grid_key(template, name), list(overrides)))
    first = cells[0].template
    logger = first.resolved["logger"]
    uri = resolve_tracking_uri(logger["tracking_uri"]) if logger["kind"] != "none" else None
    if uri is not None and logger.get("sqlite_wal", True):
        prepare_sqlite_store(uri)
    done = finished_grid_keys(uri, logger["experiment_name"]) if uri and first.skip_finished else set()
    todo = [cell for cell in cells if cell.key not in done]
    if len(todo) < len(cells):
        print(
            f"ptlab: skipped {len(cells) - len(todo)} of {len(cells)} cells: a grid run of the experiment already "
            "holds them (resume.skip_finished)"
        )
        first.sweep_dir.mkdir(parents=True, exist_ok=True)
        (first.sweep_dir / "skipped.json").write_text(json.dumps({"cells": len(cells) - len(todo)}))
    returns = _grid_returns(job_overrides)
    sweep = GridSweep(
        composer, job_overrides, initial_job_idx, cells, todo, first, uri, logger, samples, executor, submitit or {}, started
    )
    workers = torch.get_num_threads() if workers is None else workers
    with tqdm(total=len(todo), desc="gram grid", unit="cell", disable=True if not progress or not todo else None) as bar:
        recorder = GridRecorder(sweep, done, bar)
        sweep.composed = time.perf_counter()
        cells_todo = [cell.cell for cell in todo]
        drive(
            [PipelineJob(None, cell=cell.cell) for cell in cells],
            GramEngine(),
            recorder,
            history=GRID_HISTORY,
            keep_curves=False,
            max_cells=max_cells,
            workers=workers,
            chunk_map=chunk_map(executor, submitit or {}, cells_todo),
        )
    for cell in todo:
        returns[cell.position].return_value = _best_final(grid_finals(cell.outcome))  # type: ignore[arg-type]
    return returns


def write_grid(sweep: GridSweep, trained: float) -> None:
    """The grid's files and run once its cells trained: the table, the summaries, the failures, the heatmap, the
    grid run holding them and its sampled cells in full."""
    import numpy as np
    from mlflow.entities import Metric, Param

    todo, first, uri, logger, composer = sweep.todo, sweep.first, sweep.uri, sweep.logger, sweep.composer
    job_overrides, initial_job_idx, samples = sweep.job_overrides, sweep.initial_job_idx, sweep.samples
    executor, submitit, started, composed = sweep.executor, sweep.submitit, sweep.started, sweep.composed
    finished = [cell for cell in todo if cell.outcome.error is None]  # type: ignore[union-attr]
    errors = [cell.outcome.error for cell in todo if cell.outcome.error is not None]  # type: ignore[union-attr]
    sweep_dir = first.sweep_dir
    sweep_dir.mkdir(parents=True, exist_ok=True)
    run_id = None
    if uri is not None:
        writer = run_writer(uri, logger["experiment_name"], logger.get("artifact_location"))
        from mlflow.tracking import MlflowClient

        client = MlflowClient(uri)
        run = client.create_run(
            writer.experiment_id,
            run_name=f"grid {len(todo)} cells",
            tags={
                STAGE_TAG: "grid",
                "ptlab.grid.cells": str(len(todo)),
                **writer.context_tags,
                **{f"ptlab.choice.{k}": v for k, v in first.choices.items()},
            },
        )
        run_id = run.info.run_id
    mlflow = {"tracking_uri": uri, "experiment_id": writer.experiment_id if uri else None, "parent_run_id": run_id}
    swept = sorted({o.key_or_group for cell in todo for o in cell.values})
    table = figure = None
    if finished:
        table = _grid_table(finished)
        table.to_parquet(sweep_dir / RESULTS, index=False)
        figure = grid_heatmap(table, swept, sweep_dir / GRID_FIGURE)
    _grid_summaries(finished, sweep_dir / SUMMARIES, mlflow)
    if errors:
        (sweep_dir / FAILURES).write_text(
            json.dumps(
                [
                    {"job": cell.position, "cell": cell.name, "error": str(cell.outcome.error)}  # type: ignore[union-attr]
                    for cell in todo
                    if cell.outcome.error is not None
                ],
                indent=2,
            )
        )
    if run_id is not None:
        try:
            params = (
                [Param(f"grid.{key}", ",".join(pd_unique(table[f"params.{key}"]))[:6000]) for key in swept]
                if table is not None
                else []
            )
            stamp = int(time.time() * 1000)
            client.log_batch(
                run_id,
                params=params,
                metrics=[
                    Metric("grid/cells", float(len(todo)), stamp, 0),
                    Metric("grid/failed_cells", float(len(errors)), stamp, 0),
                    Metric("grid/train_seconds", trained - composed, stamp, 0),
                    Metric("grid/compose_seconds", composed - started, stamp, 0),
                ],
            )
            for artifact in (RESULTS, SUMMARIES, FAILURES, GRID_FIGURE):
                if (sweep_dir / artifact).is_file() and (artifact != GRID_FIGURE or figure is not None):
                    client.log_artifact(run_id, str(sweep_dir / artifact))
            picks = (
                sorted(np.random.default_rng(0).choice(len(finished), size=min(samples, len(finished)), replace=False))
                if finished
                else []
            )
            _track_samples(
                composer,
                writer,
                job_overrides,
                [finished[int(p)] for p in picks],
                initial_job_idx,
                run_id,
                executor,
                submitit or {},
            )
            if errors:
                client.set_tag(run_id, "ptlab.error", f"{errors[0]} ({len(errors)} of {len(todo)} cells failed)")
            client.set_terminated(run_id, "FAILED" if errors else "FINISHED")
        except BaseException as err:
            client.set_tag(run_id, "ptlab.error", f"{type(err).__name__}: {err}"[:5000])
            client.set_terminated(run_id, "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED")
            raise
    log.info(
        "ptlab gram grid: %d cells in %.1f s (configs %.1f s, training %.1f s, table and tracking %.1f s)",
        len(todo),
        time.perf_counter() - started,
        composed - started,
        trained - composed,
        time.perf_counter() - trained,
    )


def _grid_returns(job_overrides: Sequence[Sequence[str]]) -> list[JobReturn]:
    cwd = str(Path.cwd())
    returns = []
    for overrides in job_overrides:
        ret = JobReturn(overrides=list(overrides), working_dir=cwd, task_name="ptlab", status=JobStatus.COMPLETED)
        ret.return_value = None
        returns.append(ret)
    return returns


def _best_final(final: dict[str, float]) -> float | None:
    return final.get("transfer_test_acc", final.get("scratch_test_acc"))


def pd_unique(column: Any) -> list[str]:
    """A column's distinct values in order of appearance."""
    return list(dict.fromkeys(column.tolist()))


def _track_samples(
    composer: _Jobs,
    writer: RunWriter,
    job_overrides: Sequence[Sequence[str]],
    picks: list[GridCell],
    initial_job_idx: int,
    grid_run_id: str,
    executor: str = "pool",
    submitit: dict[str, Any] | None = None,
) -> None:
    """The sampled cells as full pipeline runs (stage children, every curve point) under the grid run; each is
    rebuilt from its full config, which must give the grid's cell, and trained again where the grid's were."""
    sampled: list[SweepJob] = []
    for pick in picks:
        overrides = list(job_overrides[pick.position])
        template, parsed, values = composer.template(overrides)
        template.skip_finished = False
        job = _build_job(
            template,
            initial_job_idx + pick.position,
            overrides,
            parsed,
            values,
            {
                (
                    writer.tracking_uri,
                    template.resolved["logger"]["experiment_name"],
                    template.resolved["logger"].get("artifact_location"),
                ): writer
            },
            {},
        )
        if job.cell != pick.cell:
            raise RuntimeError(f"grid cell {pick.position} differs from its full config's cell: {job.cell} vs {pick.cell}")
        sampled.append(job)
    cells = [job.cell for job in sampled]
    recorder = RunsRecorder(sampled, {}, tags={STAGE_TAG: "grid_sample", PARENT_RUN_TAG: grid_run_id})
    drive(
        [PipelineJob(job.spec, cell=job.cell) for job in sampled],
        GramEngine(),
        recorder,
        history="full",
        chunk_map=chunk_map(executor, submitit or {}, cells),
    )

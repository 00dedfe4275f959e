"""The interface every training engine implements, at two granularities.

**Pipelines** (``Engine.run``): the driver (``ptlab.pipeline.driver``) hands an engine ``PipelineJob``s (a spec, its
tracker and, for a job trained stage by stage, the recipe of its task) and gets back a ``PipelineResult`` per job,
in any order: its stages, its extra summary entries and the divergence that stopped it. The Lightning engine runs
each job's recipe; the gram engine batches the jobs that have no recipe (``ptlab.engines.gram``) and runs the
others' recipes. Everything around the training (resume, theory, recording, summary, the outcome) is the driver's.

**Stages** (``Engine.train_stage``): a recipe (``ptlab.pipeline.synthetic``) builds a ``Stage`` (the model to train,
its data, its budget, what it inherits) and gets back a ``StageResult`` (the trained model, its final numbers and
curves, the transfer plan), which it tracks as it goes.

Engines never import the pipeline or the tracking code. ``conf/engine/<name>.yaml`` picks the engine by
``_target_``: ``ptlab.engines.lightning.LightningEngine`` (the reference) or ``ptlab.engines.gram.GramEngine`` (the
exact Gram-matrix engine, docs/design.md section 3).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ptlab.errors import DivergenceError

if TYPE_CHECKING:
    from torch import nn

    from ptlab.data.synthetic import Directions, PatchData
    from ptlab.modules.regularizers import Regularizer
    from ptlab.spec import PipelineSpec
    from ptlab.transfer.adapters import PlanRow
    from ptlab.transfer.apply import Transfer

STAGES = ("upstream", "transfer", "scratch")
"""The stages of a pipeline, in the order they run."""


@dataclass
class Stage:
    """One full-batch GD training of the two-layer CNN.

    ``model`` is trained in place. ``transfer`` (the transfer stage) is applied to ``model`` before the
    first step. ``directions`` and ``task`` (1 or 2) say which signal the data carry; the engines
    record the signal/noise decomposition of the filters against them every ``eval_every`` steps.
    ``regularizer`` (the transfer stage's, ``ptlab.modules.regularizers``) acts on the units ``transfer`` copies.
    """

    name: str
    model: nn.Module
    train: PatchData
    test: PatchData
    steps: int
    lr: float
    eval_every: int
    directions: Directions
    task: int
    transfer: Transfer | None = None
    dtype: str = "float32"
    regularizer: Regularizer | None = None


@dataclass
class StageResult:
    """A trained stage: ``final`` (train_loss, train_acc, test_acc), ``curves`` (name -> [(step, value)]),
    the transfer ``plan`` (transfer stage), and where it came from (``cached``: read from the upstream
    cache, not trained now)."""

    name: str
    model: nn.Module | None
    final: dict[str, float]
    curves: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    plan: list[PlanRow] | None = None
    steps: int = 0
    cached: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The stage's entry of ``summary.json``."""
        out: dict[str, Any] = {key: self.final[key] for key in ("train_acc", "test_acc", "train_loss") if key in self.final}
        out.update({k: v for k, v in self.final.items() if k not in out})
        out.update(self.extra)
        if self.plan is not None:
            out["plan"] = [row.as_dict() for row in self.plan]
        return out


def diverged(stage: str, step: int, loss: float, lr: float) -> DivergenceError:
    """The one error of a stage whose loss is not finite, for every engine and layout (a single run, a batched
    sweep and a grid all end with this line)."""
    return DivergenceError(
        f"stage {stage} diverged at step {step}: the loss is {loss:g}; lower train.lr (now {lr:g})", stage, step, loss
    )


Recipe = Callable[["PipelineSpec", "Engine", Any], "tuple[dict[str, StageResult], dict[str, Any]]"]
"""A task's recipe (``ptlab.pipeline.run.RECIPES``): trains one pipeline stage by stage with an engine, tracking each
stage on the given tracker as it ends; returns the stages and the summary's extra entries."""


@dataclass
class PipelineJob:
    """One pipeline for ``Engine.run``: its ``spec``; its ``tracker`` (live: the recipe tracks into it); its ``recipe``
    (``None``: the engine may batch it, the driver tracks it afterwards); ``cell``: the gram engine's cell where the
    launcher built it without a spec (a grid of 100,000 cells builds no spec per cell)."""

    spec: PipelineSpec | None
    tracker: Any = None
    recipe: Recipe | None = None
    cell: Any = None


@dataclass
class PipelineResult:
    """One trained pipeline: its ``stages`` (up to the diverged one), the summary's ``extra`` entries, the ``error``
    that stopped it (a non-finite loss) and whether its stages are ``tracked`` already (by a recipe, live)."""

    stages: dict[str, StageResult]
    extra: dict[str, Any] = field(default_factory=dict)
    error: DivergenceError | None = None
    tracked: bool = False
    scores: dict[str, float] | None = None
    """Transferability scores not yet tracked (a batched cell's; a recipe tracks its own into ``extra``)."""


def run_recipe(engine: Engine, job: PipelineJob) -> PipelineResult:
    """``job`` trained by its recipe, stage by stage (a divergence comes back as the result's ``error``, its stage's
    child run left open for the tracker to close FAILED)."""
    assert job.recipe is not None and job.spec is not None
    try:
        stages, extra = job.recipe(job.spec, engine, job.tracker)
    except DivergenceError as err:
        return PipelineResult({}, error=err, tracked=True)
    return PipelineResult(stages, dict(extra), tracked=True)


@runtime_checkable
class Engine(Protocol):
    """Trains pipelines (``run``) and the stages of a recipe (``train_stage``); ``name`` is what the config hash and
    the upstream cache key record."""

    name: str

    def train_stage(self, stage: Stage) -> StageResult: ...

    def run(self, jobs: Sequence[PipelineJob], **options: Any) -> Iterator[list[tuple[int, PipelineResult]]]:
        """The jobs' results as they come: ``[(index into jobs, result)]`` per batch trained at once (one pipeline
        for a recipe, a chunk of cells for the gram engine), in any order."""
        ...

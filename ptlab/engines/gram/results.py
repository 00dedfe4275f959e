"""What the gram engine returns: a cell's trained stages (curves, final numbers, the filters' coefficients), their
curves in ``FullBatchGD`` form, the d-space weights rebuilt from the coefficients, and the divergence check every
layout (single run, batched sweep, grid) reports a diverged stage with."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ptlab.engines.base import StageResult, diverged
from ptlab.engines.gram.cell import GramCell
from ptlab.engines.gram.kernel import DECOMPOSITION_NAMES, StageOutput, eval_steps
from ptlab.errors import DivergenceError

HISTORIES = ("full", "eval", "last")
"""What a caller keeps of a stage's curves (``GramStage.metrics_by_step``)."""


def kept_steps(history: str, steps: int, eval_every: int) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """``(eval_at, loss_at)`` of ``StageInputs`` for a stage whose curves will be kept as ``history`` says: the
    evaluations and losses that history keeps, and nothing else (``None``: every eval step, every step's loss)."""
    if history not in HISTORIES:
        raise ValueError(f"history={history!r} is not allowed: must be one of {', '.join(HISTORIES)}")
    if history == "full":
        return None, None
    if history == "eval":
        return None, tuple(eval_steps(steps, eval_every))
    return (steps,), (steps,)


def on_cpu(out: StageOutput) -> StageOutput:
    """A trained stage's outputs on the CPU, where results go to the pipeline and tracking (the same tensors when
    they are there)."""
    return dataclasses.replace(
        out, **{f.name: getattr(out, f.name).cpu() for f in dataclasses.fields(out) if isinstance(getattr(out, f.name), Tensor)}
    )


@dataclass
class GramStage:
    """One trained stage of one cell: curves, final numbers and the filters' coefficients.

    The final filters are ``init + signal @ basis.T + sum_k noise[k] @ xi_k`` with ``basis`` the
    unit directions of u, v1, v2 (``Directions.basis``, (d, 3)), ``xi_k`` the training noise patches
    of task k, and ``init`` the stage's initial filters: the upstream init for the upstream stage and for
    the ``transferred`` filters of the transfer stage, the downstream init otherwise.
    """

    name: str
    steps: int
    eval_steps: list[int]
    loss: np.ndarray
    train_acc: np.ndarray
    test_acc: np.ndarray
    decomposition: np.ndarray
    signal: Tensor
    noise: dict[int, Tensor]
    transferred: Tensor
    trajectory: Tensor | None = None
    bias: Tensor | None = None
    """The final biases (2, m), for a model with a bias."""
    scale: Tensor | None = None
    """(2, m): under a weight-decay penalty (``regularizer=l2sp``), the final factor of each filter's ``init`` (which
    then enters the filters scaled); ``None``: 1."""
    """With ``record_coefficients``: (len(eval_steps), 2, m, 3 + N) coefficients of the stage's own
    updates along [b_u, b_v1, b_v2, xi of the stage's task] at each eval step."""
    control: str = "none"
    """``transfer.control`` of a transfer stage: other than none, the ``transferred`` filters started from the
    control's vectors (norm_matched: random directions with the inherited norms), not from the upstream's, and the
    stage's coefficients are its own updates only."""
    loss_steps: list[int] | None = None
    """The steps ``loss`` holds (a stage trained for a history that keeps fewer: ``kept_steps``); ``None``: every
    step."""
    evaluated: list[int] | None = None
    """The steps ``train_acc``, ``test_acc``, ``decomposition`` (and ``trajectory``) hold, when fewer than
    ``eval_steps`` (a stage trained for ``history=last``); ``None``: every eval step."""

    @property
    def final(self) -> dict[str, float]:
        """``FullBatchGD.final``: the loss and accuracies of the final model."""
        return {"train_loss": float(self.loss[-1]), "train_acc": float(self.train_acc[-1]), "test_acc": float(self.test_acc[-1])}

    def metrics_by_step(self, history: str = "full") -> dict[int, dict[str, float]]:
        """Curve points grouped by step, as ``FullBatchGD.log_curves`` sends them; ``history`` keeps every
        point (``full``), the eval steps only (``eval``) or the last point of each curve (``last``)."""
        if history not in HISTORIES:
            raise ValueError(f"history={history!r} is not allowed: must be one of {', '.join(HISTORIES)}")
        wanted = {"full": range(self.steps + 1), "eval": self.eval_steps, "last": [self.steps]}[history]
        held = {step: k for k, step in enumerate(range(self.steps + 1) if self.loss_steps is None else self.loss_steps)}
        evaluated = {step: k for k, step in enumerate(self.eval_steps if self.evaluated is None else self.evaluated)}
        kept_evals = self.eval_steps if history != "last" else [self.steps]
        if any(step not in held for step in wanted) or any(step not in evaluated for step in kept_evals):
            raise ValueError(
                f"stage {self.name}: its curves were computed for a shorter history than {history!r} "
                f"(losses at {len(held)} steps, evaluations at {len(evaluated)})"
            )
        by_step: dict[int, dict[str, float]] = {step: {"train/loss": float(self.loss[held[step]])} for step in wanted}
        for step in kept_evals:
            index = evaluated[step]
            row = by_step.setdefault(step, {})
            row["train/acc"] = float(self.train_acc[index])
            row["test/acc"] = float(self.test_acc[index])
            row.update(zip(DECOMPOSITION_NAMES, map(float, self.decomposition[index])))
        return by_step

    @property
    def curves(self) -> dict[str, list[tuple[int, float]]]:
        """Every curve in ``FullBatchGD.curves`` form: name -> [(step, value)]."""
        return self.curves_for("full")

    def curves_for(self, history: str) -> dict[str, list[tuple[int, float]]]:
        """The curves ``history`` keeps (see ``metrics_by_step``), name -> [(step, value)]."""
        curves: dict[str, list[tuple[int, float]]] = {}
        for step, metrics in sorted(self.metrics_by_step(history).items()):
            for key, value in metrics.items():
                curves.setdefault(key, []).append((step, value))
        return curves

    def result(self, history: str = "full", plan: list[Any] | None = None, model: torch.nn.Module | None = None) -> StageResult:
        """The stage as the ``Engine`` interface returns it."""
        return StageResult(self.name, model, self.final, self.curves_for(history), plan, self.steps)


@dataclass
class GramResult:
    """A cell's stages (``upstream`` absent without transfer), its transfer plan and transferability scores."""

    cell: GramCell
    stages: dict[str, GramStage]
    plan: list[dict[str, Any]] | None
    transferability: dict[str, float] | None = None
    """The scores before downstream training (``ptlab.engines.gram.scores.cell_scores``), when the cell asks."""

    def stage_results(self, history: str = "full") -> dict[str, StageResult]:
        """Every stage as the ``Engine`` interface returns it (no models: the weights stay coefficients)."""
        results = {
            name: stage.result(history, self.plan_rows if name == "transfer" else None) for name, stage in self.stages.items()
        }
        if "transfer" in results:
            results["transfer"].extra["regularizer"] = self.cell.regularizer.as_dict()
            results["transfer"].extra["control"] = self.cell.control
        results["scratch"].extra.update(budget=self.cell.scratch_budget, steps=self.stages["scratch"].steps)
        return results

    def divergence(self) -> DivergenceError | None:
        """The error of the first stage (in training order) whose loss is not finite, else ``None``."""
        for stage in self.stages.values():
            error = divergence(stage.name, stage.loss, self.cell.lr, stage.loss_steps)
            if error is not None:
                return error
        return None

    @property
    def plan_rows(self) -> list[Any] | None:
        """The transfer plan as ``PlanRow`` s."""
        from ptlab.transfer.adapters import PlanRow

        return None if self.plan is None else [PlanRow(**row) for row in self.plan]


def reconstruct_weights(
    stage: GramStage,
    basis: Tensor,
    noise_patches: Mapping[int, Tensor],
    upstream_init: Tensor | None,
    downstream_init: Tensor,
    inherited: Tensor | None = None,
) -> Tensor:
    """The stage's final filters (2, m, d) in d-space, from its coefficients (see ``GramStage``); ``inherited``: the
    start filters (2, m, d) of a transfer stage with a control (the control's vectors at the transferred positions)."""
    if stage.name == "upstream":
        init = upstream_init
    elif stage.control != "none":
        if inherited is None:
            raise ValueError(f"transfer.control={stage.control}: the transferred filters' start vectors are needed")
        init = torch.where(stage.transferred[..., None], inherited.to(downstream_init), downstream_init)
    elif upstream_init is None:
        init = downstream_init
    else:
        init = torch.where(stage.transferred[..., None], upstream_init, downstream_init)
    init = init.to(stage.signal.dtype)
    if stage.scale is not None:
        init = stage.scale[..., None].to(init) * init
    weight = init + stage.signal @ basis.to(stage.signal.dtype).T
    for task, coefficients in stage.noise.items():
        weight = weight + coefficients @ noise_patches[task].to(coefficients.dtype)
    return weight


def divergence(
    stage: str,
    loss: Tensor | np.ndarray,
    lr: float,
    steps: Sequence[int] | None = None,
) -> DivergenceError | None:
    """The ``DivergenceError`` of a stage whose loss curve has a non-finite step (the first one), else ``None``:
    the single run, the batched sweep and the grid all report a diverged stage with this line. ``steps``: the steps
    ``loss`` holds (``None``: every step; the kernel computes every step's loss wherever one may not be finite)."""
    loss = torch.as_tensor(loss)
    bad = (~torch.isfinite(loss)).nonzero()
    if not len(bad):
        return None
    index = int(bad[0, -1])
    step = index if steps is None else steps[index]
    return diverged(stage, step, float(loss[..., index]), lr)


def check_loss(stage: str, loss: Tensor, lr: float) -> None:
    """Raise ``divergence``'s error, if any."""
    error = divergence(stage, loss, lr)
    if error is not None:
        raise error

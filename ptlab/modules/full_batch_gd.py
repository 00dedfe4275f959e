"""A LightningModule that trains a margin model by full-batch gradient descent on the logistic loss."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.functional.classification import binary_accuracy

from ptlab.errors import DivergenceError
from ptlab.modules.regularizers import FineTunedModule, Regularizer


def logistic_loss(margin: Tensor, y: Tensor) -> Tensor:
    """Mean of ``log(1 + exp(-y f))`` over the batch."""
    return F.softplus(-y * margin).mean()


def sign_accuracy(margin: Tensor, y: Tensor) -> float:
    """Fraction of samples with ``sign(f) == y`` (labels in {-1, +1}; f > 0 predicts +1)."""
    return binary_accuracy(margin, (y > 0).long(), threshold=0.5).item()


class FullBatchGD(FineTunedModule, pl.LightningModule):
    """Plain GD with step ``lr`` (no momentum, no weight decay) on ``model``'s margin ``f(x)``.

    Step ``t`` of the curves is the model after ``t`` updates: ``train/loss`` at every step, and
    ``train/acc`` and ``<name>/acc`` for each evaluation set every ``eval_every`` steps and at the end.
    Curves are kept in memory and sent to the logger in one batch when training ends. ``regularizer`` (the
    transfer stage's) acts on the units ``inherit`` names (``ptlab.modules.regularizers``): l2sp adds its penalty
    to the loss that is differentiated (``train/loss`` stays the logistic loss), freeze and lr_scale scale the
    inherited entries' step at step ``t``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float,
        eval_sets: dict[str, tuple[Tensor, Tensor]] | None = None,
        eval_every: int = 10,
        regularizer: Regularizer | None = None,
    ) -> None:
        super().__init__()
        self.model, self.lr, self.eval_every = model, lr, eval_every
        self.init_fine_tuning(regularizer)
        self.eval_names = list(eval_sets or {})
        for name, (x, y) in (eval_sets or {}).items():
            self.register_buffer(f"eval_{name}_x", x, persistent=False)
            self.register_buffer(f"eval_{name}_y", y, persistent=False)
        self._losses: list[Tensor] = []
        self.curves: dict[str, list[tuple[int, float]]] = {}
        self.final: dict[str, float] = {}

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.model.parameters(), lr=self.lr)

    def fine_tuning_clock(self) -> int:
        """freeze's ``k`` counts GD steps."""
        return self.global_step

    def on_train_start(self) -> None:
        self._losses, self.curves, self.final = [], {}, {}

    @torch.no_grad()
    def evaluate(self, x: Tensor | None = None, y: Tensor | None = None) -> dict[str, float]:
        """Accuracy on the training batch ``(x, y)`` (when given) and on every evaluation set."""
        out = {}
        if x is not None and y is not None:
            out["train/acc"] = sign_accuracy(self.model(x), y)
        for name in self.eval_names:
            ex, ey = getattr(self, f"eval_{name}_x"), getattr(self, f"eval_{name}_y")
            out[f"{name}/acc"] = sign_accuracy(self.model(ex), ey)
        return out

    def _record(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.curves.setdefault(key, []).append((step, value))

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        margin = self.model(x)
        loss = logistic_loss(margin, y)
        if not torch.isfinite(loss):
            raise DivergenceError(f"at step {batch_idx}: the loss is {loss.item():g}", step=batch_idx, loss=loss.item())
        self._losses.append(loss.detach())
        if batch_idx % self.eval_every == 0:
            with torch.no_grad():
                self._record({"train/acc": sign_accuracy(margin, y), **self.evaluate()}, batch_idx)
        penalty = self.fine_tuning.penalty() if self.fine_tuning is not None else None
        return loss if penalty is None else loss + penalty

    def on_train_end(self) -> None:
        x, y = self.trainer.train_dataloader.dataset[0]
        x, y = x.to(self.device), y.to(self.device)
        steps = len(self._losses)
        with torch.no_grad():
            final_loss = logistic_loss(self.model(x), y).item()
        losses = torch.stack(self._losses).cpu().tolist() + [final_loss] if self._losses else [final_loss]
        self.curves["train/loss"] = list(enumerate(losses))
        final = self.evaluate(x, y)
        self._record(final, steps)
        self.final = {"train_loss": final_loss, **{k.replace("/", "_"): v for k, v in final.items()}}
        if self.logger is not None:
            self.log_curves()

    def log_curves(self) -> None:
        """Send every curve point and the final numbers to the logger, grouped by step."""
        by_step: dict[int, dict[str, float]] = {}
        for key, points in self.curves.items():
            for step, value in points:
                by_step.setdefault(step, {})[key] = value
        for step in sorted(by_step):
            self.logger.log_metrics(by_step[step], step=step)
        self.logger.log_metrics({f"final/{k}": v for k, v in self.final.items()}, step=len(self._losses))

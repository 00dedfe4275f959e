"""A LightningModule that trains any ``nn.Module`` image classifier with cross-entropy.

Used for every image stage (upstream, transfer, scratch) and every model family (torchvision CNNs,
timm ViTs): the classifier is ``self.model`` (where ``ParameterTransfer`` writes), and the module adds
the loss, torchmetrics accuracy, the optimizer and schedule of ``train.*``, an optional resize of each
batch to the model's ``input_size`` (done on the device, so data stay small in memory), and
``channels_last`` on a GPU. Curves: ``train/loss``, ``train/acc``, ``test/loss``, ``test/acc`` per epoch.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader
from torchmetrics.classification import MulticlassAccuracy

from ptlab.modules.regularizers import FineTunedModule, Regularizer

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULERS = ("cosine", "constant")


class ImageClassifier(FineTunedModule, pl.LightningModule):
    """Cross-entropy training of ``model`` (logits of shape (N, num_classes))."""

    def __init__(
        self,
        model: nn.Module,
        num_classes: int,
        lr: float = 0.05,
        optimizer: str = "sgd",
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        scheduler: str = "cosine",
        input_size: int | None = None,
        channels_last: bool = True,
        warmup_epochs: int = 0,
        label_smoothing: float = 0.0,
        regularizer: Regularizer | None = None,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"train.optimizer={optimizer!r} is unknown: choose one of {', '.join(OPTIMIZERS)}")
        if scheduler not in SCHEDULERS:
            raise ValueError(f"train.scheduler={scheduler!r} is unknown: choose one of {', '.join(SCHEDULERS)}")
        self.model, self.num_classes = model, num_classes
        self.lr, self.optimizer_name, self.momentum = lr, optimizer, momentum
        self.weight_decay, self.scheduler_name = weight_decay, scheduler
        self.input_size, self.channels_last = input_size, channels_last
        self.warmup_epochs, self.label_smoothing = warmup_epochs, label_smoothing
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.init_fine_tuning(regularizer)

    def fine_tuning_clock(self) -> int:
        """freeze's ``k`` counts epochs."""
        return self.current_epoch

    @property
    def _use_channels_last(self) -> bool:
        return self.channels_last and self.device.type == "cuda"

    def prepare(self, x: Tensor) -> Tensor:
        """Resize to ``input_size`` (when set and different) and pick the memory format."""
        if self.input_size and x.shape[-1] != self.input_size:
            x = F.interpolate(x, size=(self.input_size, self.input_size), mode="bilinear", align_corners=False)
        return x.contiguous(memory_format=torch.channels_last) if self._use_channels_last else x

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.prepare(x))

    def on_fit_start(self) -> None:
        if self._use_channels_last:
            self.model.to(memory_format=torch.channels_last)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        self.train_acc.update(logits, y)
        self.log("train/loss", loss, on_step=False, on_epoch=True, batch_size=len(y))
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=len(y))
        penalty = self.fine_tuning.penalty() if self.fine_tuning is not None else None
        if penalty is None:
            return loss
        self.log("train/penalty", penalty.detach(), on_step=False, on_epoch=True, batch_size=len(y))
        return loss + penalty

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.test_acc.update(logits, y)
        self.log("test/loss", F.cross_entropy(logits, y), on_step=False, on_epoch=True, batch_size=len(y))
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True, batch_size=len(y))

    def configure_optimizers(self) -> Any:
        params = self.model.parameters()
        if self.optimizer_name == "sgd":
            optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        elif self.optimizer_name == "adam":
            optimizer = torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        else:
            optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)
        epochs = max(1, self.trainer.max_epochs or 1)
        warmup = min(self.warmup_epochs, epochs - 1)
        if self.scheduler_name == "constant" and not warmup:
            return optimizer
        scheduler = (
            torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
            if self.scheduler_name == "constant"
            else torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs - warmup)
        )
        if warmup:  # linear ramp from lr / (warmup + 1) over the first epochs, then the schedule
            ramp = torch.optim.lr_scheduler.LinearLR(optimizer, start_factor=1 / (warmup + 1), total_iters=warmup)
            scheduler = torch.optim.lr_scheduler.SequentialLR(optimizer, [ramp, scheduler], milestones=[warmup])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}

    @torch.no_grad()
    def evaluate(self, loader: DataLoader) -> dict[str, float]:
        """Accuracy and mean cross-entropy of the model in eval mode over ``loader`` (full precision)."""
        was_training = self.model.training
        self.model.eval()
        correct, loss, count = 0, 0.0, 0
        for x, y in loader:
            x, y = x.to(self.device), y.to(self.device)
            logits = self(x).float()
            loss += F.cross_entropy(logits, y, reduction="sum").item()
            correct += (logits.argmax(dim=1) == y).sum().item()
            count += len(y)
        self.model.train(was_training)
        return {"acc": correct / count, "loss": loss / count}

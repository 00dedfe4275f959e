"""Full-batch gradient descent as one long Lightning epoch: the same batch, ``steps`` times."""

from __future__ import annotations

import pytorch_lightning as pl
from torch import Tensor
from torch.utils.data import DataLoader, Dataset


class RepeatedBatch(Dataset):
    """A dataset of length ``steps`` whose every item is the whole training set."""

    def __init__(self, x: Tensor, y: Tensor, steps: int) -> None:
        self.x, self.y, self.steps = x, y, steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        return self.x, self.y


class FullBatchDataModule(pl.LightningDataModule):
    """Feeds ``(x, y)`` as one batch per step for ``steps`` steps, in a single epoch.

    One epoch per step would run Lightning's epoch hooks thousands of times; one long epoch keeps the
    per-step cost to a training step.
    """

    def __init__(self, x: Tensor, y: Tensor, steps: int) -> None:
        super().__init__()
        self.x, self.y, self.steps = x, y, steps

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RepeatedBatch(self.x, self.y, self.steps), batch_size=None, shuffle=False)

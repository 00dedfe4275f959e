"""Data: the synthetic two-patch tasks and the full-batch loader that feeds them to Lightning."""

from ptlab.data.full_batch import FullBatchDataModule
from ptlab.data.synthetic import (
    Directions,
    PatchData,
    SyntheticTransferData,
    make_directions,
    make_synthetic_data,
    sample_task,
)

__all__ = [
    "Directions",
    "FullBatchDataModule",
    "PatchData",
    "SyntheticTransferData",
    "make_directions",
    "make_synthetic_data",
    "sample_task",
]

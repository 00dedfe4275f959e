"""Test helpers for the scaling tests: an injected fault, and a worker that races for a cache entry.

``FaultTrainer`` is a real Lightning ``Trainer`` selected with ``trainer._target_=...`` (and the
Lightning engine); it fails one ``transfer`` fit (the fit with a ``ParameterTransfer`` callback) per marker file
(path in ``PTLAB_TEST_FAULT_MARKER``; the file's text says how:
``raise``, ``raise@<epoch>`` or ``sigterm``). The marker is claimed by deleting it, so across parallel jobs exactly one
fit fails, and a re-run (marker gone, same config) succeeds.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

MARKER_ENV = "PTLAB_TEST_FAULT_MARKER"
FAULT_STAGE = "transfer"


def claim_fault(stage: str) -> str | None:
    """The marker's action when ``stage`` is the faulty one and this process deleted the marker first."""
    marker = os.environ.get(MARKER_ENV)
    if stage != FAULT_STAGE or not marker:
        return None
    try:
        action = Path(marker).read_text().strip()
        os.unlink(marker)
    except FileNotFoundError:
        return None
    return action


class Fault(pl.Callback):
    """Fails the fit at its first training batch (``raise``, ``sigterm``), or at the first batch of
    epoch N (``raise@N``)."""

    def __init__(self, action: str) -> None:
        self.action, _, epoch = action.partition("@")
        self.epoch = int(epoch or 0)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch < self.epoch:
            return
        if self.action == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        raise RuntimeError("injected fault")


class FaultTrainer(pl.Trainer):
    """A ``Trainer`` that adds ``Fault`` to the fit it claims the marker for."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        from ptlab.transfer.callback import ParameterTransfer

        is_transfer = any(isinstance(c, ParameterTransfer) for c in kwargs.get("callbacks", []))
        action = claim_fault("transfer") if is_transfer else None
        if action:
            kwargs["callbacks"] = [*kwargs.get("callbacks", []), Fault(action)]
        super().__init__(*args, **kwargs)


def race_for_entry(directory: str, counter: str, barrier: Any, results: Any) -> None:
    """One of two processes asking the cache for the same entry at the same moment; ``create`` is
    slow and counts its calls in the ``counter`` file."""
    import torch

    from ptlab.pipeline.cache import CacheEntry, UpstreamCache

    def create() -> CacheEntry:
        with open(counter, "a") as handle:
            handle.write("trained\n")
        time.sleep(1.0)
        return CacheEntry({"weight": torch.arange(6.0).reshape(2, 3)}, {"final": {"test_acc": 0.5}}, {})

    barrier.wait()
    entry, hit = UpstreamCache(directory).get_or_create({"stage": "race"}, create)
    results.put((hit, entry.state_dict["weight"].tolist()))

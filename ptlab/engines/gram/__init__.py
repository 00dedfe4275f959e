"""The exact Gram engine for synthetic pipelines (docs/design.md section 3).

GD on the two-layer CNN moves every filter only along the training patches, so the engine trains in
coefficient space: filters are their stage-start weights plus coefficients along the unit signal directions
and the training noise patches, and a step needs only the Gram matrix of those vectors (``kernel``).
``GramEngine.train_stage`` trains one ``Stage`` this way (the ``Engine`` interface of ``ptlab.engines.base``);
``run_cells`` / ``iter_chunks`` train whole pipelines of many cells at once for the batched sweep
(``ptlab.pipeline.batched``). The engine imports neither Lightning, torchvision, timm nor the pipeline.

One module per job:

- ``cell``: ``GramCell``, what the engine reads of a composed config;
- ``kernel``: the GD step program on a batch of cells, tensors in and out;
- ``draws``: a data group's data and inits (d-space, response-space test sets, gram sampling) as Gram matrices;
- ``batching``: grouping cells by shape and data, step blocks, the transfer plan of a chunk, worker processes;
- ``results``: ``GramStage`` / ``GramResult``, curves, rebuilt weights, the divergence check;
- ``regularize``: a regulariser as the kernel's per-filter fields;
- ``engine``: ``GramEngine``, the ``Engine`` adapter (``run``: pipelines, batched; ``train_stage``: one stage).
"""

from ptlab.engines.gram.batching import iter_chunks, run_cells
from ptlab.engines.gram.cell import GramCell, model_form
from ptlab.engines.gram.engine import GramEngine
from ptlab.engines.gram.kernel import DECOMPOSITION_NAMES, eval_steps
from ptlab.engines.gram.results import (
    HISTORIES,
    GramResult,
    GramStage,
    check_loss,
    divergence,
    reconstruct_weights,
)

__all__ = [
    "DECOMPOSITION_NAMES",
    "HISTORIES",
    "GramCell",
    "GramEngine",
    "GramResult",
    "GramStage",
    "check_loss",
    "divergence",
    "eval_steps",
    "iter_chunks",
    "model_form",
    "reconstruct_weights",
    "run_cells",
]

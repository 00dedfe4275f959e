"""Training engines besides Lightning: the exact Gram engine for the synthetic model and its batched sweeps."""

from ptlab.engines.gram import GramCell, GramResult, GramStage, iter_chunks, reconstruct_weights, run_cells, run_gram

__all__ = ["GramCell", "GramResult", "GramStage", "iter_chunks", "reconstruct_weights", "run_cells", "run_gram"]

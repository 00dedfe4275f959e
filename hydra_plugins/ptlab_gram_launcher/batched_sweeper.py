"""``hydra/sweeper=ptlab_batched``: Hydra's basic sweeper without its per-job composition check, and with
an optional list of cells.

``BasicSweeper`` composes every job of a batch before launching it (about 0.3 s a job: six minutes
for the 1200 jobs of Figure 2). This sweeper checks the first job of each batch only; the
``ptlab_gram`` launcher composes and validates every job itself (value overrides are applied with
OmegaConf's type checks, then ``ptlab.config.validate``), so a bad value still stops the sweep.

``cells``: a YAML file listing cells, each a list of overrides that may hold sweeps of its own (a random
design of ``python -m ptlab.report design``, ``ptlab.design``). The sweep is then every cell's expansion
crossed with the usual grid of ``params`` and command-line overrides (a key in both is an error).
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper  # private: Hydra exports no base sweeper to extend
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException


@dataclass
class PtlabBatchedSweeperConf:
    _target_: str = "hydra_plugins.ptlab_gram_launcher.batched_sweeper.PtlabBatchedSweeper"
    max_batch_size: Optional[int] = None
    params: Optional[Dict[str, str]] = None
    cells: Optional[str] = None


ConfigStore.instance().store(group="hydra/sweeper", name="ptlab_batched", node=PtlabBatchedSweeperConf, provider="ptlab")


def _keys(job: Sequence[str]) -> set:
    return {override.split("=", 1)[0] for override in job}


class PtlabBatchedSweeper(BasicSweeper):
    """``BasicSweeper`` whose pre-launch check composes the first job of a batch and that can sweep a
    list of cells (see module doc)."""

    def __init__(
        self, max_batch_size: Optional[int], params: Optional[Dict[str, str]] = None, cells: Optional[str] = None
    ) -> None:
        super().__init__(max_batch_size, params)
        self.cells = cells

    def validate_batch_is_legal(self, batch: Sequence[Sequence[str]]) -> None:
        super().validate_batch_is_legal(batch[:1])

    def split_arguments(self, overrides: List[Any], max_batch_size: Optional[int]) -> List[List[List[str]]]:
        """The grid of ``overrides`` (``BasicSweeper``), crossed with the cells of ``cells`` when given."""
        if not self.cells:
            return BasicSweeper.split_arguments(overrides, max_batch_size)
        from ptlab.design import DesignError, read_cells

        try:
            cells = read_cells(self.cells)
        except DesignError as err:
            raise HydraException(f"ptlab: {err}") from None
        assert self.hydra_context is not None
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        grid = BasicSweeper.split_arguments(overrides, None)[0]
        jobs: List[List[str]] = []
        for number, cell in enumerate(cells):
            expanded = BasicSweeper.split_arguments(parser.parse_overrides(cell), None)[0]
            clash = _keys(expanded[0]) & _keys(grid[0])
            if clash:
                raise HydraException(
                    f"ptlab: hydra.sweeper.cells={self.cells}: cell {number} sets "
                    f"{', '.join(sorted(clash))}, which the sweep's params or command line set too"
                )
            jobs += [[*job, *common] for job in expanded for common in grid]
        size = len(jobs) if max_batch_size in (None, -1) else max_batch_size
        return [jobs[i : i + size] for i in range(0, len(jobs), size)]

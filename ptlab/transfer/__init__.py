"""Transfer: copy an alpha-fraction of an upstream model into a downstream model (Algorithm 1)."""

from ptlab.transfer.adapters import (
    ADAPTERS,
    PlanRow,
    TransferAdapter,
    TwoLayerCNNFilters,
    find_adapter,
    register_adapter,
)
from ptlab.transfer.callback import ParameterTransfer, transfer_parameters
from ptlab.transfer.options import adapter_options
from ptlab.transfer.conv import CNNFilterTransfer, conv_units
from ptlab.transfer.selection import SELECTORS, count_for, get_selector
from ptlab.transfer.vit import ViTLayerTransfer

__all__ = [
    "ADAPTERS",
    "CNNFilterTransfer",
    "SELECTORS",
    "ParameterTransfer",
    "PlanRow",
    "TransferAdapter",
    "TwoLayerCNNFilters",
    "conv_units",
    "ViTLayerTransfer",
    "adapter_options",
    "count_for",
    "find_adapter",
    "get_selector",
    "register_adapter",
    "transfer_parameters",
]

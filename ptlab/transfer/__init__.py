"""Transfer: copy an alpha-fraction of an upstream model into a downstream model (Algorithm 1).

Names load lazily (``ptlab.lazy``): the Lightning callback, the torchvision and timm rules import their
libraries only when used.
"""

from ptlab.lazy import lazy_exports

_EXPORTS = {
    "ADAPTERS": "ptlab.transfer.adapters",
    "PlanRow": "ptlab.transfer.adapters",
    "TransferAdapter": "ptlab.transfer.adapters",
    "TwoLayerCNNFilters": "ptlab.transfer.adapters",
    "find_adapter": "ptlab.transfer.adapters",
    "ParameterTransfer": "ptlab.transfer.callback",
    "Transfer": "ptlab.transfer.apply",
    "transfer_parameters": "ptlab.transfer.apply",
    "adapter_options": "ptlab.transfer.options",
    "CONTROLS": "ptlab.transfer.controls",
    "UnitBlock": "ptlab.transfer.controls",
    "InheritedUnits": "ptlab.transfer.inherited",
    "apply_control": "ptlab.transfer.controls",
    "CNNFilterTransfer": "ptlab.transfer.conv",
    "conv_units": "ptlab.transfer.conv",
    "SELECTIONS": "ptlab.transfer.selection",
    "SelectionContext": "ptlab.transfer.selection",
    "SelectionInputs": "ptlab.transfer.selection",
    "SelectionStrategy": "ptlab.transfer.selection",
    "build_strategy": "ptlab.transfer.selection",
    "count_for": "ptlab.transfer.selection",
    "ViTLayerTransfer": "ptlab.transfer.vit",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)

"""What data-driven selection strategies read from the upstream model on task-2 data (docs/design.md section 7).

- ``unit_gradients``: dL/dW of the layer's units on each task-2 batch, the model in eval mode (BatchNorm
  statistics are used, not updated). The loss is ``SelectionInputs.loss`` when given, else the family's:
  the two-layer CNN's mean logistic loss on the task-2 labels (both tasks are +-1), and for a
  classifier the cross-entropy against its own predictions (its head knows only task-1 classes).
- ``unit_activations``: the mean |output| of each unit on the task-2 batches (the conv's output channel;
  the two-layer CNN's ReLU responses on both patches).
- ``signal_view``: the two-layer CNN's filters against the universal direction and the task-2 patches.

A unit lives in a module's ``weight`` (``layer`` is its name in the upstream model) or, for the
two-layer CNN, in row j of its ``weight`` (``layer`` is ``weight[+1]`` or ``weight[-1]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptlab.models.two_layer_cnn import TwoLayerReLUCNN


class SelectionContext(Protocol):
    """What the probes read of ``ptlab.transfer.selection.SelectionContext`` (which imports this module
    lazily, so this module does not import it back)."""

    units: Tensor
    layer: str
    source: nn.Module | None
    inputs: Any


TOY_LAYERS = ("weight[+1]", "weight[-1]")
"""The two-layer CNN's plan layers (``TwoLayerCNNFilters``): rows 0 and 1 of its ``weight``."""


def _toy_row(layer: str) -> int:
    labels = list(TOY_LAYERS)
    if layer not in labels:
        raise ValueError(f"layer {layer!r} is not a filter row of the two-layer CNN: must be one of {', '.join(labels)}")
    return labels.index(layer)


def _source(context: SelectionContext, strategy: str) -> nn.Module:
    if context.source is None or not context.inputs.batches:
        raise ValueError(
            f"transfer.selection={strategy} needs the upstream model and task-2 batches "
            f"(layer {context.layer or '?'} got {'no model' if context.source is None else 'no batches'})"
        )
    return context.source


def default_loss(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """The family's task-2 loss for gradient strategies (module docstring)."""
    if isinstance(model, TwoLayerReLUCNN):
        return lambda margin, y: F.softplus(-y.to(margin) * margin).mean()
    return lambda logits, _: F.cross_entropy(logits, logits.detach().argmax(dim=1))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode for the block, its previous mode restored after."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def _batches(context: SelectionContext, device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    for x, y in context.inputs.batches:
        yield x.to(device), y.to(device)


def unit_gradients(context: SelectionContext) -> list[Tensor]:
    """dL/d(units), one tensor shaped like ``context.units`` per task-2 batch."""
    model = _source(context, "taylor/fisher")
    toy = isinstance(model, TwoLayerReLUCNN)
    parameter = model.weight if toy else model.get_submodule(context.layer).weight
    row = _toy_row(context.layer) if toy else None
    loss = context.inputs.loss or default_loss(model)
    grads = []
    with eval_mode(model):
        for x, y in _batches(context, parameter.device):
            (grad,) = torch.autograd.grad(loss(model(x.to(parameter.dtype)), y), parameter)
            grads.append(grad[row] if row is not None else grad)
    return grads


def unit_activations(context: SelectionContext) -> Tensor:
    """Mean |activation| per unit over the task-2 batches (the mean of the per-batch means)."""
    model = _source(context, "activation")
    per_batch: list[Tensor] = []
    with torch.no_grad(), eval_mode(model):
        if isinstance(model, TwoLayerReLUCNN):
            weight = model.weight[_toy_row(context.layer)]
            for x, _ in _batches(context, weight.device):
                per_batch.append(torch.relu(x.to(weight) @ weight.T).abs().mean(dim=(0, 1)))
        else:
            module = model.get_submodule(context.layer)
            handle = module.register_forward_hook(
                lambda _m, _i, out: per_batch.append(out.abs().transpose(0, 1).reshape(out.shape[1], -1).mean(dim=1))
            )
            try:
                for x, _ in _batches(context, module.weight.device):
                    model(x.to(module.weight.dtype))
            finally:
                handle.remove()
    return torch.stack(per_batch).double().mean(dim=0).cpu()


def signal_view(context: SelectionContext) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
    """The two-layer CNN's filters (m, d) against ``inputs.universal`` and the task-2 batches' patches:
    the fields of a ``SignalView``."""
    units = context.units.detach()
    if units.dim() != 2:
        raise ValueError(
            f"transfer.selection=signal/task2_alignment needs the synthetic model's filters (m, d); "
            f"layer {context.layer or '?'} has units of shape {tuple(units.shape)}"
        )
    inputs = context.inputs
    universal = units @ inputs.universal.to(units) if inputs.universal is not None else None
    patches = labels = None
    if inputs.batches:
        x = torch.cat([batch[0] for batch in inputs.batches]).to(units)
        labels = torch.cat([batch[1] for batch in inputs.batches])
        patches = torch.einsum("rd,npd->rnp", units, x)
    return universal, patches, labels

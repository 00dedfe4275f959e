"""Reading a weights file of any suffix as a state dict, and telling whether it fits a model config.

``.safetensors`` files are read with the safetensors library (their header alone tells the tensor names
and shapes), every other suffix (``.pt``, ``.pth``, ``.bin``) with ``torch.load(weights_only=True)``; a
training checkpoint's ``state_dict`` entry is taken when present.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ptlab.errors import ConfigError


def read_state_dict(path: str | Path) -> dict[str, Any]:
    """The tensors of a weights file by name; ``ValueError`` (one line) when it is not a state dict."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path), device="cpu")
        else:
            import torch

            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same one line
        kind = "safetensors" if path.suffix == ".safetensors" else "PyTorch"
        raise ValueError(
            f"not a {kind} state dict ({type(err).__name__}: {str(err).splitlines()[0][:120]})"
            if str(err)
            else f"not a {kind} state dict ({type(err).__name__})"
        ) from None
    state = state.get("state_dict", state) if isinstance(state, Mapping) else state
    if not isinstance(state, Mapping) or not state or not all(isinstance(k, str) for k in state):
        raise ValueError(f"not a state dict (a {type(state).__name__}{' with no tensors' if not state else ''})")
    return dict(state)


def model_shapes(model_cfg: Mapping[str, Any], num_classes: int = 2) -> dict[str, tuple[int, ...]]:
    """The state dict's tensor shapes of the model a config builds (built on torch's meta device: no memory,
    no init cost; the weights file itself is not loaded)."""
    import torch
    from hydra.utils import instantiate

    options = {**dict(model_cfg), "weights_path": None}
    if "pretrained" in options:
        options["pretrained"] = False
    with torch.device("meta"):
        model = instantiate(options, num_classes=num_classes)
    return {name: tuple(tensor.shape) for name, tensor in model.state_dict().items()}


def check_weights_fit(key: str, model_cfg: Mapping[str, Any]) -> None:
    """``model_cfg.weights_path`` reads as a state dict that shares at least one tensor (name and shape) with
    the model; ``ConfigError`` naming ``key`` otherwise (a file that matches nothing would leave the model at
    its random init)."""
    value = model_cfg.get("weights_path")
    try:
        state = read_state_dict(Path(str(value)).expanduser())
    except ValueError as err:
        raise ConfigError(f"{key}.weights_path={value!r} is not allowed: {err}") from None
    shapes = model_shapes(model_cfg)
    matching = [name for name, tensor in state.items() if name in shapes and tuple(getattr(tensor, "shape", ())) == shapes[name]]
    if not matching:
        example = ", ".join(list(state)[:2])
        raise ConfigError(
            f"{key}.weights_path={value!r} is not allowed: none of its {len(state)} tensors "
            f"({example}, ...) matches a tensor of {key} by name and shape; it would train from "
            "its random init"
        )

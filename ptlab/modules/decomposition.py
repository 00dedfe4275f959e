"""The signal/noise decomposition of the paper's proofs, measured on the filters during training.

The proofs write each filter as its init plus signal learning (coefficients along ``u``, ``v1``,
``v2``) plus noise memorisation (coefficients along each training noise patch ``xi_i``). Gradient
descent moves a filter ``w_{j,r}`` only along the training patches, so the inner products
``<w_{j,r}, a>`` with a signal direction ``a`` and ``<w_{j,r}, xi_i>`` with a noise patch are the
measurable form of those coefficients: they are what the filter's ReLU sees of each part of an input.

Sign convention: filters of output ``j = +1`` (``weight[0]``) learn ``+(u + v_k)`` and filters of
``j = -1`` (``weight[1]``) learn ``-(u + v_k)``, so signal learning is ``j * <w_{j,r}, a>``; a filter
memorises ``xi_i`` when ``j`` equals the label ``y_i``, so noise memorisation is ``<w_{y_i,r}, xi_i>``.

``decomposition_metrics`` is the one definition of the metric names below; every engine that logs
them calls it (or reproduces it exactly). The Lightning callback that records them during a fit is
``ptlab.modules.callbacks.SignalNoiseDecomposition``; this module needs neither Lightning nor matplotlib
until a figure is drawn.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ptlab.data.synthetic import Directions

if TYPE_CHECKING:
    from matplotlib.figure import Figure

PREFIX = "decomp/"
SIGNALS = ("u", "v1", "v2")
METRIC_NAMES = (
    *(f"{PREFIX}signal_{name}_{stat}" for name in SIGNALS for stat in ("max", "mean")),
    f"{PREFIX}noise_max",
    f"{PREFIX}noise_mean",
    f"{PREFIX}filter_norm_mean",
)
"""Every key ``decomposition_metrics`` returns, in a stable order."""


@torch.no_grad()
def decomposition_metrics(
    weight: Tensor, directions: Directions, noise: Tensor, labels: Tensor | None = None
) -> dict[str, float]:
    """Signal learning and noise memorisation of the filters ``weight`` (2, m, d).

    Args:
        weight: the first-layer filters; ``weight[0]`` are those of output +1, ``weight[1]`` of -1.
        directions: the task directions ``u``, ``v1``, ``v2`` (with their norms, not unit vectors).
        noise: the training noise patches ``xi`` (N, d) of the task the model trains on.
        labels: the observed training labels (N,) in {-1, +1}. Without them the matching output of a
            patch is unknown and noise memorisation is taken over both outputs.

    Returns (``decomp/`` keys, in ``METRIC_NAMES`` order):
        ``signal_<a>_max`` / ``signal_<a>_mean`` for ``a`` in u, v1, v2: the max / mean over the 2m
        filters of ``j * <w_{j,r}, a>`` (exactly 0 when ``a = 0``, e.g. ``u_norm = 0``);
        ``noise_max`` / ``noise_mean``: the max / mean over filters r and patches i of
        ``<w_{y_i,r}, xi_i>`` (nan when N = 0); ``filter_norm_mean``: the mean filter norm.
    """
    w = weight.detach().double()
    sign = torch.tensor([1.0, -1.0], dtype=w.dtype, device=w.device)[:, None]
    out: dict[str, float] = {}
    for name in SIGNALS:
        learned = sign * (w @ getattr(directions, name).to(w))  # (2, m)
        out[f"{PREFIX}signal_{name}_max"] = learned.max().item()
        out[f"{PREFIX}signal_{name}_mean"] = learned.mean().item()
    projections = w @ noise.detach().to(w).T  # (2, m, N)
    if labels is not None:
        own = (labels.to(w.device) < 0).long()  # output index of y_i: 0 for +1, 1 for -1
        projections = projections.gather(0, own[None, None, :].expand(1, w.shape[1], -1))
    if projections.numel():
        out[f"{PREFIX}noise_max"] = projections.max().item()
        out[f"{PREFIX}noise_mean"] = projections.mean().item()
    else:
        out[f"{PREFIX}noise_max"] = out[f"{PREFIX}noise_mean"] = float("nan")
    out[f"{PREFIX}filter_norm_mean"] = w.norm(dim=-1).mean().item()
    return out


FIGURE_PANELS = (
    ("signal_u_max", r"universal signal", r"$\max_{j,r}\ j\langle w_{j,r}, u\rangle$"),
    ("signal_v_max", r"task signal", r"$\max_{j,r}\ j\langle w_{j,r}, v_k\rangle$"),
    ("noise_max", r"noise memorised (max)", r"$\max_{r,i}\ \langle w_{y_i,r}, \xi_i\rangle$"),
    ("noise_mean", r"noise memorised (mean)", r"$\mathrm{mean}_{r,i}\ \langle w_{y_i,r}, \xi_i\rangle$"),
)
"""Per panel: the curve's key, the panel's title and its y label (the quantity, with the indices it runs over)."""
STAGE_TASK = {"upstream": 1, "transfer": 2, "scratch": 2}


def _panel_curve(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    key: str,
    stage: str,
) -> Sequence[tuple[int, float]]:
    if key == "signal_v_max":
        key = f"signal_v{STAGE_TASK.get(stage, 2)}_max"
    return curves.get(PREFIX + key, [])


def decomposition_figure(curves_by_stage: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]], title: str = "") -> Figure:
    """One pipeline's decomposition curves: a panel per quantity, a line per stage.

    ``curves_by_stage`` maps a stage name to ``FullBatchGD.curves``; the task signal of each stage is
    its own task's ``v_k`` (``v1`` upstream, ``v2`` downstream).
    """
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 3.2))  # fixed margins: a layout engine would double the drawing time
    axes = fig.subplots(1, len(FIGURE_PANELS), gridspec_kw=dict(left=0.06, right=0.99, bottom=0.16, top=0.8, wspace=0.45))
    for ax, (key, label, quantity) in zip(axes, FIGURE_PANELS):
        for stage, curves in curves_by_stage.items():
            points = _panel_curve(curves, key, stage)
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, label=stage)
        ax.set_title(label, fontsize=9)
        ax.set_ylabel(quantity, fontsize=9)
        ax.set_xlabel("GD step")
        ax.grid(alpha=0.3)
    labelled = [ax for ax in axes if ax.lines]
    if labelled:
        labelled[0].legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig

"""A data group's draw: data and inits of a cell, as the gram engine sees them (Gram matrices and products).

The data, inits and transfer plan come from the same functions and seed streams as the Lightning path; everything
d-dimensional is one product of the rows ``[basis; xi of both tasks; upstream init; downstream init]``, done once
per data draw. Response-space test sets (``task.test_space=response``) and gram sampling (``task.sampling=gram``,
``DRAWS``) replace the d-space draws of a cell by draws of the same law from its Gram matrix, so a cell's cost no
longer grows with ``d``.

Devices: every draw comes from the CPU generators of the named seed streams (``ptlab.seeding``), so a cell's data and
inits are the same numbers on every device; the d-space products (``rows @ rows.T``, the test products) run on the
cell's device, response-space draws on the CPU (their generator) from the Gram block brought back, and the group's
tensors end on the device (``prepare_group``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from ptlab.data.gram_sampling import GaussianBlock, sample_gram
from ptlab.data.synthetic import (
    DTYPES,
    PatchData,
    ResponseTestSet,
    make_synthetic_data,
    response_test_set,
    sample_labels,
)
from ptlab.engines.gram.cell import GramCell
from ptlab.models.two_layer_cnn import ModelForm, TwoLayerReLUCNN
from ptlab.seeding import derive_seed, torch_seed
from ptlab.transfer.adapters import TwoLayerCNNFilters
from ptlab.transfer.controls import control_draw


@dataclass
class Group:
    """One draw of data and inits with every product the stages need (d-space work done once)."""

    cells: list[int]
    tensors: dict[str, Tensor]


def _seeded_cnn(cell: GramCell, init_std: float, init: str, form: ModelForm, stream: str) -> tuple[Tensor, Tensor | None]:
    """The init filters (2m, d) and biases (2m,) or None the Lightning path draws for ``stream``
    (``ptlab.models.build_model``)."""
    with torch_seed(derive_seed(cell.seed, stream)):
        model = TwoLayerReLUCNN(cell.d, cell.width, init_std, init=init, bias=form.bias)
    dtype = DTYPES[cell.dtype]
    bias = None if model.bias is None else model.bias.detach().to(dtype).reshape(-1)
    return model.weight.detach().to(dtype).reshape(-1, cell.d), bias


def _test_products(test: PatchData | ResponseTestSet, rows: Tensor | None, inner: Tensor, index: Tensor) -> Tensor:
    """Inner products (K, n_test) of ``rows`` (``rows[:3]`` the unit signal basis) with the test noise patches:
    computed from the patches in d-space, or drawn in response space from the rows' Gram matrix (``inner``
    restricted to ``index``), with nothing of size d."""
    if isinstance(test, PatchData):
        return rows @ test.noise.to(rows.device).T
    block = inner[index][:, index].cpu()  # drawn from the test set's CPU generator, whatever the device
    return test.responses(block, block[:, :3]).T.to(device=inner.device, dtype=inner.dtype)


@dataclass
class _Draw:
    """A cell's data and inits as the engine sees them: the Gram matrix ``inner`` of the rows [task-1 vectors
    (b_u, b_v1, b_v2, xi_1..xi_N1); task-2 vectors; upstream init (2m); downstream init (2m)] (the task-1 and
    upstream rows only with transfer), the rows' products with the test noise, labels, init biases."""

    inner: Tensor
    sizes: tuple[int, int, int, int]
    test1: Tensor | None
    test2: Tensor
    labels: dict[str, Tensor]
    biases: dict[str, Tensor]
    control: dict[str, Tensor] = field(default_factory=dict)
    """``transfer.control=norm_matched``: the random directions' products with the task-2 vectors (``ctl_start2``),
    with the task-2 test noise (``ctl_test_start2``) and their squared norms (``ctl_norm2_2``)."""


def control_directions(cell: GramCell) -> Tensor:
    """The (2m, d) float64 Gaussian draws of ``transfer.control=norm_matched``, one per filter, from the streams the
    Lightning path draws them from (``ptlab.transfer.controls``: per output layer ``weight[+1]``, ``weight[-1]``)."""
    seed = derive_seed(cell.seed, "control")
    return torch.cat(
        [control_draw(seed, "norm_matched", f"weight[{label}]", (cell.width, cell.d)) for label in TwoLayerCNNFilters.OUTPUTS]
    )


def _control_products(cell: GramCell, task2: Tensor, test: PatchData) -> dict[str, Tensor]:
    """``_Draw.control`` of a d-space draw: products of ``control_directions`` (float64) with the task-2 rows
    ``[b_u, b_v1, b_v2; xi]`` and the test noise patches."""
    directions = control_directions(cell)
    return {
        "ctl_start2": directions @ task2.double().T,
        "ctl_test_start2": directions @ test.noise.double().T,
        "ctl_norm2_2": (directions * directions).sum(-1),
    }


def _orthogonal(inner: Tensor, tests: list[tuple[Tensor, int]], tasks: list[tuple[int, int]]) -> None:
    """Zero, in place, the inner products of the signal directions with noise patches projected off them: 0 in the
    data's law, only the float32 rounding of the projection (~1e-7 relative) in the products. ``tasks`` are the
    (offset, N) of each task's rows [b_u, b_v1, b_v2, xi_1..xi_N] in ``inner``; ``tests`` the test products (rows as
    ``inner``'s, columns a test set's noise) with how many of their leading rows are task blocks. The steps then
    skip the noise-to-signal products (``kernel.train_stage_batch``: uncoupled)."""
    for basis, _ in tasks:
        for offset, n in tasks:
            inner[basis : basis + 3, offset + 3 : offset + 3 + n] = 0
            inner[offset + 3 : offset + 3 + n, basis : basis + 3] = 0
        for products, rows in tests:
            if basis < rows:
                products[basis : basis + 3] = 0


def _draw_dspace(cell: GramCell, device: torch.device) -> _Draw:
    """Everything drawn in R^d by the functions and seed streams of the Lightning path (on the CPU), the products
    on ``device``; with projected noise, its products with the signal directions exactly 0 (``_orthogonal``)."""
    data = make_synthetic_data(
        d=cell.d,
        n1=cell.n1,
        n2=cell.n2,
        n_test=cell.n_test,
        u_norm=cell.u_norm,
        v_norm=cell.v_norm,
        label_noise=cell.label_noise,
        sigma_p1=cell.sigma_p1,
        sigma_p2=cell.sigma_p2,
        seed=derive_seed(cell.seed, "data"),
        dtype=DTYPES[cell.dtype],
        project_noise=cell.project_noise,
        signal_position=cell.signal_position,
        test_space=cell.test_space,
    )
    basis_t = data.directions.basis.T.to(DTYPES[cell.dtype])
    task2 = torch.cat([basis_t, data.task2_train.noise])
    downstream, downstream_bias = _seeded_cnn(cell, cell.init_std, cell.init, cell.model_form, "downstream")
    labels = {"y2": data.task2_train.y, "c2": data.task2_train.clean_y, "ty2": data.task2_test.y, "tc2": data.task2_test.clean_y}
    biases = {} if downstream_bias is None else {"bias2": downstream_bias}
    if not cell.transfer:
        rows = torch.cat([task2, downstream]).to(device)
        inner = rows @ rows.T
        test2 = _test_products(data.task2_test, rows, inner, torch.arange(len(rows), device=device))
        if cell.project_noise:
            _orthogonal(inner, [(test2, len(task2))], [(0, cell.n2)])
        return _Draw(inner, (0, len(task2), 0, len(downstream)), None, test2, labels, biases)
    task1 = torch.cat([basis_t, data.task1_train.noise])
    upstream, upstream_bias = _seeded_cnn(cell, cell.upstream_init_std, cell.upstream_init, cell.upstream_form, "upstream")
    if upstream_bias is not None:
        biases["bias1"] = upstream_bias
    labels.update(
        {"y1": data.task1_train.y, "c1": data.task1_train.clean_y, "ty1": data.task1_test.y, "tc1": data.task1_test.clean_y}
    )
    rows = torch.cat([task1, task2, upstream, downstream]).to(device)
    inner = rows @ rows.T
    p1, p2, fm = len(task1), len(task2), len(upstream)
    index1 = torch.cat([torch.arange(p1), torch.arange(p1 + p2, p1 + p2 + fm)]).to(device)
    test1 = _test_products(data.task1_test, torch.cat([task1, upstream]).to(device), inner, index1)
    test2 = _test_products(data.task2_test, rows, inner, torch.arange(len(rows), device=device))
    control = _control_products(cell, task2, data.task2_test) if cell.control == "norm_matched" else {}
    if cell.project_noise:
        _orthogonal(inner, [(test1, p1), (test2, p1 + p2)], [(0, cell.n1), (p1, cell.n2)])
    return _Draw(inner, (p1, p2, fm, fm), test1, test2, labels, biases, control)


def _draw_gram(cell: GramCell, device: torch.device) -> _Draw:
    """The same law without anything of size d (``task.sampling=gram``, Gaussian inits): the labels from the
    data streams (equal to the d-space path's), the Gram matrix from ``sample_gram`` (its own ``"gram"``
    stream), the init biases N(0, sigma_0^2) from the init streams, the test sets in response space: all of it
    small and drawn on the CPU (``prepare_group`` moves it to ``device``)."""
    dtype, data_seed = DTYPES[cell.dtype], derive_seed(cell.seed, "data")

    def gen(part: str) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(data_seed, part))

    fm = 2 * cell.width
    tasks = [(1, cell.n1, cell.sigma_p1), (2, cell.n2, cell.sigma_p2)] if cell.transfer else [(2, cell.n2, cell.sigma_p2)]
    labels: dict[str, Tensor] = {}
    tests: dict[int, ResponseTestSet] = {}
    for task, n, sigma in tasks:
        labels[f"y{task}"], labels[f"c{task}"] = sample_labels(n, cell.label_noise, gen(f"task{task}_train"), dtype)
        tests[task] = response_test_set(cell.n_test, sigma, cell.label_noise, gen(f"task{task}_test"), dtype, cell.project_noise)
        labels[f"ty{task}"], labels[f"tc{task}"] = tests[task].y, tests[task].clean_y
    inits = [("upstream", cell.upstream_init_std, cell.upstream_form)] if cell.transfer else []
    inits.append(("downstream", cell.init_std, cell.model_form))
    blocks = [GaussianBlock(n, sigma, cell.project_noise) for _, n, sigma in tasks]
    blocks += [GaussianBlock(fm, std, False) for _, std, _ in inits]
    compact = sample_gram(cell.d, blocks, np.random.default_rng(derive_seed(data_seed, "gram")))
    # rows [b; xi1; b; xi2; up; down] as indices into the compact [b; xi1; xi2; up; down]
    counts = [b.count for b in blocks]
    starts = np.cumsum([3, *counts])

    def span(k: int) -> Tensor:
        return torch.arange(int(starts[k]), int(starts[k]) + counts[k])

    order = torch.cat(
        [*(torch.cat([torch.arange(3), span(k)]) for k in range(len(tasks))), *(span(k) for k in range(len(tasks), len(blocks)))]
    )
    inner = compact[order][:, order].to(dtype)
    biases = {}
    for name, std, form in inits:
        if form.bias:
            key = "bias1" if name == "upstream" else "bias2"
            generator = torch.Generator().manual_seed(derive_seed(cell.seed, name))
            biases[key] = (std * torch.randn(fm, generator=generator, dtype=torch.float64)).to(dtype)
    p2 = 3 + cell.n2
    if not cell.transfer:
        return _Draw(inner, (0, p2, 0, fm), None, _test_products(tests[2], None, inner, torch.arange(len(inner))), labels, biases)
    p1 = 3 + cell.n1
    index1 = torch.cat([torch.arange(p1), torch.arange(p1 + p2, p1 + p2 + fm)])
    return _Draw(
        inner,
        (p1, p2, fm, fm),
        _test_products(tests[1], None, inner, index1),
        _test_products(tests[2], None, inner, torch.arange(len(inner))),
        labels,
        biases,
    )


DRAWS: dict[str, Callable[[GramCell, torch.device], _Draw]] = {"dspace": _draw_dspace, "gram": _draw_gram}
"""``task.sampling`` -> how a cell's data and inits are drawn."""


def prepare_group(cell: GramCell, cell_indices: list[int], device: torch.device | None = None) -> Group:
    """One draw of a data key's data and inits, cut into the blocks the stages read, on ``device`` (the CPU when
    ``None``)."""
    device = torch.device("cpu") if device is None else device
    draw = DRAWS[cell.sampling](cell, device)
    inner, (p1, p2, fu, fd) = draw.inner, draw.sizes
    cuts = np.cumsum([0, p1, p2, fu, fd])
    s1, s2, su, sd = (slice(int(a), int(b)) for a, b in zip(cuts[:-1], cuts[1:]))
    test2 = draw.test2
    t: dict[str, Tensor] = {
        **draw.labels,
        **draw.biases,
        "gram2": inner[s2, s2],
        "cross2": test2[s2],
        "start2": inner[sd, s2],
        "test_start2": test2[sd],
        "norm2_2": inner[sd, sd].diagonal().clone(),
    }
    if cell.transfer:
        test1 = draw.test1
        t.update(
            {
                "gram1": inner[s1, s1],
                "cross1": test1[:p1],
                "start1": inner[su, s1],
                "test_start1": test1[p1:],
                "norm2_1": inner[su, su].diagonal().clone(),
                "mix": inner[s1, s2],
                "mix_test": test2[s1],
                "up_start2": inner[su, s2],
                "up_test_start2": test2[su],
                **draw.control,
            }
        )
    return Group(cell_indices, {k: v.to(device=device, dtype=DTYPES[cell.dtype]).contiguous() for k, v in t.items()})

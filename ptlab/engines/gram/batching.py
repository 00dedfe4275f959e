"""Batching and scheduling: many cells (pipeline configs) trained as few batched tensor programs.

Cells with equal shapes (N1, N2, n_test, m, steps, model form) run as one batched tensor program whatever their
``d``; cells that differ only in the signal norms (``u_norm``, ``v_norm``) or in ``lr``, ``alpha`` and ``selection``
share one draw of data and inits (the data stream does not depend on the signal norms) and one set of Gram matrices.
A chunk of such groups is drawn, cut into step blocks, trained (upstream, then the transfer plan of every cell and its
control, then transfer and scratch in one downstream batch, two when a compute-matched scratch runs longer) and cut
back into per-cell results; chunks run in forked worker processes (``ptlab.engines.gram.workers``: they die with the
sweep) or as submitit jobs (``ChunkMap``: one chunk a job, on this machine or a SLURM cluster). ``run_cells`` /
``iter_chunks`` serve the batched sweep (``ptlab.pipeline.batched``).

Devices: a chunk trains on its cells' device (``GramCell.device``, resolved in the process that runs the chunk, so a
SLURM job finds its node's GPU); the data are drawn on the CPU (``draws``), the transfer plan is made on the CPU from
the upstream stage's norms and responses, and every result comes back on the CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

from ptlab.data.synthetic import DTYPES
from ptlab.engines.gram.cell import GramCell, resolve_device
from ptlab.engines.gram.draws import Group, prepare_group
from ptlab.engines.gram.kernel import StageInputs, eval_steps, torch_threads, train_stage_batch
from ptlab.engines.gram.regularize import drop_neutral, filter_regularizer
from ptlab.engines.gram.results import GramResult, GramStage, kept_steps, on_cpu
from ptlab.engines.gram.scores import block_scores
from ptlab.engines.gram.workers import worker_pool
from ptlab.seeding import derive_seed
from ptlab.transfer.adapters import TwoLayerCNNFilters
from ptlab.transfer.selection import SelectionInputs, SignalView, build_strategy

STEP_BLOCK_BYTES = 3 << 19
"""About the step state (responses of the filters to the patches) of the cells run as one program, 1.5 MiB: on
2 cores, blocks of 10-20 fig2 cells (0.6-1.3 MiB) trained at 93-95 GFLOP/s, 40 cells at 78, 60 at 71 (the
steps stream the state through the caches several times a step)."""
GPU_STEP_BLOCK_BYTES = 1 << 30
"""On a GPU a step's operations are launches whatever their size: blocks as large as the chunk (``max_cells`` bounds
its memory) up to 1 GiB of step state."""
ChunkMap = Callable[[Callable[[Any], Any], Sequence[Any]], Iterable[Any]]
"""How a sweep's chunks run elsewhere: ``map(function, specs)`` gives ``function(spec)`` of each spec, in order
(``ptlab.engines.gram.workers.submitit_map``)."""


def _signal_views(cell: GramCell, responses: Tensor, y2: Tensor, c2: Tensor) -> dict[str, SignalView]:
    """The synthetic strategies' view of the upstream filters, by plan layer, from their responses (2m, 3 + N2)
    to the task-2 vectors ``[b_u, b_v1, b_v2, xi_1..]``: ``<w, u>``, and per sample ``<w, x1_i>`` (the signal
    patch ``c_i (u + v2)``) and ``<w, xi_i>``."""
    r = responses.double().view(2, cell.width, -1)
    views = {}
    for j, label in enumerate(TwoLayerCNNFilters.OUTPUTS):
        universal = cell.u_norm * r[j, :, 0]
        signal = universal + cell.v_norm * r[j, :, 2]
        patches = torch.stack([signal[:, None] * c2.double()[None], r[j, :, 3:]], dim=-1)
        views[f"weight[{label}]"] = SignalView(universal, patches, y2.double())
    return views


class FilterNorms(torch.nn.Module):
    """The two-layer CNN as a plan sees it in coefficient space: each filter (2, m, 1) is its norm (the weights stay
    coefficients; the norm is all that the strategies the gram engine allows read of them)."""

    def __init__(self, norms: Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", norms[..., None])


def _plan(
    cell: GramCell,
    upstream_norms: Tensor,
    views: dict[str, SignalView] | None = None,
) -> tuple[list[dict[str, Any]], Tensor]:
    """The transfer plan of ``TwoLayerCNNFilters`` for this cell and the mask (2, m) of copied filters.

    The plan sees the upstream filters through their norms (``largest_norm``), their responses to task 2
    (``views``: ``signal``, ``task2_alignment``) or not at all, so it is made on (2, m, 1) stand-ins
    holding the norms, with the Lightning path's generator seed (``check_gram_engine`` refuses the rest).
    """
    stand_in = FilterNorms(upstream_norms)
    generator = torch.Generator().manual_seed(derive_seed(cell.seed, "selection"))
    select = build_strategy(cell.selection).bind(None, SelectionInputs(signal=views or {}))
    rows = TwoLayerCNNFilters().plan(stand_in, stand_in, cell.alpha, select, generator)
    mask = torch.zeros(upstream_norms.shape, dtype=torch.bool)
    for j, row in enumerate(rows):
        mask[j, row.indices] = True
    return [row.as_dict() for row in rows], mask


def _stack(groups: list[Group], key: str) -> Tensor:
    return torch.stack([g.tensors[key] for g in groups])


def _per_cell(
    cells: list[GramCell],
    layout: list[list[int]],
    value: Callable[[GramCell], Sequence[float]],
    dtype: torch.dtype,
    device: torch.device,
) -> Tensor:
    return torch.tensor([[list(value(cells[i])) for i in row] for row in layout], dtype=dtype, device=device)


def _regularizers(
    cells: list[GramCell],
    layout: list[list[int]],
    masks: Tensor,
    steps: int,
    dtype: torch.dtype,
) -> dict[str, Tensor]:
    """The downstream batch's regulariser fields of ``StageInputs``: each transfer cell's (``filter_regularizer``
    on its copied filters ``masks`` (G, C, Fm)), then neutral values for the scratch cells (the baseline is never
    regularised); none at all when no cell of the batch has an active regulariser."""
    if not any(cells[index].regularizer.active for row in layout for index in row):
        return {}
    per_cell = [
        [filter_regularizer(cells[index].regularizer, masks[g, c], steps, dtype) for c, index in enumerate(row)]
        for g, row in enumerate(layout)
    ]
    fields = {key: torch.stack([torch.stack([cell[key] for cell in row]) for row in per_cell]) for key in per_cell[0][0]}
    neutral = {
        "step_scale": torch.ones_like(fields["step_scale"]),
        "scale_until": torch.zeros_like(fields["scale_until"]),
        "decay": torch.zeros_like(fields["decay"]),
        "anchored": torch.zeros_like(fields["anchored"]),
    }
    both = {key: torch.cat([fields[key], neutral[key]], dim=1).to(masks.device) for key in fields}
    return drop_neutral(both)


def _scores(
    cells: list[GramCell],
    groups: list[Group],
    layout: list[list[int]],
    signal: Tensor,
    start: Tensor,
    bias: Tensor | None,
    upstream: Tensor | None = None,
    upstream_bias: Tensor | None = None,
) -> dict[int, dict[str, float]]:
    """Each cell's transferability scores from the downstream stage-start responses ``start`` (G, C, Fm, P), with
    transfer (G, 2C, ...: transfer then scratch) from the upstream model's responses on task 2 too: the block's cells
    scored at once (``block_scores``, on the CPU)."""
    size = len(layout[0])
    entries = [
        (g, c, index) for g, group in enumerate(groups) for c, index in enumerate(group.cells) if cells[index].transferability
    ]
    if not entries:
        return {}
    g_at, c_at = torch.tensor([e[0] for e in entries]), torch.tensor([e[1] for e in entries])
    scratch_at = c_at + size if upstream is not None else c_at

    def at(values: Tensor | None, cell: Tensor = c_at) -> Tensor | None:
        return None if values is None else values.cpu()[g_at, cell]

    first = cells[entries[0][2]]
    scores = block_scores(
        [cells[index].seed for _, _, index in entries],
        [cells[index].transferability_samples for _, _, index in entries],
        at(signal),
        torch.stack([group.tensors["c2"].cpu() for group in groups])[g_at],
        torch.stack([group.tensors["y2"].cpu() for group in groups])[g_at],
        first.model_form,
        at(start, scratch_at),
        at(bias, scratch_at),
        transfer=at(start) if upstream is not None else None,
        transfer_bias=at(bias) if upstream is not None else None,
        upstream=at(upstream),
        upstream_bias=at(upstream_bias),
        upstream_form=first.upstream_form,
    )
    return {index: score for (_, _, index), score in zip(entries, scores)}


def _run_chunk(
    cells: list[GramCell], groups: list[Group], record_coefficients: bool, eval_threads: int = 1, history: str = "full"
) -> list[tuple[int, GramResult]]:
    """Run every cell of ``groups`` (one shape) as one batched program on the groups' device; pads groups to equal
    size; the results are on the CPU and hold the curve points that ``history`` keeps (``kept_steps``: no other
    evaluation is computed)."""
    first = cells[groups[0].cells[0]]
    dtype = DTYPES[first.dtype]
    device = groups[0].tensors["gram2"].device
    size = max(len(g.cells) for g in groups)
    layout = [g.cells + [g.cells[0]] * (size - len(g.cells)) for g in groups]
    width, filters = first.width, 2 * first.width
    lr = _per_cell(cells, layout, lambda c: [c.lr], dtype, device)[..., 0]
    norms = _per_cell(cells, layout, lambda c: [c.u_norm, c.v_norm, c.v_norm], dtype, device)
    zero = torch.zeros_like(norms[..., :1])
    signal1 = torch.cat([norms[..., :2], zero], dim=-1)  # u + v1 along (b_u, b_v1, b_v2)
    signal2 = torch.cat([norms[..., :1], zero, norms[..., 2:]], dim=-1)  # u + v2

    def expand(key: str) -> Tensor:
        value = _stack(groups, key)
        return value[:, None].expand(value.shape[0], size, *value.shape[1:])

    def task_inputs(task: int) -> dict[str, Tensor]:
        """The data groups' tensors of a stage on task ``task``: Gram matrix, test products, labels."""
        keys = {"gram": "gram", "cross": "cross", "y": "y", "clean": "c", "test_y": "ty", "test_clean": "tc"}
        return {name: _stack(groups, f"{key}{task}") for name, key in keys.items()}

    def schedule(steps: int) -> dict[str, Any]:
        """The ``StageInputs`` fields of a stage of ``steps`` steps: what to evaluate, and on how many threads."""
        eval_at, loss_at = kept_steps(history, steps, first.eval_every)
        return {
            "steps": steps,
            "eval_every": first.eval_every,
            "record_coefficients": record_coefficients,
            "eval_threads": eval_threads,
            "eval_at": eval_at,
            "loss_at": loss_at,
        }

    def scratch_stage() -> Any:
        return train_stage_batch(
            StageInputs(
                start=expand("start2"),
                test_start=expand("test_start2"),
                norm2_start=expand("norm2_2"),
                **task_inputs(2),
                signal_coefficients=signal2,
                signal_norms=norms,
                lr=lr,
                **schedule(first.scratch),
                form=first.model_form,
                bias_start=expand("bias2") if first.model_form.bias else None,
            )
        )

    upstream_out = plans = masks = None
    scratch_out = None
    if first.transfer:
        upstream_out = train_stage_batch(
            StageInputs(
                start=expand("start1"),
                test_start=expand("test_start1"),
                norm2_start=expand("norm2_1"),
                **task_inputs(1),
                signal_coefficients=signal1,
                signal_norms=norms,
                lr=lr,
                **schedule(first.upstream_steps),
                form=first.upstream_form,
                bias_start=expand("bias1") if first.upstream_form.bias else None,
            )
        )
        # the plan is made on the CPU (its selection generator's), from the norms and responses brought back
        upstream_norms = upstream_out.norm2.clamp_min(0).sqrt().view(len(groups), size, 2, width).cpu()
        up = upstream_out.coefficients.view(len(groups), size * filters, -1)
        carried_start = expand("up_start2") + torch.bmm(up, _stack(groups, "mix")).view(len(groups), size, filters, -1)
        carried_cpu = carried_start.cpu()
        plans, mask_list = [], []
        for g, row in enumerate(layout):
            for c, index in enumerate(row):
                cell = cells[index]
                views = (
                    _signal_views(cell, carried_cpu[g, c], groups[g].tensors["y2"].cpu(), groups[g].tensors["c2"].cpu())
                    if build_strategy(cell.selection).needs & {"oracle", "task2"}
                    else None
                )
                plan, mask = _plan(cell, upstream_norms[g, c], views)
                plans.append(plan)
                mask_list.append(mask)
        masks = torch.stack(mask_list).view(len(groups), size, filters).to(device)
        carried_test = expand("up_test_start2") + torch.bmm(up, _stack(groups, "mix_test")).view(len(groups), size, filters, -1)
        upstream_start = carried_start  # the trained upstream's responses (LEEP reads them), whatever the control
        if first.control == "norm_matched":  # random directions with the inherited filters' norms
            scale = (upstream_out.norm2.clamp_min(0) / expand("ctl_norm2_2")).sqrt()[..., None]
            carried_start, carried_test = scale * expand("ctl_start2"), scale * expand("ctl_test_start2")
        pick = masks[..., None]
        start = torch.cat([torch.where(pick, carried_start, expand("start2")), expand("start2")], dim=1)
        test_start = torch.cat([torch.where(pick, carried_test, expand("test_start2")), expand("test_start2")], dim=1)
        norm2 = torch.cat([torch.where(masks, upstream_out.norm2, expand("norm2_2")), expand("norm2_2")], dim=1)
        bias_start = None
        if first.model_form.bias:
            bias_start = torch.cat([torch.where(masks, upstream_out.bias, expand("bias2")), expand("bias2")], dim=1)

        scores = _scores(cells, groups, layout, signal2, start, bias_start, upstream_start, upstream_out.bias)

        def twice(x: Tensor) -> Tensor:  # transfer, then scratch
            return torch.cat([x, x], dim=1)

        regularized = _regularizers(cells, layout, masks, first.downstream_steps, dtype)
        if first.scratch == first.downstream_steps:
            downstream = train_stage_batch(
                StageInputs(
                    start=start,
                    test_start=test_start,
                    norm2_start=norm2,
                    **task_inputs(2),
                    signal_coefficients=twice(signal2),
                    signal_norms=twice(norms),
                    lr=twice(lr),
                    **schedule(first.downstream_steps),
                    form=first.model_form,
                    bias_start=bias_start,
                    **regularized,
                )
            )
        else:  # a compute-matched scratch stage runs longer: transfer and scratch are two programs

            def first_half(x: Tensor | None) -> Tensor | None:
                return None if x is None else x[:, :size]

            downstream = train_stage_batch(
                StageInputs(
                    start=start[:, :size],
                    test_start=test_start[:, :size],
                    norm2_start=norm2[:, :size],
                    **task_inputs(2),
                    signal_coefficients=signal2,
                    signal_norms=norms,
                    lr=lr,
                    **schedule(first.downstream_steps),
                    form=first.model_form,
                    bias_start=first_half(bias_start),
                    **{key: value[:, :size] for key, value in regularized.items()},
                )
            )
            scratch_out = scratch_stage()
    else:
        scores = _scores(cells, groups, layout, signal2, expand("start2"), expand("bias2") if first.model_form.bias else None)
        scratch_out = downstream = scratch_stage()

    def stage(name: str, key: str, g: int, c: int, signal: Tensor, noise: dict[int, Tensor], transferred: Tensor) -> GramStage:
        out = outputs[key]
        bias = None if out.bias is None else out.bias[g, c].view(2, width).clone()
        steps = {"upstream": first.upstream_steps, "scratch": first.scratch}.get(name, first.downstream_steps)
        every_eval = eval_steps(steps, first.eval_every)
        return GramStage(
            name=name,
            steps=steps,
            eval_steps=every_eval,
            loss=loss_np[key][g, c],
            loss_steps=None if out.loss_steps is None else list(out.loss_steps),
            evaluated=None if list(out.eval_steps) == every_eval else list(out.eval_steps),
            train_acc=train_np[key][g, c],
            test_acc=test_np[key][g, c],
            decomposition=decomposition_np[key][g, c],
            signal=signal,
            noise=noise,
            transferred=transferred,
            bias=bias,
            control=first.control if name == "transfer" else "none",
            trajectory=None if out.trajectory is None else out.trajectory[g, c].view(-1, 2, width, out.trajectory.shape[-1]),
        )

    same = scratch_out is downstream
    downstream = on_cpu(downstream)
    if scratch_out is not None:
        scratch_out = downstream if same else on_cpu(scratch_out)
    if upstream_out is not None:
        upstream_out, masks = on_cpu(upstream_out), masks.cpu()
    outputs = {
        "downstream": downstream,
        **({"upstream": upstream_out} if upstream_out is not None else {}),
        **({"scratch": scratch_out} if scratch_out is not None else {}),
    }
    loss_np = {k: v.loss.double().numpy() for k, v in outputs.items()}
    train_np = {k: v.train_acc.double().numpy() for k, v in outputs.items()}
    test_np = {k: v.test_acc.double().numpy() for k, v in outputs.items()}
    decomposition_np = {k: v.decomposition.double().numpy() for k, v in outputs.items()}
    results: list[tuple[int, GramResult]] = []
    no_mask = torch.zeros(2, width, dtype=torch.bool)
    for g, group in enumerate(groups):
        for c, index in enumerate(group.cells):
            stages: dict[str, GramStage] = {}
            down = downstream.coefficients[g].view(-1, 2, width, downstream.coefficients.shape[-1])
            plan = None
            if upstream_out is not None:
                up = upstream_out.coefficients[g, c].view(2, width, -1)
                mask = masks[g, c].view(2, width)
                plan = plans[g * size + c]
                stages["upstream"] = stage("upstream", "upstream", g, c, up[..., :3].clone(), {1: up[..., 3:].clone()}, no_mask)
                # the inherited filters' start: the upstream's coefficients, or (a control) a vector of its own
                carried = mask[..., None].to(dtype) * (first.control == "none")
                stages["transfer"] = stage(
                    "transfer",
                    "downstream",
                    g,
                    c,
                    down[c, ..., :3] + carried * up[..., :3],
                    {1: carried * up[..., 3:], 2: down[c, ..., 3:].clone()},
                    mask,
                )
                if downstream.scale is not None:
                    stages["transfer"].scale = downstream.scale[g, c].view(2, width).clone()
                scratch_index = c if scratch_out is not None else size + c
            else:
                scratch_index = c
            key = "scratch" if scratch_out is not None else "downstream"
            mine = outputs[key].coefficients[g].view(-1, 2, width, outputs[key].coefficients.shape[-1])[scratch_index]
            stages["scratch"] = stage(
                "scratch", key, g, scratch_index, mine[..., :3].clone(), {2: mine[..., 3:].clone()}, no_mask
            )
            results.append((index, GramResult(cells[index], stages, plan, scores.get(index))))
    return results


def _run_spec(
    spec: tuple[list[GramCell], list[list[int]], bool, Callable[[GramResult], Any] | None, str],
) -> list[tuple[int, Any]]:
    """One chunk from scratch (data, Gram matrices, training): the unit of work of a worker process; with a
    ``summarize`` function, each result is replaced by what it returns (in the worker, so that only that comes
    back: a worker's tensors cross to the parent one shared-memory segment each).

    The d-space products and the evaluations use torch's threads; the steps run on one: they are many
    small tensor operations, which lose more to the threads' synchronisation than they gain. The chunk trains on
    its cells' device, resolved here (``resolve_device``)."""
    cells, groups, record_coefficients, summarize, history = spec
    device = resolve_device(cells[groups[0][0]].device)
    prepared = [prepare_group(cells[g[0]], g, device) for g in groups]
    threads = torch.get_num_threads()
    results: list[tuple[int, GramResult]] = []
    block_bytes = None if device.type == "cpu" else GPU_STEP_BLOCK_BYTES
    with torch_threads(1):
        for block in step_blocks(prepared, state_bytes(cells[groups[0][0]]), block_bytes):
            results.extend(_run_chunk(cells, block, record_coefficients, eval_threads=threads, history=history))
    return results if summarize is None else [(k, summarize(result)) for k, result in results]


SECONDS_PER_NORMAL, SECONDS_PER_FLOP = 2e-8, 1.3e-11
"""Rough costs on one core (float64 Gaussian draws ~50 M/s, the steps' products ~75 GFLOP/s with their elementwise
passes), for ordering chunks only (``chunk_seconds``)."""


def chunk_seconds(cells: Sequence[GramCell], groups: Sequence[Sequence[int]]) -> float:
    """A rough estimate of a chunk's seconds on one core: each group's d-space draws (its noise, test sets and inits:
    O(d) a row) and each cell's step products (2 (2m) K^2 a step and model, as ``train_stage_batch``)."""
    seconds = 0.0
    for group in groups:
        first = cells[group[0]]
        if first.sampling == "dspace":
            tests = 2 * first.n_test if first.test_space == "dspace" else 0
            rows = first.n1 + first.n2 + tests + 8 * first.width
            seconds += SECONDS_PER_NORMAL * first.d * rows
        for index in group:
            cell = cells[index]
            downstream = (2 if cell.transfer else 1) * cell.downstream_steps * (cell.n2 + 2) ** 2
            upstream = cell.upstream_steps * (cell.n1 + 2) ** 2 if cell.transfer else 0
            seconds += SECONDS_PER_FLOP * 4 * cell.width * (upstream + downstream)
    return seconds


def state_bytes(cell: GramCell) -> int:
    """Bytes of one cell's step state (the responses of its filters to the patches of its largest stage)."""
    downstream = (2 if cell.transfer else 1) * (cell.n2 + 2)
    return 2 * cell.width * max(cell.n1 + 2 if cell.transfer else 0, downstream) * DTYPES[cell.dtype].itemsize


def step_blocks(groups: list[Group], cell_bytes: int, block_bytes: int | None = None) -> Iterator[list[Group]]:
    """The groups of a chunk in blocks of about ``block_bytes`` (``STEP_BLOCK_BYTES`` when ``None``) of step state, each
    run as one program: groups larger than that are cut into near-equal parts that share their data (at least one
    cell a block)."""
    cap = max(1, (STEP_BLOCK_BYTES if block_bytes is None else block_bytes) // cell_bytes)
    pieces = []
    for group in groups:
        parts = -(-len(group.cells) // cap)
        size = -(-len(group.cells) // parts)
        pieces += [Group(group.cells[i : i + size], group.tensors) for i in range(0, len(group.cells), size)]
    block: list[Group] = []
    size = 0
    for piece in pieces:
        if block and size + len(piece.cells) > cap:
            yield block
            block, size = [], 0
        block.append(piece)
        size += len(piece.cells)
    if block:
        yield block


def iter_chunks(
    cells: Sequence[GramCell],
    max_cells: int = 60,
    record_coefficients: bool = False,
    workers: int = 1,
    summarize: Callable[[GramResult], Any] | None = None,
    chunk_map: ChunkMap | None = None,
    history: str = "full",
) -> Iterator[list[tuple[int, Any]]]:
    """Run ``cells`` in batched chunks of equal shape; yields ``[(index into cells, result)]`` per chunk (with a
    worker pool, the chunks estimated costliest first: ``chunk_seconds``).

    Cells that share a data key form a group (one data draw, one set of Gram matrices); a chunk holds
    whole groups of one shape, up to about ``max_cells`` cells (at least one group). With ``workers``
    > 1, chunks run in that many forked single-threaded processes: a chunk's steps are many small
    tensor operations, which scale across processes far better than across intra-op threads (whose
    per-operation synchronisation stalls whenever another program shares the cores). With ``chunk_map``
    (``ChunkMap``), the chunks run through it instead (submitit jobs, one a chunk; ``workers`` does not apply). Cells
    on a GPU run in this process whatever ``workers`` (one device; a forked worker cannot use CUDA once its parent
    has).

    ``history`` (``ptlab.engines.gram.results.HISTORIES``) is what the caller keeps of each stage's curves: the
    kernel computes those evaluations and losses only (``kept_steps``), and the results hold them only.
    """
    kept_steps(history, 0, 1)  # a ValueError naming the allowed histories before any work
    cells = list(cells)
    by_shape: dict[tuple, dict[tuple, list[int]]] = {}
    for index, cell in enumerate(cells):
        by_shape.setdefault(cell.shape_key, {}).setdefault(cell.data_key, []).append(index)
    chunks: list[list[list[int]]] = []
    for data_groups in by_shape.values():
        chunk: list[list[int]] = []
        for indices in sorted(data_groups.values(), key=len):
            if chunk and (sum(map(len, chunk)) + len(indices)) > max_cells:
                chunks.append(chunk)
                chunk = []
            chunk.append(indices)
        if chunk:
            chunks.append(chunk)
    specs = []
    for chunk in chunks:
        flat = [index for group in chunk for index in group]
        position = {index: k for k, index in enumerate(flat)}
        specs.append(
            (flat, ([cells[i] for i in flat], [[position[i] for i in g] for g in chunk], record_coefficients, summarize, history))
        )
    if chunk_map is not None:
        for out, (flat, _) in zip(chunk_map(_run_spec, [spec for _, spec in specs]), specs):
            yield [(flat[k], result) for k, result in out]
    elif workers > 1 and len(specs) > 1 and all(resolve_device(d).type == "cpu" for d in {c.device for c in cells}):
        # the costliest chunks first (longest processing time first), so that the pool's last chunks are short and no
        # worker waits long for the others at the end (fig2's chunks grow with d: in sweep order the largest came last)
        specs.sort(key=lambda item: -chunk_seconds(item[1][0], item[1][1]))
        with worker_pool(min(workers, len(specs))) as pool:
            for (flat, _), out in zip(specs, pool.imap(_run_spec, [spec for _, spec in specs])):
                yield [(flat[k], result) for k, result in out]
    else:
        for flat, spec in specs:
            yield [(flat[k], result) for k, result in _run_spec(spec)]


def run_cells(
    cells: Sequence[GramCell], max_cells: int = 60, record_coefficients: bool = False, workers: int = 1, history: str = "full"
) -> list[GramResult]:
    """Every cell's result, in the order of ``cells`` (with the curve points ``history`` keeps: ``iter_chunks``)."""
    out: list[GramResult | None] = [None] * len(cells)
    for chunk in iter_chunks(cells, max_cells, record_coefficients, workers, history=history):
        for index, result in chunk:
            out[index] = result
    return out  # type: ignore[return-value]

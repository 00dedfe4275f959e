"""The gram engine against plain gradient descent, the Lightning path, and the batched sweep launcher."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from mlflow.tracking import MlflowClient
from torch import Tensor

from ptlab.engines.gram import (
    DECOMPOSITION_NAMES,
    GramCell,
    batching,
    draws,
    kernel,
    reconstruct_weights,
    run_cells,
)
from ptlab.modules import sign_accuracy
from ptlab.modules.decomposition import METRIC_NAMES
from ptlab.pipeline import run_pipeline
from ptlab.pipeline.resume import config_hash
from ptlab.pipeline.sweep_templates import reads_swept_key
from ptlab.pipeline.synthetic import build_model, make_data
from ptlab.report.runs import load_pipelines
from ptlab.seeding import derive_seed
from ptlab.spec import parse
from ptlab.tracking.base import CONFIG_HASH_TAG
from ptlab.transfer import transfer_parameters

from ..conftest import SMALL, compose_config, run_cli
from ..gram_devices import DEVICES

STAGE_TASK = {"upstream": 1, "transfer": 2, "scratch": 2}


def margin(weight: Tensor, x: Tensor) -> Tensor:
    """``f(W; x)`` written out: relu on both patches, mean over filters, F_{+1} - F_{-1}."""
    scores = torch.relu(torch.einsum("npd,jmd->npjm", x, weight)).sum(1).mean(-1)
    return scores[:, 0] - scores[:, 1]


def plain_gd(weight: Tensor, x: Tensor, y: Tensor, lr: float, steps: int) -> Tensor:
    """Full-batch GD on the mean logistic loss, by autograd in d-space."""
    weight = weight.clone().requires_grad_(True)
    for _ in range(steps):
        (grad,) = torch.autograd.grad(F.softplus(-y * margin(weight, x)).mean(), weight)
        with torch.no_grad():
            weight -= lr * grad
    return weight.detach()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_float64_matches_plain_gd(make_cfg, alpha: float, device: str) -> None:
    cfg = parse(
        make_cfg(
            "train.dtype=float64",
            "task.label_noise=0.2",
            f"transfer.alpha={alpha}",
            "transfer.selection=largest_norm",
            f"engine.device={device}",
        )
    )
    result = run_cells([GramCell.from_spec(cfg)])[0]
    data = make_data(cfg)
    upstream_init = build_model(cfg, "upstream").weight.detach()
    downstream_init = build_model(cfg, "downstream").weight.detach()
    lr = cfg.train.lr
    upstream = build_model(cfg, "upstream")
    upstream.weight.data = plain_gd(upstream_init, data.task1_train.x, data.task1_train.y, lr, cfg.train.upstream_steps)
    transfer = build_model(cfg, "downstream")
    plan = transfer_parameters(
        upstream, transfer, alpha, "largest_norm", torch.Generator().manual_seed(derive_seed(cfg.seed, "selection"))
    )
    assert result.plan == [row.as_dict() for row in plan]
    expected = {
        "upstream": (upstream.weight.detach(), data.task1_test),
        "transfer": (
            plain_gd(transfer.weight.detach(), data.task2_train.x, data.task2_train.y, lr, cfg.train.downstream_steps),
            data.task2_test,
        ),
        "scratch": (
            plain_gd(downstream_init, data.task2_train.x, data.task2_train.y, lr, cfg.train.downstream_steps),
            data.task2_test,
        ),
    }
    noise = {1: data.task1_train.noise, 2: data.task2_train.noise}
    for stage, (weight, test) in expected.items():
        got = reconstruct_weights(result.stages[stage], data.directions.basis, noise, upstream_init, downstream_init)
        assert ((got - weight).norm() / weight.norm()).item() < 1e-9, stage
        assert result.stages[stage].final["test_acc"] == sign_accuracy(margin(weight, test.x), test.y), stage
    copied = result.stages["transfer"].transferred
    assert copied.sum().item() == sum(row.copied for row in plan)


def test_data_does_not_depend_on_signal_norms(make_cfg) -> None:
    """Cells that differ in u_norm/v_norm share one data draw: the engine relies on it."""
    a, b = make_data(parse(make_cfg("task.u_norm=0.0"))), make_data(parse(make_cfg("task.u_norm=3.0", "task.v_norm=0.5")))
    assert torch.equal(a.directions.basis, b.directions.basis)
    for name in ("task1_train", "task1_test", "task2_train", "task2_test"):
        assert torch.equal(getattr(a, name).noise, getattr(b, name).noise)
        assert torch.equal(getattr(a, name).y, getattr(b, name).y)


@pytest.mark.parametrize(
    ("shared_gram", "block_bytes"),
    [(False, batching.STEP_BLOCK_BYTES), (True, batching.STEP_BLOCK_BYTES), (True, 1)],
    ids=["per_cell_gram", "shared_noise_gram", "cell_blocks"],
)
@pytest.mark.parametrize("device", DEVICES)
def test_batched_cells_equal_single_cells(make_cfg, shared_gram: bool, block_bytes: int, device: str, monkeypatch) -> None:
    """A batch of cells of different d and norms, run in two worker processes (in this process on a GPU), gives each
    cell what it gets alone (with the response update by each cell's patch Gram matrix and by the group's noise block,
    and with the groups cut into one-cell step blocks)."""
    monkeypatch.setattr(kernel, "SHARED_GRAM_SAMPLES", 1 if shared_gram else 10**9)
    monkeypatch.setattr(batching, "STEP_BLOCK_BYTES", block_bytes)
    monkeypatch.setattr(batching, "GPU_STEP_BLOCK_BYTES", block_bytes)
    cfgs = [
        make_cfg("train.dtype=float64", f"task.d={d}", f"task.u_norm={u}", f"seed={s}", f"engine.device={device}")
        for d, u, s in ((60, 0.0, 0), (60, 2.0, 0), (90, 1.0, 0), (60, 1.0, 1))
    ]
    cells = [GramCell.from_spec(parse(cfg)) for cfg in cfgs]
    batched = run_cells(cells, max_cells=3, workers=2)
    for cell, together in zip(cells, batched):
        alone = run_cells([cell])[0]
        for stage in ("upstream", "transfer", "scratch"):
            torch.testing.assert_close(together.stages[stage].signal, alone.stages[stage].signal, rtol=1e-9, atol=1e-12)
            assert together.stages[stage].final == pytest.approx(alone.stages[stage].final, rel=1e-9)


def test_a_pool_takes_the_costliest_chunks_first(make_cfg) -> None:
    """``chunk_seconds`` grows with d (the draws) and N1 (the steps); a worker pool runs the costliest chunk first and
    gives every cell the result it gets in a single process."""
    base = GramCell.from_spec(parse(make_cfg("train.dtype=float64")))
    small, large_d, large_n = base, dataclasses.replace(base, d=2000), dataclasses.replace(base, n1=80)
    assert batching.chunk_seconds([large_d], [[0]]) > batching.chunk_seconds([small], [[0]])
    assert batching.chunk_seconds([large_n], [[0]]) > batching.chunk_seconds([small], [[0]])
    cells = [dataclasses.replace(base, d=d, seed=s) for d, s in ((60, 0), (60, 1), (900, 0), (300, 0))]
    pooled = list(batching.iter_chunks(cells, max_cells=1, workers=2))
    assert [chunk[0][0] for chunk in pooled] == [2, 3, 0, 1]
    alone = {index: result for chunk in batching.iter_chunks(cells, max_cells=1) for index, result in chunk}
    for chunk in pooled:
        for index, result in chunk:
            assert result.stages["transfer"].final == alone[index].stages["transfer"].final


@pytest.mark.parametrize("project", [True, False])
def test_projected_noise_is_exactly_orthogonal_to_the_signals(make_cfg, project: bool, monkeypatch) -> None:
    """With projected noise, a d-space draw's products of the signal directions with every noise patch (train and test,
    both tasks) are exactly 0, where the products computed hold only the projection's rounding (< 1e-12 of the norms in
    float64); every other product is the computed one. Without projection nothing is zeroed."""
    cell = GramCell.from_spec(parse(make_cfg("train.dtype=float64", f"task.project_noise={str(project).lower()}")))
    zeroed = draws.prepare_group(cell, [0]).tensors
    monkeypatch.setattr(draws, "_orthogonal", lambda *args: None)
    computed = draws.prepare_group(cell, [0]).tensors
    basis_noise, noise_basis, basis_test = (
        (slice(0, 3), slice(3, None)),
        (slice(3, None), slice(0, 3)),
        (slice(0, 3), slice(None)),
    )
    blocks = {key: [basis_noise, noise_basis] for key in ("gram1", "gram2", "mix")}
    blocks |= {key: [basis_test] for key in ("cross1", "cross2", "mix_test")}
    for key, tensor in computed.items():
        if not project or key not in blocks:
            assert torch.equal(zeroed[key], tensor), key
            continue
        rest = zeroed[key].clone()
        for rows, columns in blocks[key]:
            assert not zeroed[key][rows, columns].any(), key
            assert tensor[rows, columns].abs().max() < 1e-12 * tensor.abs().max(), key
            rest[rows, columns] = tensor[rows, columns]
        assert torch.equal(rest, tensor), key


@pytest.mark.parametrize(
    ("dtype", "bias", "sampling"),
    [("float32", False, "dspace"), pytest.param("float64", True, "gram", marks=pytest.mark.slow)],
)
def test_padded_patches_give_the_same_numbers(make_cfg, dtype: str, bias: bool, sampling: str, monkeypatch) -> None:
    """The shared-noise-Gram steps on a patch axis padded to 64 bytes (K = 202 -> 208) give the numbers of the unpadded
    axis to rounding (every stage's curves, coefficients and biases) for a batch of 20 cells, with and without a bias,
    with noise and signals uncoupled (gram sampling) and coupled (d-space noise not projected off the signals): BLAS
    rounds a product by its layout."""
    monkeypatch.setattr(kernel, "SHARED_GRAM_SAMPLES", 1)
    overrides = [f"train.dtype={dtype}", f"model.bias={str(bias).lower()}", "model.width=40", "task.n1=200", "task.d=300"]
    overrides += [
        "train.eval_every=7",
        f"task.sampling={sampling}",
        f"task.test_space={'response' if sampling == 'gram' else 'dspace'}",
        f"task.project_noise={str(sampling == 'gram').lower()}",
    ]
    cell = GramCell.from_spec(parse(make_cfg(*overrides)))
    cells = [dataclasses.replace(cell, u_norm=u / 8) for u in range(20)]
    padded = run_cells(cells, record_coefficients=True)
    monkeypatch.setattr(kernel, "ROW_ALIGN_BYTES", 1)
    plain = run_cells(cells, record_coefficients=True)
    tolerance = {"rtol": 1e-5, "atol": 1e-7} if dtype == "float32" else {"rtol": 1e-12, "atol": 1e-15}
    for one, other in zip(padded, plain):
        for stage in ("upstream", "transfer", "scratch"):
            a, b = one.stages[stage], other.stages[stage]
            for name in ("loss", "train_acc", "test_acc", "decomposition", "signal", "trajectory", "bias"):
                x, y = getattr(a, name), getattr(b, name)
                assert (x is None) == (y is None), (stage, name)
                if x is not None:
                    torch.testing.assert_close(torch.as_tensor(x), torch.as_tensor(y), **tolerance, msg=f"{stage} {name}")
            for task, noise in a.noise.items():
                torch.testing.assert_close(noise, b.noise[task], **tolerance)


@pytest.mark.parametrize("device", DEVICES)
def test_evaluations_do_not_depend_on_how_many_are_batched(make_cfg, device: str, monkeypatch) -> None:
    """Eval steps evaluated one at a time (a 1-byte block) give the curves and coefficients of the default."""
    cfg = parse(make_cfg("train.dtype=float64", "task.label_noise=0.1", "train.eval_every=3", f"engine.device={device}"))
    cell = GramCell.from_spec(cfg)
    together = run_cells([cell], record_coefficients=True)[0]
    monkeypatch.setattr(kernel, "EVAL_BLOCK_BYTES", 1)
    alone = run_cells([cell], record_coefficients=True)[0]
    for stage in ("upstream", "transfer", "scratch"):
        a, b = together.stages[stage], alone.stages[stage]
        assert a.eval_steps == b.eval_steps and len(a.eval_steps) > 3
        for name in ("loss", "train_acc", "test_acc", "decomposition"):
            assert getattr(a, name) == pytest.approx(getattr(b, name), rel=1e-12, abs=1e-12), (stage, name)
        torch.testing.assert_close(a.trajectory, b.trajectory, rtol=1e-12, atol=1e-12)


def child_metrics(client: MlflowClient, experiment_id: str) -> dict[str, dict[str, list[tuple[int, float]]]]:
    runs = client.search_runs([experiment_id], "tags.`ptlab.stage` != 'pipeline'")
    return {
        run.data.tags["ptlab.stage"]: {
            key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)] for key in run.data.metrics
        }
        for run in runs
    }


@pytest.mark.parametrize("device", DEVICES)
def test_same_tracking_as_lightning(make_cfg, tmp_path: Path, device: str) -> None:
    """engine=gram logs the metrics Lightning logs, at the same steps, with the same values (float64; the gram
    engine on ``device``, Lightning on the CPU)."""
    assert set(DECOMPOSITION_NAMES) == set(METRIC_NAMES)
    summaries, metrics = {}, {}
    for engine in ("lightning", "gram"):
        on = [f"engine.device={device}"] if engine == "gram" else []
        cfg = make_cfg(
            f"engine={engine}",
            "train.dtype=float64",
            "task.label_noise=0.1",
            "cache.enabled=false",
            *on,
            "train.upstream_steps=25",
            "train.downstream_steps=12",
            "train.eval_every=5",
            f"logger.experiment_name={engine}",
        )
        summaries[engine] = run_pipeline(cfg, tmp_path / engine)
        client = MlflowClient(summaries[engine]["mlflow"]["tracking_uri"])
        metrics[engine] = child_metrics(client, summaries[engine]["mlflow"]["experiment_id"])
    for stage in ("upstream", "transfer", "scratch"):
        assert summaries["gram"][stage]["test_acc"] == summaries["lightning"][stage]["test_acc"]
        assert summaries["gram"][stage]["train_loss"] == pytest.approx(summaries["lightning"][stage]["train_loss"], rel=1e-9)
        ref, got = metrics["lightning"][stage], metrics["gram"][stage]
        assert set(got) == set(ref)
        for key in ref:
            assert [s for s, _ in got[key]] == [s for s, _ in ref[key]], (stage, key)
            assert [v for _, v in got[key]] == pytest.approx([v for _, v in ref[key]], rel=1e-7, abs=1e-12), (stage, key)
    assert summaries["gram"]["transfer"]["plan"] == summaries["lightning"]["transfer"]["plan"]


@pytest.mark.slow
def test_float32_close_to_lightning(make_cfg, tmp_path: Path) -> None:
    """The default float32 path stays within float32 rounding of the Lightning path."""
    cfg = make_cfg("logger=none", "cache.enabled=false")
    lightning = run_pipeline(cfg, tmp_path / "lightning")
    cfg = make_cfg("logger=none", "engine=gram")
    gram = run_pipeline(cfg, tmp_path / "gram")
    for stage in ("upstream", "transfer", "scratch"):
        assert gram[stage]["train_loss"] == pytest.approx(lightning[stage]["train_loss"], rel=1e-4)
        assert abs(gram[stage]["test_acc"] - lightning[stage]["test_acc"]) <= 0.02


def test_sweep_through_cli(tmp_path: Path) -> None:
    """``-m`` with the batched launcher: one FINISHED parent (with its three children) per cell, the
    report reads them, each job dir has its summary.json."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "-m",
        "engine=gram",
        "hydra/launcher=ptlab_gram",
        "hydra/sweeper=ptlab_batched",
        "hydra.launcher.history=eval",
        *SMALL,
        "task.d=50,80",
        "task.u_norm=0.0,2.0",
        "seed=0,1",
        f"logger.tracking_uri={uri}",
        "logger.experiment_name=gram_sweep",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = load_pipelines(uri, "gram_sweep")
    assert len(runs) == 8
    client = MlflowClient(uri)
    for run_id in runs["run_id"]:
        children = client.search_runs([runs["experiment_id"][0]], f"tags.`mlflow.parentRunId` = '{run_id}'")
        assert sorted(c.data.tags["ptlab.stage"] for c in children) == ["scratch", "transfer", "upstream"]
        assert all(c.info.status == "FINISHED" for c in children)
    assert sorted(runs["params.task.d"].astype(int).unique()) == [50, 80]
    assert sorted(p.parent.name for p in (tmp_path / "sweep").glob("*/summary.json")) == [str(i) for i in range(8)]
    transfer_run = next(c for c in children if c.data.tags["ptlab.stage"] == "transfer")
    history = client.get_metric_history(transfer_run.info.run_id, "acc/test")
    assert [m.step for m in history] == list(range(0, 30, 10)) + [30]
    first = runs[(runs["params.task.d"] == "50") & (runs["params.task.u_norm"] == "0.0") & (runs["params.seed"] == "0")]
    job = parse(compose_config(["engine=gram", *SMALL, "task.d=50", "task.u_norm=0.0", "seed=0"]))
    assert first[f"tags.{CONFIG_HASH_TAG}"].item() == config_hash(job)  # the fast job path hashes as run_pipeline


@pytest.mark.slow
def test_batched_layout_equals_single_run(make_cfg, tmp_path: Path) -> None:
    """A sweep job written by the batched launcher has the tags, params, metrics and artifacts of the same
    config run alone through ``run_pipeline`` (engine=gram)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "-m",
        "engine=gram",
        "hydra/launcher=ptlab_gram",
        "hydra/sweeper=ptlab_batched",
        "hydra.launcher.history=full",
        *SMALL,
        "task.d=50",
        f"logger.tracking_uri={uri}",
        "logger.experiment_name=batched",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    single = run_pipeline(make_cfg("engine=gram", "task.d=50", "logger.experiment_name=single"), tmp_path / "single")
    client = MlflowClient(uri)

    def layout(experiment: str) -> dict[str, tuple]:
        found = client.get_experiment_by_name(experiment)
        out = {}
        for run in client.search_runs([found.experiment_id]):
            stage = run.data.tags["ptlab.stage"]
            artifacts = sorted(a.path for a in client.list_artifacts(run.info.run_id) if a.path != "decomposition.png")
            history = {key: len(client.get_metric_history(run.info.run_id, key)) for key in run.data.metrics}
            # mlflow.source.* differ by entry point; a single run goes through the upstream cache (ptlab.cache.*),
            # a batched cell trains its upstream inside the batch
            tags = sorted(t for t in run.data.tags if not t.startswith(("mlflow.source.", "ptlab.cache")))
            out[stage] = (tags, sorted(run.data.params), history, artifacts, run.info.status)
        return out

    batched = layout("batched")
    assert batched.pop("sweep")[3] == ["sweep_summary.md"]  # the sweep's answer (ptlab.sweep_summary), sweeps only
    assert batched == layout("single")
    parent = client.search_runs([client.get_experiment_by_name("batched").experiment_id], "tags.`ptlab.stage` = 'pipeline'")[0]
    assert parent.data.metrics["transfer_test_acc"] == single["transfer"]["test_acc"]
    for name in ("logme", "leep", "logme_scratch"):  # from the responses in the batch, from the models alone
        assert parent.data.metrics[f"transferability/{name}"] == pytest.approx(single["transferability"][name], rel=1e-4)


def test_swept_key_read_by_an_interpolation(tmp_path: Path) -> None:
    """``upstream_model: ${model}`` reads a swept ``model.width``: each batched job's upstream model takes the job's
    width, as ``run_pipeline`` composes it (the upstream filters and the plan follow it)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "-m",
        "engine=gram",
        "hydra/launcher=ptlab_gram",
        "hydra/sweeper=ptlab_batched",
        "hydra.launcher.history=last",
        *SMALL,
        "task.d=50",
        "model.width=4,6",
        f"logger.tracking_uri={uri}",
        "logger.experiment_name=width",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = load_pipelines(uri, "width")
    assert sorted(runs["params.model.width"]) == ["4", "6"]
    assert (runs["params.upstream_model.width"] == runs["params.model.width"]).all()
    for width in (4, 6):
        job = parse(compose_config(["engine=gram", *SMALL, "task.d=50", f"model.width={width}"]))
        row = runs[runs["params.model.width"] == str(width)]
        assert row[f"tags.{CONFIG_HASH_TAG}"].item() == config_hash(job)


@pytest.mark.parametrize(
    ("interpolation", "keys", "reads"),
    [
        ("${model}", ["model.width"], True),
        ("${model.width}", ["model.width"], True),
        ("${model.width}", ["model"], True),
        ("${task.d}", ["model.width", "task.n1"], False),
        ("${.width}", ["model.width"], True),
        ("${.lr}", ["train.lr"], True),
        ("${.train}", ["train.lr"], True),
        ("${.train}", ["model.width"], False),
        ("${oc.select:train.lr,0.1}", ["train.lr"], True),
        ("${oc.select:train.lr,0.1}", ["train.lr_decay"], False),
        ("${now:%Y-%m-%d}", ["task.d"], False),
        # hydra values: a template (group choices, hydra overrides) fixes these whatever a job's values are ...
        ("${hydra:runtime.choices.experiment}", ["seed", "transfer.alpha"], False),
        ("e_${hydra:runtime.choices.model}_${hydra:job.name}", ["seed"], False),
        ("${hydra:runtime.cwd}/${hydra:sweep.dir}", ["seed"], False),
        ("${hydra:runtime.version}", ["seed"], False),
        # ... and not these (per job), nor anything unknown or read in a form that is not parsed
        ("${hydra:job.num}", ["seed"], True),
        ("${hydra:job.id}", ["seed"], True),
        ("e${hydra:job.override_dirname}", ["seed"], True),
        ("${hydra:runtime.output_dir}", ["seed"], True),
        ("${hydra:sweep.subdir}", ["seed"], True),
        ("${hydra:overrides.task}", ["seed"], True),
        ("${hydra:some.future.key}", ["seed"], True),
        ("${hydra:runtime.choices.${task.name}}", ["seed"], True),
        ("${hydra.job.num}", ["seed"], True),
        ("${hydra:runtime.choices.experiment}_${seed}", ["seed"], True),
    ],
)
def test_reads_swept_key(interpolation: str, keys: list[str], reads: bool) -> None:
    assert reads_swept_key(interpolation, keys) is reads


@pytest.mark.parametrize(
    ("sweep_dir", "reads"),
    [
        ("multirun/${now:%H-%M-%S}", False),
        ("multirun/${seed}", True),
        ("multirun/${hydra.job.num}", True),
        ("m/${hydra.job.name}", False),
    ],
)
def test_a_per_template_hydra_value_reads_what_its_own_interpolations_read(sweep_dir: str, reads: bool) -> None:
    """``${hydra:sweep.dir}`` is fixed by the template unless hydra's own ``sweep.dir`` reads a job's value."""
    hydra = {"sweep": {"dir": sweep_dir, "subdir": "${hydra.job.num}"}, "job": {"name": "ptlab"}}
    assert reads_swept_key("${hydra:sweep.dir}/x", ["seed"], hydra) is reads


def test_step_blocks_cut_large_groups_evenly(monkeypatch) -> None:
    """Groups above the step budget are cut into near-equal parts sharing their tensors; small ones are packed."""
    monkeypatch.setattr(batching, "STEP_BLOCK_BYTES", 800)
    shared = {"gram2": torch.zeros(1)}
    groups = [draws.Group(list(range(20)), shared), draws.Group([20, 21], {}), draws.Group([22, 23, 24], {})]
    blocks = list(batching.step_blocks(groups, cell_bytes=100))  # 8 cells a block
    assert [[len(g.cells) for g in block] for block in blocks] == [[7], [7], [6, 2], [3]]
    assert all(g.tensors is shared for block in blocks[:2] for g in block)
    assert [i for block in blocks for g in block for i in g.cells] == list(range(25))


def stage_inputs(
    groups: int = 1, cells: int = 2, filters: int = 4, n: int = 3, n_test: int = 5, **changes: Tensor
) -> kernel.StageInputs:
    """A kernel input of zero filters (every response 0) of the given shapes; ``changes`` replace tensors."""
    p = 3 + n
    tensors = dict(
        start=torch.zeros(groups, cells, filters, p),
        test_start=torch.zeros(groups, cells, filters, n_test),
        norm2_start=torch.zeros(groups, cells, filters),
        gram=torch.eye(p).expand(groups, p, p),
        cross=torch.zeros(groups, p, n_test),
        y=torch.tensor([[1.0, -1.0, 1.0][:n]] * groups),
        clean=torch.ones(groups, n),
        test_y=torch.ones(groups, n_test),
        test_clean=torch.ones(groups, n_test),
        signal_coefficients=torch.zeros(groups, cells, 3),
        signal_norms=torch.ones(groups, cells, 3),
        lr=torch.full((groups, cells), 0.1),
    )
    return kernel.StageInputs(**{**tensors, **changes}, steps=4, eval_every=2)


def test_kernel_takes_one_stage_inputs_and_rejects_a_tensor_of_the_wrong_shape() -> None:
    """Zero filters stay zero under ReLU GD (relu'(0) = 0): the loss is log 2 at every step, the
    coefficients 0; a tensor whose shape disagrees with ``start`` and the labels is named with the shape it
    must have."""
    out = kernel.train_stage_batch(stage_inputs())
    assert out.loss.shape == (1, 2, 5) and out.train_acc.shape == out.test_acc.shape == (1, 2, 3)
    assert out.decomposition.shape == (1, 2, 3, len(DECOMPOSITION_NAMES))
    assert out.coefficients.shape == (1, 2, 4, 6)
    torch.testing.assert_close(out.loss, torch.full((1, 2, 5), float(torch.log(torch.tensor(2.0)))))
    assert not out.coefficients.any() and out.trajectory is None and out.bias is None
    with pytest.raises(ValueError, match=r"StageInputs.cross has shape \(1, 6, 4\): must be \(1, 6, 5\)"):
        stage_inputs(cross=torch.zeros(1, 6, 4))
    with pytest.raises(ValueError, match=r"StageInputs.lr has shape \(2,\): must be \(1, 2\)"):
        stage_inputs(lr=torch.full((2,), 0.1))
    with pytest.raises(ValueError, match=r"StageInputs.start has shape \(1, 2, 4, 7\): must be \(G, C, 2m"):
        stage_inputs(start=torch.zeros(1, 2, 4, 7), gram=torch.eye(7)[None], cross=torch.zeros(1, 7, 5))


def test_history_last_gives_the_full_history_finals_with_fewer_evaluations(make_cfg, monkeypatch) -> None:
    """Cells trained for ``history=last`` (the sweep's default) evaluate each stage once, at its last step, and
    compute its last loss only, and give exactly the final numbers, coefficients, last curve points and scores of
    the same cells trained for ``full``; ``eval`` keeps the eval steps' points of ``full``; a diverged cell is
    reported at the same step; a stage trained for less history refuses to give more."""
    cfgs = [make_cfg(f"task.u_norm={u}", f"seed={s}") for u, s in ((0.5, 0), (2.0, 0), (1.0, 1))]
    cells = [GramCell.from_spec(parse(cfg)) for cfg in [*cfgs, make_cfg("train.scratch_budget=matched")]]
    evaluated: list[int] = []
    losses: list[int] = []
    accuracy, softplus = kernel._accuracy, F.softplus

    def counted_accuracy(margin: Tensor, y: Tensor) -> Tensor:
        evaluated.append(margin.shape[1])  # (G, E, C, n): E eval steps at once
        return accuracy(margin, y)

    def counted_softplus(x: Tensor, *args: float) -> Tensor:
        losses.append(x.shape[0] if x.dim() == 4 else 0)  # (steps, G, C, N): the kernel's loss
        return softplus(x, *args)

    monkeypatch.setattr(kernel, "_accuracy", counted_accuracy)
    monkeypatch.setattr(kernel.F, "softplus", counted_softplus)
    runs, counts = {}, {}
    for history in ("full", "eval", "last"):
        evaluated.clear()
        losses.clear()
        runs[history] = run_cells(cells, history=history)
        counts[history] = (sum(evaluated) // 2, sum(losses))  # train and test accuracy: two calls an evaluation
    # two chunks (the matched scratch is another shape): 60 upstream steps evaluated every 10, 30 downstream (transfer
    # and scratch in one program); the matched chunk's scratch is a third program of 90 steps
    assert counts["full"] == (7 + 4 + 7 + 4 + 10, 61 + 31 + 61 + 31 + 91)
    assert counts["eval"] == (counts["full"][0], 7 + 4 + 7 + 4 + 10)
    assert counts["last"] == (5, 5)
    for full, eval_, last in zip(runs["full"], runs["eval"], runs["last"]):
        assert last.transferability == full.transferability and last.plan == full.plan
        assert eval_.stage_results("eval").keys() == full.stage_results().keys()
        for name, stage in full.stages.items():
            short = last.stages[name]
            assert short.final == stage.final and short.evaluated == [stage.steps] and short.loss_steps == [stage.steps]
            assert short.curves_for("last") == stage.curves_for("last")
            assert eval_.stages[name].curves_for("eval") == stage.curves_for("eval")
            assert torch.equal(short.signal, stage.signal) and short.noise.keys() == stage.noise.keys()
            assert all(torch.equal(short.noise[k], stage.noise[k]) for k in stage.noise)
            with pytest.raises(ValueError, match=f"stage {name}: its curves were computed for a shorter history"):
                short.curves_for("eval")
        assert last.stage_results("last")["transfer"].final == full.stage_results("last")["transfer"].final
    diverged = GramCell.from_spec(parse(make_cfg("noise.sigma_p1=1e30")))
    messages = {history: str(run_cells([diverged], history=history)[0].divergence()) for history in ("full", "last")}
    assert messages["last"] == messages["full"] and "diverged at step" in messages["full"]

"""Fine-tuning regularisers on the inherited units (``regularizer=l2sp|freeze|lr_scale``): the Lightning path and the
gram engine against plain autograd GD with the same penalty and step multiplier, freezing bit for bit, the image
classifier's masks, momentum and weight decay, and the preflight."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from ptlab.config import validate
from ptlab.engines.base import Stage
from ptlab.engines.gram import DECOMPOSITION_NAMES, GramCell, GramEngine, reconstruct_weights, run_cells
from ptlab.engines.lightning import LightningEngine
from ptlab.errors import ConfigError
from ptlab.models.two_layer_cnn import TwoLayerReLUCNN
from ptlab.modules.image_classifier import ImageClassifier
from ptlab.modules.regularizers import Regularizer
from ptlab.pipeline.synthetic import build_model, make_data
from ptlab.seeding import derive_seed
from ptlab.spec import parse
from ptlab.transfer import Transfer, transfer_parameters
from ptlab.transfer.inherited import inherited_units

from ..conftest import compose_config, run_cli

BASE = (
    "train.dtype=float64",
    "task.d=40",
    "task.n1=12",
    "task.n2=8",
    "task.n_test=60",
    "model.width=4",
    "train.upstream_steps=20",
    "train.downstream_steps=15",
    "train.eval_every=5",
    "task.label_noise=0.2",
    "train.lr=0.2",
    "model.init_std=0.1",
    "transfer.selection=largest_norm",
    "transfer.alpha=0.5",
)
REGULARIZERS = {
    "l2sp": ["regularizer=l2sp", "regularizer.lam=0.3"],
    "l2sp_own_decay": ["regularizer=l2sp", "regularizer.lam=0.3", "regularizer.decay=0.1"],
    "l2sp_anchor_only": ["regularizer=l2sp", "regularizer.lam=0.5", "regularizer.decay=0.0"],
    "freeze": ["regularizer=freeze", "regularizer.k=6"],
    "freeze_always": ["regularizer=freeze", "regularizer.k=100"],
    "lr_scale": ["regularizer=lr_scale", "regularizer.scale=0.3"],
}
TOLERANCE = 1e-7
"""Relative distance of float64 weights between two exact computations of the same GD: rounding only, amplified over
15 steps of lr 0.2 by the inherited filters' large norms (without a regulariser the Lightning transfer stage and
autograd GD already differ by 5e-9 on this config; a wrong penalty or multiplier moves the weights by > 1e-3)."""


def config(make_cfg, *overrides: str):
    return make_cfg(*BASE, *overrides, small=False)


def reference_margin(model: TwoLayerReLUCNN, weight: Tensor, bias: Tensor | None, x: Tensor) -> Tensor:
    """The paper's margin written out: relu on both patches (+ bias), mean over filters, F_{+1} - F_{-1}."""
    pre = torch.einsum("npd,jmd->npjm", x, weight)
    if bias is not None:
        pre = pre + bias
    scores = pre.clamp(min=0).sum(1).sum(-1) / model.width
    return scores[:, 0] - scores[:, 1]


def reference_gd(
    model: TwoLayerReLUCNN, inherited: Tensor, x: Tensor, y: Tensor, lr: float, steps: int, regularizer: Regularizer
) -> tuple[Tensor, Tensor | None]:
    """Plain autograd GD on ``mean softplus(-y f) + lam ||w - w(0)||^2 on inherited (2, m) + decay ||w||^2 on the rest``,
    each step of an inherited filter (and its bias) times ``regularizer.multiplier(t)``."""
    weight = model.weight.detach().clone().requires_grad_(True)
    bias = None if model.bias is None else model.bias.detach().clone().requires_grad_(True)
    anchor_w, anchor_b = weight.detach().clone(), None if bias is None else bias.detach().clone()
    lam, decay = regularizer.anchor_coefficient, regularizer.decay_coefficient
    params = [weight] + ([bias] if bias is not None else [])
    for t in range(steps):
        loss = F.softplus(-y * reference_margin(model, weight, bias, x)).mean()
        for p, anchor, mask in ((weight, anchor_w, inherited[..., None]), (bias, anchor_b, inherited)):
            if p is not None:
                loss = loss + lam * ((p - anchor) ** 2 * mask).sum() + decay * (p**2 * ~mask).sum()
        grads = torch.autograd.grad(loss, params)
        m = regularizer.multiplier(t)
        with torch.no_grad():
            for p, g in zip(params, grads):
                scale = torch.where(inherited[..., None] if p.dim() == 3 else inherited, m, 1.0)
                p -= lr * scale * g
    return weight.detach(), None if bias is None else bias.detach()


def trained_upstream(cfg, data) -> TwoLayerReLUCNN:
    upstream = build_model(parse(cfg), "upstream")
    w, b = reference_gd(
        upstream,
        torch.zeros(2, upstream.width, dtype=torch.bool),
        data.task1_train.x,
        data.task1_train.y,
        cfg.train.lr,
        cfg.train.upstream_steps,
        Regularizer(),
    )
    with torch.no_grad():
        upstream.weight.copy_(w)
        if b is not None:
            upstream.bias.copy_(b)
    return upstream


def transfer_stage(cfg, data, upstream: TwoLayerReLUCNN, regularizer: Regularizer, steps: int | None = None) -> Stage:
    transfer = Transfer(upstream, cfg.transfer.alpha, cfg.transfer.selection, derive_seed(cfg.seed, "selection"))
    return Stage(
        "transfer",
        build_model(parse(cfg), "downstream"),
        data.task2_train,
        data.task2_test,
        steps if steps is not None else cfg.train.downstream_steps,
        cfg.train.lr,
        cfg.train.eval_every,
        data.directions,
        2,
        transfer,
        cfg.train.dtype,
        regularizer,
    )


def expected_transfer(cfg, data, upstream: TwoLayerReLUCNN, regularizer: Regularizer) -> tuple[Tensor, Tensor | None, Tensor]:
    """The reference's transfer model after the downstream steps, and the inherited mask read off the plan rows."""
    model = build_model(parse(cfg), "downstream")
    plan = transfer_parameters(
        upstream,
        model,
        cfg.transfer.alpha,
        cfg.transfer.selection,
        torch.Generator().manual_seed(derive_seed(cfg.seed, "selection")),
    )
    inherited = torch.zeros(2, model.width, dtype=torch.bool)
    for j, row in enumerate(plan):
        inherited[j, row.indices] = True
    w, b = reference_gd(
        model, inherited, data.task2_train.x, data.task2_train.y, cfg.train.lr, cfg.train.downstream_steps, regularizer
    )
    return w, b, inherited


def relative(a: Tensor, b: Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_regularizer_values() -> None:
    """The multiplier schedule, the coefficients and the summary entry of each option."""
    freeze = Regularizer("freeze", k=3)
    assert [freeze.multiplier(t) for t in range(5)] == [0.0, 0.0, 0.0, 1.0, 1.0]
    assert Regularizer("lr_scale", scale=0.25).multiplier(7) == 0.25
    l2sp = Regularizer.from_config({"name": "l2sp", "lam": 0.2, "decay": None})
    assert (l2sp.anchor_coefficient, l2sp.decay_coefficient) == (0.2, 0.2)
    assert Regularizer("l2sp", lam=0.2, decay=0.0).decay_coefficient == 0.0
    assert l2sp.as_dict() == {"name": "l2sp", "lam": 0.2, "decay": 0.2}
    assert freeze.as_dict() == {"name": "freeze", "k": 3}
    assert not Regularizer("freeze", k=0).active and not Regularizer("lr_scale", scale=1.0).active
    assert Regularizer.from_config(None) == Regularizer()


@pytest.mark.parametrize("name", ["l2sp", "freeze", "lr_scale"])
def test_lightning_matches_autograd(make_cfg, name: str) -> None:
    """FullBatchGD with the regulariser (the transfer stage on the Lightning engine) equals autograd GD with the same
    penalty and multiplier, float64, to ``TOLERANCE``."""
    cfg = config(make_cfg, *REGULARIZERS[name])
    regularizer = Regularizer.from_config(cfg.regularizer)
    data = make_data(parse(cfg))
    upstream = trained_upstream(cfg, data)
    stage = transfer_stage(cfg, data, upstream, regularizer)
    LightningEngine().train_stage(stage)
    weight, _, inherited = expected_transfer(cfg, data, upstream, regularizer)
    assert 0 < inherited.sum() < inherited.numel()
    assert relative(stage.model.weight.detach(), weight) < TOLERANCE
    plain, _, _ = expected_transfer(cfg, data, upstream, Regularizer())
    assert relative(plain, weight) > 1e-3  # the regulariser changed the result


@pytest.mark.parametrize("name", list(REGULARIZERS))
def test_gram_matches_autograd(make_cfg, name: str) -> None:
    """The gram engine (the batched cell path) with the regulariser: its transfer stage's filters, rebuilt from the
    coefficients (and the init's decay factor), equal autograd GD's to ``TOLERANCE``; the scratch stage is the
    unregularised one."""
    cfg = config(make_cfg, *REGULARIZERS[name])
    regularizer = Regularizer.from_config(cfg.regularizer)
    result = run_cells([GramCell.from_spec(parse(cfg))])[0]
    data = make_data(parse(cfg))
    upstream = trained_upstream(cfg, data)
    weight, _, inherited = expected_transfer(cfg, data, upstream, regularizer)
    upstream_init = build_model(parse(cfg), "upstream").weight.detach()
    downstream_init = build_model(parse(cfg), "downstream").weight.detach()
    noise = {1: data.task1_train.noise, 2: data.task2_train.noise}
    transfer = result.stages["transfer"]
    assert torch.equal(transfer.transferred, inherited)
    got = reconstruct_weights(transfer, data.directions.basis, noise, upstream_init, downstream_init)
    assert relative(got, weight) < TOLERANCE
    scratch, _, _ = expected_transfer(cfg, data, upstream, Regularizer())
    scratch = reference_gd(
        build_model(parse(cfg), "downstream"),
        torch.zeros_like(inherited),
        data.task2_train.x,
        data.task2_train.y,
        cfg.train.lr,
        cfg.train.downstream_steps,
        Regularizer(),
    )[0]
    got_scratch = reconstruct_weights(result.stages["scratch"], data.directions.basis, noise, upstream_init, downstream_init)
    assert relative(got_scratch, scratch) < TOLERANCE
    summary = result.stage_results()["transfer"].summary()
    assert summary["regularizer"] == regularizer.as_dict()


@pytest.mark.parametrize("name", ["l2sp", "freeze"])
def test_gram_engine_equals_lightning_with_bias(make_cfg, name: str) -> None:
    """Both engines train the same transfer stage (with biases, which are part of a unit) to the same weights,
    biases and final numbers (float64)."""
    cfg = config(make_cfg, "model.bias=true", *REGULARIZERS[name])
    regularizer = Regularizer.from_config(cfg.regularizer)
    data = make_data(parse(cfg))
    upstream = trained_upstream(cfg, data)
    gram_stage = transfer_stage(cfg, data, upstream, regularizer)
    lightning_stage = transfer_stage(cfg, data, upstream, regularizer)
    gram = GramEngine().train_stage(gram_stage)
    lightning = LightningEngine().train_stage(lightning_stage)
    assert relative(gram_stage.model.weight.detach(), lightning_stage.model.weight.detach()) < TOLERANCE
    assert relative(gram_stage.model.bias.detach(), lightning_stage.model.bias.detach()) < TOLERANCE
    weight, bias, _ = expected_transfer(cfg, data, upstream, regularizer)
    assert relative(lightning_stage.model.bias.detach(), bias) < TOLERANCE
    assert gram.final["test_acc"] == lightning.final["test_acc"]
    assert gram.final["train_loss"] == pytest.approx(lightning.final["train_loss"], rel=1e-9)
    # the signal/noise decomposition at every eval step (with l2sp's decay the fresh filters' init shrinks: a(t))
    for name in DECOMPOSITION_NAMES:
        got, want = [v for _, v in gram.curves[name]], [v for _, v in lightning.curves[name]]
        assert got == pytest.approx(want, rel=1e-7, abs=1e-12), name


def test_frozen_filters_bit_identical_for_k_steps_then_moving(make_cfg) -> None:
    """freeze k=6 on the Lightning engine: after 6 steps the inherited filters are the upstream's bit for bit while
    the others moved; one step later they move too."""
    cfg = config(make_cfg, *REGULARIZERS["freeze"])
    regularizer = Regularizer.from_config(cfg.regularizer)
    data = make_data(parse(cfg))
    upstream = trained_upstream(cfg, data)
    _, _, inherited = expected_transfer(cfg, data, upstream, regularizer)
    fresh = build_model(parse(cfg), "downstream").weight.detach()
    for steps, frozen in ((6, True), (7, False)):
        stage = transfer_stage(cfg, data, upstream, regularizer, steps=steps)
        LightningEngine().train_stage(stage)
        weight = stage.model.weight.detach()
        assert torch.equal(weight[inherited], upstream.weight.detach()[inherited]) == frozen
        assert (weight[~inherited] != fresh[~inherited]).any(dim=-1).all()


@pytest.mark.parametrize("engine", ["lightning", "gram"])
def test_lr_scale_zero_is_freeze_and_one_is_none(make_cfg, engine: str) -> None:
    """lr_scale=0 equals freeze throughout, and lr_scale=1 equals no regulariser, exactly (both engines)."""

    def weights(*overrides: str) -> Tensor:
        cfg = config(make_cfg, *overrides)
        if engine == "gram":
            result = run_cells([GramCell.from_spec(parse(cfg))])[0]
            return torch.cat([result.stages["transfer"].signal.flatten(), result.stages["transfer"].noise[2].flatten()])
        data = make_data(parse(cfg))
        stage = transfer_stage(cfg, data, trained_upstream(cfg, data), Regularizer.from_config(cfg.regularizer))
        LightningEngine().train_stage(stage)
        return stage.model.weight.detach()

    assert torch.equal(
        weights("regularizer=lr_scale", "regularizer.scale=0"), weights("regularizer=freeze", "regularizer.k=1000")
    )
    assert torch.equal(weights("regularizer=lr_scale", "regularizer.scale=1"), weights("regularizer=none"))


def test_batched_cells_with_different_regularizers(make_cfg) -> None:
    """Cells of one data draw with different regularisers, run as one batched program, get what each gets alone."""
    cfgs = [
        config(make_cfg, *overrides) for overrides in ([], REGULARIZERS["l2sp"], REGULARIZERS["freeze"], REGULARIZERS["lr_scale"])
    ]
    cells = [GramCell.from_spec(parse(cfg)) for cfg in cfgs]
    assert len({cell.data_key for cell in cells}) == 1
    together = run_cells(cells)
    for cell, batched in zip(cells, together):
        alone = run_cells([cell])[0]
        for stage in ("transfer", "scratch"):
            torch.testing.assert_close(batched.stages[stage].signal, alone.stages[stage].signal, rtol=1e-12, atol=1e-14)
            assert batched.stages[stage].final == pytest.approx(alone.stages[stage].final, rel=1e-12)
    scratch = [result.stages["scratch"].final for result in together]
    assert all(final == scratch[0] for final in scratch)


class ToyCNN(nn.Module):
    """conv-BN-ReLU-conv-ReLU-pool-linear: two filter layers with a norm, as the image rule transfers them."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 8, 3, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.head(x.mean(dim=(2, 3)))


def image_transfer(regularizer: Regularizer, epochs: int, optimizer: str = "sgd") -> tuple[ToyCNN, ToyCNN, dict, list]:
    """Fine-tune a toy CNN that inherited half its filters, with SGD momentum 0.9 and weight decay; returns the
    upstream, the trained model, the inherited units and the model's state after each epoch."""
    torch.manual_seed(0)
    upstream, model = ToyCNN(), ToyCNN()
    x, y = torch.randn(48, 1, 8, 8), torch.randint(0, 3, (48,))
    loader = DataLoader(TensorDataset(x, y), batch_size=16)
    module = ImageClassifier(
        model, 3, lr=0.05, optimizer=optimizer, momentum=0.9, weight_decay=0.01, scheduler="constant", regularizer=regularizer
    )
    transfer = Transfer(upstream, 0.5, "random", seed=1)
    from ptlab.transfer.callback import ParameterTransfer

    states: list[dict[str, Tensor]] = []

    class Snapshot(pl.Callback):
        def on_train_epoch_end(self, trainer, pl_module) -> None:
            states.append({k: v.detach().clone() for k, v in pl_module.model.named_parameters()})

    callback = ParameterTransfer(transfer)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        callbacks=[callback, Snapshot()],
    )
    trainer.fit(module, loader)
    units = transfer.inherited(model, callback.plan)
    return upstream, model, {"masks": units.masks, "values": units.values}, states


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
def test_image_frozen_filters_stay_inherited_for_k_epochs(optimizer: str) -> None:
    """freeze k=1 on the image classifier (momentum and weight decay on): every inherited entry (conv filters, their
    biases, BN weight and bias) equals the upstream's bit for bit after epoch 1, and has moved after epoch 2."""
    upstream, _, units, states = image_transfer(Regularizer("freeze", k=1), epochs=2, optimizer=optimizer)
    source = dict(upstream.named_parameters())
    assert set(units["masks"]) == {"conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias", "conv2.weight", "conv2.bias"}
    assert units["masks"]["conv1.weight"].all(dim=(1, 2, 3)).sum() == 3  # round(0.5 * 6) whole filters
    for name, mask in units["masks"].items():
        assert torch.equal(states[0][name][mask], source[name][mask]), name
        assert not torch.equal(states[1][name][mask], source[name][mask]), name
        assert not torch.equal(states[0][name][~mask], states[1][name][~mask]) or not (~mask).any(), name


def test_image_l2sp_gradient_includes_the_anchor_term() -> None:
    """The l2sp penalty's gradient is 2 lam (w - w_inherited) on inherited entries and 2 decay w elsewhere (head
    included), and the classifier's loss carries it."""
    from ptlab.modules.regularizers import FineTuning

    regularizer = Regularizer("l2sp", lam=0.3, decay=0.05)
    _, model, units, _ = image_transfer(regularizer, epochs=1)
    tuning = FineTuning(regularizer, model, units["masks"], units["values"])
    model.zero_grad()
    tuning.penalty().backward()
    for name, p in model.named_parameters():
        mask = units["masks"].get(name, torch.zeros_like(p, dtype=torch.bool))
        value = units["values"].get(name, torch.zeros_like(p))
        expected = torch.where(mask, 2 * 0.3 * (p.detach() - value), 2 * 0.05 * p.detach())
        torch.testing.assert_close(p.grad, expected, rtol=1e-6, atol=1e-9)
    moved = (model.conv1.weight.detach() - units["values"]["conv1.weight"])[units["masks"]["conv1.weight"]]
    assert moved.abs().max() > 0  # the inherited filters trained away from their values: a real anchor term


def test_inherited_units_of_the_two_layer_cnn() -> None:
    """The two-layer CNN's inherited units are the planned filters with their biases, valued as the upstream's."""
    torch.manual_seed(0)
    source, target = TwoLayerReLUCNN(5, 4, bias=True), TwoLayerReLUCNN(5, 4, bias=True)
    before = copy.deepcopy(target)
    from ptlab.transfer.adapters import TwoLayerCNNFilters

    adapter = TwoLayerCNNFilters()
    plan = transfer_parameters(source, target, 0.5, "random", torch.Generator().manual_seed(3), adapter)
    units = inherited_units(adapter, source, before, plan)
    rows = torch.zeros(2, 4, dtype=torch.bool)
    for j, row in enumerate(plan):
        rows[j, row.indices] = True
    assert torch.equal(units.masks["weight"], rows[..., None].expand(2, 4, 5))
    assert torch.equal(units.masks["bias"], rows)
    assert torch.equal(units.values["weight"][rows], source.weight.detach()[rows])
    assert torch.equal(units.row_mask("weight", 8), rows.flatten())
    assert torch.equal(before.weight, copy.deepcopy(before).weight)  # the target is not changed


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["regularizer=l2sp", "regularizer.lam=-0.1"], "regularizer.lam=-0.1 is not allowed: must be >= 0"),
        (["regularizer=l2sp", "regularizer.decay=-1"], "regularizer.decay=-1.0 is not allowed: must be >= 0"),
        (["regularizer=freeze", "regularizer.k=-1"], "regularizer.k=-1 is not allowed: must be >= 0"),
        (["regularizer=lr_scale", "regularizer.scale=-2"], "regularizer.scale=-2.0 is not allowed: must be >= 0"),
        (["regularizer=lr_scale", "regularizer.name=decay"], "regularizer.name='decay' is not allowed"),
    ],
)
def test_preflight_refuses_bad_values(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        validate(compose_config(overrides))


@pytest.mark.parametrize(
    "overrides",
    [
        ["regularizer=l2sp", "transfer.alpha=0"],
        ["regularizer=freeze", "transfer=none"],
        ["regularizer=lr_scale", "regularizer.scale=0", "engine=lightning"],
    ],
)
def test_preflight_allows_harmless_combinations(overrides: list[str]) -> None:
    validate(compose_config(overrides))


def test_cli_refuses_in_one_line(tmp_path: Path) -> None:
    done = run_cli(["regularizer=freeze", "regularizer.k=-3"], tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1] == "ptlab: regularizer.k=-3 is not allowed: must be >= 0"
    assert not list(tmp_path.iterdir()) or not any(p.name in ("mlruns", "mlflow.db") for p in tmp_path.iterdir())


def test_config_hash_of_regularizer_none_is_unchanged() -> None:
    """``regularizer=none`` hashes as a config without the group (finished runs of earlier versions stay found);
    any other regulariser changes the hash."""
    from omegaconf import OmegaConf

    from ptlab.pipeline.resume import hash_resolved

    resolved = OmegaConf.to_container(compose_config([]), resolve=True)
    assert resolved["regularizer"] == {"name": "none"}
    without = {k: v for k, v in resolved.items() if k != "regularizer"}
    assert hash_resolved(resolved) == hash_resolved(without)
    l2sp = OmegaConf.to_container(compose_config(["regularizer=l2sp"]), resolve=True)
    assert hash_resolved(l2sp) != hash_resolved(resolved)


@pytest.mark.slow
def test_batched_sweep_honours_the_regularizer(make_cfg, tmp_path: Path) -> None:
    """The batched gram sweep (``hydra/launcher=ptlab_gram hydra/sweeper=ptlab_batched``) over ``regularizer.lam``:
    each cell logs the regulariser's params, its summary.json carries it, and the l2sp cell equals the same config
    run alone through ``run_pipeline`` (the single-stage gram engine) while lam=0 differs from it."""
    import json

    from ptlab.pipeline import run_pipeline
    from ptlab.report.runs import load_pipelines

    from ..conftest import SMALL

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "-m",
        "engine=gram",
        "hydra/launcher=ptlab_gram",
        "hydra/sweeper=ptlab_batched",
        *SMALL,
        "train.dtype=float64",
        "regularizer=l2sp",
        "regularizer.lam=0.0,2.0",
        "regularizer.decay=0.0",
        f"logger.tracking_uri={uri}",
        "logger.experiment_name=reg",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = load_pipelines(uri, "reg")
    assert sorted(runs["params.regularizer.lam"]) == ["0.0", "2.0"] and set(runs["params.regularizer.name"]) == {"l2sp"}
    summaries = {
        json.loads(p.read_text())["transfer"]["regularizer"]["lam"]: json.loads(p.read_text())
        for p in (tmp_path / "sweep").glob("*/summary.json")
    }
    single = run_pipeline(
        make_cfg("engine=gram", "train.dtype=float64", "regularizer=l2sp", "regularizer.lam=2.0", "regularizer.decay=0.0"),
        tmp_path / "single",
    )
    assert single["transfer"]["regularizer"] == {"name": "l2sp", "lam": 2.0, "decay": 0.0}
    assert summaries[2.0]["transfer"]["train_loss"] == pytest.approx(single["transfer"]["train_loss"], rel=1e-9)
    assert summaries[2.0]["transfer"]["test_acc"] == single["transfer"]["test_acc"]
    assert summaries[0.0]["transfer"]["train_loss"] != pytest.approx(single["transfer"]["train_loss"], rel=1e-6)
    assert summaries[0.0]["scratch"] == summaries[2.0]["scratch"]


def test_option_lists_agree() -> None:
    """The torch-free list in ``ptlab.config``, the modules' list, the schemas and ``conf/regularizer`` name the same
    options."""
    from ptlab.config import GROUP_SCHEMAS
    from ptlab.config import REGULARIZERS as CONFIG_NAMES
    from ptlab.modules.regularizers import REGULARIZERS
    from ptlab.paths import config_dir

    options = sorted(p.stem for p in (Path(config_dir()) / "regularizer").glob("*.yaml"))
    assert sorted(CONFIG_NAMES) == sorted(REGULARIZERS) == sorted(GROUP_SCHEMAS["regularizer"]) == options

"""transfer.control (norm_matched, shuffled) and train.scratch_budget=matched: their effect in numbers, the gram engine
against plain GD and the Lightning path, and the refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from ptlab import config
from ptlab.config import ConfigError, validate
from ptlab.engines.base import Stage
from ptlab.engines.gram import GramCell, GramEngine, reconstruct_weights, run_cells
from ptlab.models import TwoLayerReLUCNN
from ptlab.models.torchvision_cnn import build_torchvision_cnn
from ptlab.pipeline import run_pipeline
from ptlab.pipeline.cache import synthetic_upstream_spec
from ptlab.pipeline.run import make_engine
from ptlab.pipeline.synthetic import build_model, make_data, run_synthetic
from ptlab.seeding import derive_seed
from ptlab.spec import parse
from ptlab.tracking.base import NullTracker
from ptlab.transfer import Transfer, controls
from ptlab.transfer.controls import apply_control
from ptlab.transfer.conv import conv_units

from ..conftest import SMALL, run_cli
from ..engines.test_gram_engine import plain_gd
from ..pipeline.test_images_pipeline import TINY


def toy_pair(width: int = 40, d: int = 200) -> tuple[TwoLayerReLUCNN, TwoLayerReLUCNN]:
    torch.manual_seed(0)
    source = TwoLayerReLUCNN(d, width, 1.0).double()
    torch.manual_seed(1)
    return source, TwoLayerReLUCNN(d, width, 0.01).double()


def controlled_toy(
    control: str, seed: int = 3, alpha: float = 0.5
) -> tuple[TwoLayerReLUCNN, TwoLayerReLUCNN, list, torch.Tensor]:
    source, target = toy_pair()
    fresh = target.weight.detach().clone()
    plan = Transfer(source, alpha, "random", seed=0, control=control, control_seed=seed).apply(target)
    return source, target, plan, fresh


def inherited_mask(plan: list, shape: tuple[int, ...]) -> torch.Tensor:
    mask = torch.zeros(shape[:2], dtype=torch.bool)
    for j, row in enumerate(plan):
        mask[j, row.indices] = True
    return mask


def test_norm_matched_keeps_each_norm_and_draws_an_independent_direction() -> None:
    source, target, plan, fresh = controlled_toy("norm_matched", alpha=1.0)
    mask = inherited_mask(plan, target.weight.shape)
    got, inherited = target.weight.detach()[mask], source.weight.detach()[mask]
    torch.testing.assert_close(got.norm(dim=1), inherited.norm(dim=1), rtol=1e-12, atol=0)
    cos = torch.nn.functional.cosine_similarity(got, inherited, dim=1)
    d, n = got.shape[1], len(cos)
    # a random direction's squared cosine with a fixed vector has mean 1/d, sd about sqrt(2)/d: 80 units, 3 sds
    assert abs(cos.pow(2).mean().item() - 1 / d) < 3 * (2**0.5 / d) / n**0.5
    assert cos.abs().max() < 0.35
    again = controlled_toy("norm_matched", alpha=1.0)[1].weight
    other = controlled_toy("norm_matched", seed=4, alpha=1.0)[1].weight
    assert torch.equal(again, target.weight) and not torch.allclose(other, target.weight)


def test_norm_matched_draw_depends_on_the_position_not_on_the_selection() -> None:
    full = controlled_toy("norm_matched", alpha=1.0)[1].weight.detach()
    _, half, plan, fresh = controlled_toy("norm_matched", alpha=0.5)
    mask = inherited_mask(plan, half.weight.shape)
    direction = torch.nn.functional.normalize(half.weight.detach()[mask], dim=1)
    torch.testing.assert_close(direction, torch.nn.functional.normalize(full[mask], dim=1))
    assert torch.equal(half.weight.detach()[~mask], fresh[~mask])


def test_shuffled_permutes_each_inherited_filter_and_leaves_the_rest() -> None:
    source, target, plan, fresh = controlled_toy("shuffled")
    mask = inherited_mask(plan, target.weight.shape)
    got, inherited = target.weight.detach()[mask], source.weight.detach()[mask]
    assert torch.equal(got.sort(dim=1).values, inherited.sort(dim=1).values)
    moved = (got != inherited).float().mean(dim=1)
    assert (moved > 0.9).all()  # a uniform permutation of 200 entries leaves about one in place
    assert torch.equal(target.weight.detach()[~mask], fresh[~mask])
    assert not torch.equal(controlled_toy("shuffled", seed=4)[1].weight, target.weight)


def test_controls_on_conv_units_with_element_selection() -> None:
    """ResNet-18 at width 0.5 -> width 0.25: each copied output channel's copied input entries (kernel included) form
    the unit; BatchNorm followers stay as copied; the entries of the other input channels keep their fresh init."""
    torch.manual_seed(0)
    source = build_torchvision_cnn("resnet18", 3, width=0.5)
    for control in ("shuffled", "norm_matched"):
        torch.manual_seed(1)
        target = build_torchvision_cnn("resnet18", 3, width=0.25)
        fresh = {k: v.clone() for k, v in target.state_dict().items()}
        plan = Transfer(source, 0.5, "first", seed=0, control=control, control_seed=0).apply(target)
        units = {unit.name: unit for unit in conv_units(target)}
        sources = {unit.name: unit for unit in conv_units(source)}
        checked = 0
        for row in plan:
            if row.target not in units or not row.indices:
                continue
            out, src_out = torch.tensor(row.indices), torch.tensor(row.source_indices or row.indices)
            got, want = units[row.target].conv.weight.detach()[out], sources[row.source].conv.weight.detach()[src_out]
            if row.input_indices is not None:
                rest = sorted(set(range(got.shape[1])) - set(row.input_indices))
                assert torch.equal(got[:, rest], fresh[f"{row.target}.weight"][out][:, rest])
                got, want = got[:, row.input_indices], want[:, row.source_input_indices]
            got, want = got.flatten(1), want.flatten(1)
            if control == "shuffled":
                assert torch.equal(got.sort(dim=1).values, want.sort(dim=1).values)
            else:
                torch.testing.assert_close(got.norm(dim=1), want.norm(dim=1), rtol=1e-5, atol=1e-7)
            assert not torch.equal(got, want)
            checked += 1
        assert checked > 10
        bn = target.state_dict()["bn1.weight"]
        assert torch.equal(bn[:4], source.state_dict()["bn1.weight"][:4])


def test_unknown_control_is_refused_by_the_function() -> None:
    assert config.CONTROLS == controls.CONTROLS
    with pytest.raises(ValueError, match="must be one of none, norm_matched, shuffled"):
        apply_control("flipped", [], 0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["transfer.control=flipped"], "transfer.control='flipped' is not allowed: must be one of none, norm_matched, shuffled"),
        (["train.scratch_budget=double"], "train.scratch_budget='double' is not allowed: must be one of downstream, matched"),
        (["task.test_space=response", "transfer.control=shuffled"], "transfer.control=shuffled is not allowed with the gram"),
        (
            ["task.test_space=response", "transfer.control=norm_matched"],
            "transfer.control=norm_matched is not allowed with engine=gram and task.test_space=response",
        ),
    ],
)
def test_refusals_name_the_key(make_cfg, overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(make_cfg(*overrides))
    assert message in str(err.value) and "\n" not in str(err.value)


def test_layer_transfer_refuses_controls(make_cfg) -> None:
    cfg = make_cfg(
        "task=digits",
        "model=deit_tiny",
        "upstream_model=deit_tiny",
        "transfer=layers",
        "transfer.control=norm_matched",
        small=False,
    )
    with pytest.raises(
        ConfigError, match="transfer.control='norm_matched' is not allowed: must be none with transfer.kind=layers"
    ):
        validate(cfg)


def test_cli_refuses_before_tracking(tmp_path: Path) -> None:
    """An unknown control, and shuffled in the batched gram sweep (a single gram run allows it): exit 2, one line,
    no store written."""
    store = f"logger.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"
    for args, message in (
        ([store, "transfer.control=flipped"], "allowed: must be one of none, norm_matched, shuffled"),
        (
            ["-m", store, "hydra/launcher=ptlab_gram", "hydra/sweeper=ptlab_batched", "transfer.control=shuffled", "seed=0,1"],
            "transfer.control=shuffled is not allowed with the gram engine's batched cells",
        ),
    ):
        done = run_cli(args, cwd=tmp_path)
        assert done.returncode == 2, done.stderr[-2000:]
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and message in lines[0], lines
        assert not (tmp_path / "mlflow.db").exists()


def test_cache_key_does_not_see_the_control(make_cfg) -> None:
    base = synthetic_upstream_spec(parse(make_cfg()), "gram")
    for overrides in (["transfer.control=norm_matched"], ["transfer.control=shuffled", "train.scratch_budget=matched"]):
        assert synthetic_upstream_spec(parse(make_cfg(*overrides)), "gram") == base


def test_batched_norm_matched_and_matched_scratch_equal_plain_gd(make_cfg) -> None:
    """The gram cells (batched sweep path) in float64: upstream by plain GD, the transfer's norm_matched start from the
    Lightning path's Transfer (same seed streams), the compute-matched scratch for upstream + downstream steps."""
    cfg = parse(
        make_cfg(
            "train.dtype=float64",
            "task.label_noise=0.1",
            "transfer.control=norm_matched",
            "train.scratch_budget=matched",
            "transfer.alpha=0.5",
        )
    )
    result = run_cells([GramCell.from_spec(cfg)])[0]
    data, lr = make_data(cfg), cfg.train.lr
    up_steps, down_steps = cfg.train.upstream_steps, cfg.train.downstream_steps
    upstream_init = build_model(cfg, "upstream").weight.detach()
    downstream_init = build_model(cfg, "downstream").weight.detach()
    upstream = build_model(cfg, "upstream")
    upstream.weight.data = plain_gd(upstream_init, data.task1_train.x, data.task1_train.y, lr, up_steps)
    start = build_model(cfg, "downstream")
    plan = Transfer(
        upstream,
        0.5,
        "random",
        derive_seed(cfg.seed, "selection"),
        control="norm_matched",
        control_seed=derive_seed(cfg.seed, "control"),
    ).apply(start)
    assert result.plan == [row.as_dict() for row in plan]
    mask = inherited_mask(plan, start.weight.shape)
    torch.testing.assert_close(start.weight.detach()[mask].norm(dim=1), upstream.weight.detach()[mask].norm(dim=1))
    noise = {1: data.task1_train.noise, 2: data.task2_train.noise}
    transfer = plain_gd(start.weight.detach(), data.task2_train.x, data.task2_train.y, lr, down_steps)
    got = reconstruct_weights(
        result.stages["transfer"], data.directions.basis, noise, upstream_init, downstream_init, inherited=start.weight.detach()
    )
    assert ((got - transfer).norm() / transfer.norm()).item() < 1e-9
    scratch = plain_gd(downstream_init, data.task2_train.x, data.task2_train.y, lr, up_steps + down_steps)
    got = reconstruct_weights(result.stages["scratch"], data.directions.basis, noise, upstream_init, downstream_init)
    assert ((got - scratch).norm() / scratch.norm()).item() < 1e-9
    assert result.stages["scratch"].steps == up_steps + down_steps == len(result.stages["scratch"].loss) - 1
    assert len(result.stages["transfer"].loss) == down_steps + 1
    summary = result.stage_results()
    assert summary["transfer"].summary()["control"] == "norm_matched"
    assert summary["scratch"].summary()["steps"] == up_steps + down_steps


def test_gram_cells_of_mixed_controls_equal_their_single_runs(make_cfg) -> None:
    """A batch of none / norm_matched, downstream / matched cells gives each what it gets alone."""
    cfgs = [
        make_cfg("train.dtype=float64", f"transfer.control={c}", f"train.scratch_budget={b}", f"task.u_norm={u}")
        for c, b, u in (
            ("none", "downstream", 1.0),
            ("norm_matched", "downstream", 1.0),
            ("norm_matched", "matched", 0.0),
            ("none", "matched", 2.0),
        )
    ]
    cells = [GramCell.from_spec(parse(cfg)) for cfg in cfgs]
    together = run_cells(cells, max_cells=4)
    for cell, got in zip(cells, together):
        alone = run_cells([cell])[0]
        for name in ("upstream", "transfer", "scratch"):
            assert got.stages[name].final == pytest.approx(alone.stages[name].final, rel=1e-9)
    # the control changes the transfer stage only; the scratch stage is the same run
    assert together[0].stages["scratch"].final == together[1].stages["scratch"].final
    assert together[0].stages["transfer"].final != together[1].stages["transfer"].final


@pytest.mark.parametrize("control", ["norm_matched", "shuffled"])
def test_gram_engine_single_run_equals_lightning(make_cfg, control: str) -> None:
    """A single engine=gram run holds its filters in R^d and runs both controls exactly: its stages equal the Lightning
    path's in float64, and the batched cell's for norm_matched."""
    common = ["train.dtype=float64", f"transfer.control={control}", "train.scratch_budget=matched", "logger=none"]
    stages = {}
    for engine in ("gram", "lightning"):
        cfg = parse(make_cfg(*common, f"engine={engine}"))
        stages[engine] = run_synthetic(cfg, make_engine(cfg), NullTracker())[0]
    for stage in ("transfer", "scratch"):
        assert stages["gram"][stage].final == pytest.approx(stages["lightning"][stage].final, rel=1e-9, abs=1e-12)
        loss = [value for _, value in stages["lightning"][stage].curves["train/loss"]]
        assert [value for _, value in stages["gram"][stage].curves["train/loss"]] == pytest.approx(loss, rel=1e-9)
    assert stages["lightning"]["transfer"].summary()["control"] == control
    assert stages["lightning"]["scratch"].curves["train/loss"][-1][0] == 90
    assert stages["gram"]["scratch"].summary()["steps"] == 90
    if control == "norm_matched":
        cell = run_cells([GramCell.from_spec(parse(make_cfg(*common)))])[0]
        for stage in ("transfer", "scratch"):
            assert cell.stages[stage].final == pytest.approx(stages["gram"][stage].final, rel=1e-9, abs=1e-12)


def test_gram_engine_stage_counts_the_matched_steps(make_cfg) -> None:
    cfg = parse(make_cfg("train.dtype=float64", "train.scratch_budget=matched"))
    data = make_data(cfg)
    steps = cfg.train.upstream_steps + cfg.train.downstream_steps
    result = GramEngine().train_stage(
        Stage(
            "scratch",
            build_model(cfg, "downstream"),
            data.task2_train,
            data.task2_test,
            steps,
            cfg.train.lr,
            cfg.train.eval_every,
            data.directions,
            2,
            dtype="float64",
        )
    )
    assert result.curves["train/loss"][-1][0] == steps == len(result.curves["train/loss"]) - 1


def test_control_and_budget_are_logged(make_cfg, tmp_path: Path, tracking_uri: str) -> None:
    summary = run_pipeline(make_cfg("transfer.control=shuffled", "train.scratch_budget=matched"), tmp_path / "out")
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["transfer"]["control"] == "shuffled"
    run = MlflowClient(tracking_uri).get_run(summary["mlflow"]["parent_run_id"])
    assert run.data.params["transfer.control"] == "shuffled"
    assert run.data.params["train.scratch_budget"] == "matched"
    assert summary["scratch"]["steps"] == 90


def test_image_pipeline_controls_and_matched_scratch(make_cfg, tmp_path: Path, tracking_uri: str) -> None:
    """Digits with VGG-16 -> VGG-11 (tiny): the shuffled transfer runs through the Lightning callback, the
    compute-matched scratch trains upstream + downstream epochs, and both are in the summary and the params."""
    cfg = make_cfg(*TINY, "transfer.control=shuffled", "train.scratch_budget=matched", small=False)
    summary = run_pipeline(cfg, tmp_path / "out")
    assert summary["transfer"]["control"] == "shuffled" and summary["transfer"]["epochs"] == 2
    assert summary["scratch"]["epochs"] == 4 and summary["scratch"]["budget"] == "matched"
    run = MlflowClient(tracking_uri).get_run(summary["mlflow"]["parent_run_id"])
    assert run.data.params["transfer.control"] == "shuffled"


@pytest.mark.slow
def test_batched_sweep_runs_the_controls_and_matched_scratch(tmp_path: Path) -> None:
    """``-m`` with the batched launcher over control x scratch budget: every job's summary says its control and its
    scratch steps (the cells equal their single runs: test_gram_cells_of_mixed_controls_equal_their_single_runs)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "-m",
        "engine=gram",
        "hydra/launcher=ptlab_gram",
        "hydra/sweeper=ptlab_batched",
        *SMALL,
        "task.d=50",
        "train.dtype=float64",
        "transfer.control=none,norm_matched",
        "train.scratch_budget=downstream,matched",
        f"logger.tracking_uri={uri}",
        "logger.experiment_name=controls",
        f"hydra.sweep.dir={tmp_path / 'sweep'}",
    ]
    done = run_cli(args, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    seen = set()
    for path in (tmp_path / "sweep").glob("*/summary.json"):
        summary = json.loads(path.read_text())
        overrides = (path.parent / ".hydra" / "overrides.yaml").read_text()
        control = "norm_matched" if "norm_matched" in overrides else "none"
        budget = "matched" if "scratch_budget=matched" in overrides else "downstream"
        assert summary["transfer"]["control"] == control and summary["scratch"]["budget"] == budget
        assert summary["scratch"]["steps"] == (90 if budget == "matched" else 30)
        seen.add((control, budget))
    assert len(seen) == 4


@pytest.mark.parametrize("regularizer", ["regularizer=l2sp", "regularizer=freeze"])
def test_a_regularizer_anchors_the_controlled_units(make_cfg, regularizer: str) -> None:
    """Under a control the inherited units start from the control's values, and l2sp anchors them there: the Lightning
    path (anchor read by ``Transfer.inherited``), the single gram run and the batched gram cell (anchor: the stage
    start) agree in float64."""
    common = (
        ["train.dtype=float64", "transfer.control=norm_matched", regularizer, "regularizer.lam=0.5", "logger=none"]
        if regularizer.endswith("l2sp")
        else ["train.dtype=float64", "transfer.control=norm_matched", regularizer, "regularizer.k=20", "logger=none"]
    )
    stages = {}
    for engine in ("gram", "lightning"):
        cfg = parse(make_cfg(*common, f"engine={engine}"))
        stages[engine] = run_synthetic(cfg, make_engine(cfg), NullTracker())[0]
    cell = run_cells([GramCell.from_spec(parse(make_cfg(*common)))])[0]
    plain = run_synthetic(
        parse(make_cfg("train.dtype=float64", "transfer.control=norm_matched", "logger=none", "engine=lightning")),
        make_engine(parse(make_cfg("engine=lightning"))),
        NullTracker(),
    )[0]
    loss = [value for _, value in stages["lightning"]["transfer"].curves["train/loss"]]
    assert [value for _, value in stages["gram"]["transfer"].curves["train/loss"]] == pytest.approx(loss, rel=1e-7)
    assert stages["gram"]["transfer"].final == pytest.approx(stages["lightning"]["transfer"].final, rel=1e-7, abs=1e-12)
    assert cell.stages["transfer"].final == pytest.approx(stages["gram"]["transfer"].final, rel=1e-7, abs=1e-12)
    plain_loss = [value for _, value in plain["transfer"].curves["train/loss"]]
    assert max(abs(a - b) for a, b in zip(loss, plain_loss)) > 1e-6  # the regulariser acted


def test_a_control_changes_logme_not_leep(make_cfg) -> None:
    """LEEP reads the trained upstream model, which a control does not touch; LogME reads the controlled units. In the
    batched cells and in the single run alike."""
    common = ["train.dtype=float64", "logger=none"]
    cells = run_cells([GramCell.from_spec(parse(make_cfg(*common, f"transfer.control={c}"))) for c in ("none", "norm_matched")])
    plain, controlled = (cell.transferability for cell in cells)
    assert controlled["leep"] == pytest.approx(plain["leep"], rel=1e-12)
    assert controlled["logme_scratch"] == pytest.approx(plain["logme_scratch"], rel=1e-12)
    assert abs(controlled["logme"] - plain["logme"]) > 1e-6
    cfg = parse(make_cfg(*common, "transfer.control=norm_matched", "engine=lightning"))
    single = run_synthetic(cfg, make_engine(cfg), NullTracker())[1]["transferability"]
    assert single["leep"] == pytest.approx(plain["leep"], rel=1e-9)
    assert single["logme"] == pytest.approx(controlled["logme"], rel=1e-9)

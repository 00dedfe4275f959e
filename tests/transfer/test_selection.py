"""Selection strategies (docs/design.md section 7): each on a hand-built layer whose right answer is known, the
probes against their formulas, a user's strategy chosen by config alone, and the gram engine's plan equal to
the weight-space plan for the synthetic strategies."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ptlab.config import ConfigError, validate
from ptlab.engines.gram import GramCell, run_cells
from ptlab.pipeline.run import run_pipeline
from ptlab.pipeline.synthetic import build_model, make_data, selection_inputs
from ptlab.seeding import derive_seed
from ptlab.spec import parse
from ptlab.transfer import SelectionContext, SelectionInputs, SelectionStrategy, build_strategy, transfer_parameters
from ptlab.transfer.apply import Transfer
from tests.conftest import SMALL, run_cli
from tests.engines.test_gram_engine import margin, plain_gd


class PickLast(SelectionStrategy):
    """A user's strategy, defined here and chosen by a YAML file in the test's own config folder."""

    def __init__(self, offset: int = 0) -> None:
        self.offset = offset

    def scores(self, context: SelectionContext) -> Tensor:
        return torch.arange(context.units.shape[0], dtype=torch.float64) - self.offset


def choose(name: str, units: Tensor, k: int, **context: object) -> list[int]:
    return build_strategy(name).choose(SelectionContext(units, k, torch.Generator().manual_seed(0), **context)).indices


def test_weight_strategies_pick_the_known_units() -> None:
    units = torch.tensor([[1.0, 1, 1, 1], [3, 0, 0, 0], [0.1, 0, 0, 0], [-2.5, 0, 0, 0]])
    # l1: sums 4, 3, 0.1, 2.5; L2 norms: 2, 3, 0.1, 2.5 -- the two disagree on the top two
    assert choose("l1", units, 2) == [0, 1]
    assert choose("largest_norm", units, 2) == [1, 3]
    assert choose("uniform", torch.zeros(10, 3), 4) == [0, 2, 5, 7]
    assert choose("uniform", torch.zeros(10, 3), 10) == list(range(10))
    assert choose("first", units, 3) == [0, 1, 2]
    cluster = torch.tensor([[1.0, 0], [1.1, 0], [0.9, 0.1], [1.0, 0.05], [-5, 5]])
    assert choose("geometric_median", cluster, 1) == [4]  # the outlier is farthest from the others
    choice = build_strategy("geometric_median").choose(SelectionContext(cluster, 2, torch.Generator()))
    distances = [sum(float((cluster[i] - cluster[j]).norm()) for j in range(5)) for i in choice.indices]
    assert choice.scores == pytest.approx(distances, rel=1e-5) and choice.strategy == "geometric_median"


def test_bn_scale_reads_the_following_batchnorm_and_names_a_missing_one() -> None:
    bn = nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([0.1, -2.0, 0.5, 1.5]))
    assert choose("bn_scale", torch.zeros(4, 3, 3, 3), 2, bn=bn, layer="conv1") == [1, 3]
    with pytest.raises(ValueError, match="^transfer.selection=bn_scale needs a BatchNorm .* conv1 has none$"):
        choose("bn_scale", torch.zeros(4, 3, 3, 3), 2, layer="conv1")


def test_a_registered_strategy_class_plans_its_choice() -> None:
    from ptlab.transfer.selection import SELECTIONS, SelectionStrategy

    class LastK(SelectionStrategy):
        name = "test_last_k"

        def indices(self, context):
            return torch.arange(context.units.shape[0])[-context.k :]

    SELECTIONS.add("test_last_k", LastK)
    try:
        model = toy_problem()[0]
        plan = transfer_parameters(model, model, 0.5, "test_last_k")
        assert [row.indices for row in plan] == [[3, 4, 5]] * 2 and plan[0].strategy == "test_last_k"
    finally:
        SELECTIONS._entries.pop("test_last_k")


def test_random_keeps_the_seeded_rule() -> None:
    expected = torch.randperm(12, generator=torch.Generator().manual_seed(3))[:5].sort().values.tolist()
    strategy = build_strategy("random")
    assert strategy(torch.zeros(12, 2), 5, torch.Generator().manual_seed(3)).tolist() == expected


def toy_problem(seed: int = 0) -> tuple[nn.Module, Tensor, Tensor]:
    from ptlab.models import TwoLayerReLUCNN

    torch.manual_seed(seed)
    model = TwoLayerReLUCNN(5, width=6, init_std=1.0).double()
    x, y = torch.randn(7, 2, 5, dtype=torch.float64), torch.tensor([1.0, -1, 1, 1, -1, -1, 1], dtype=torch.float64)
    return model, x, y


def toy_gradient(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """dL/dW of the mean logistic loss written out: -(1/N) sum_i y_i sigmoid(-y_i f_i) (j/m) sum_p 1[<w, p> > 0] p."""
    w = model.weight.detach()
    f = margin(w, x)
    slope = -y * torch.sigmoid(-y * f) / len(y)  # dL/df_i
    sign = torch.tensor([1.0, -1.0], dtype=w.dtype)[:, None, None]
    active = (torch.einsum("npd,jmd->npjm", x, w) > 0).to(w.dtype)  # (N, P, 2, m)
    return torch.einsum("n,npjm,npd->jmd", slope, active, x) * sign / w.shape[1]


@pytest.mark.parametrize("name", ["taylor", "fisher", "activation"])
def test_data_strategies_on_the_two_layer_cnn_match_their_formulas(name: str) -> None:
    model, x, y = toy_problem()
    grad = toy_gradient(model, x, y)
    w = model.weight.detach()
    expected = {
        "taylor": (w * grad).sum(-1) ** 2,
        "fisher": (w**2 * grad**2).sum(-1),
        "activation": torch.relu(torch.einsum("npd,jmd->jmnp", x, w)).mean(dim=(-2, -1)),
    }[name]
    plan = Transfer(model, 0.5, name, inputs=SelectionInputs(batches=[(x, y)])).plan(model)
    for j, row in enumerate(plan):
        top = expected[j].argsort(descending=True)[:3].sort().values.tolist()
        assert row.indices == top and row.strategy == name
        assert row.scores == pytest.approx(expected[j, top].tolist(), rel=1e-5)


def test_taylor_and_fisher_average_over_batches_through_a_conv_model() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5)
    ).double()
    batches = [(torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.zeros(6, dtype=torch.long)) for _ in range(2)]
    model.train()
    conv = model[0]
    grads = []
    model.eval()
    for x, _ in batches:  # the default loss: cross-entropy against the model's own predictions
        logits = model(x)
        (grad,) = torch.autograd.grad(F.cross_entropy(logits, logits.argmax(1)), conv.weight)
        grads.append(grad)
    w = conv.weight.detach()
    taylor = torch.stack([(w * g).sum(dim=(1, 2, 3)) ** 2 for g in grads]).mean(0)
    fisher = (w**2 * torch.stack([g**2 for g in grads]).mean(0)).sum(dim=(1, 2, 3))
    activation = torch.stack([F.conv2d(x, w, conv.bias).abs().mean(dim=(0, 2, 3)) for x, _ in batches]).mean(0)
    model.train()
    running_before = model[1].running_mean.clone()
    for name, expected in (("taylor", taylor), ("fisher", fisher), ("activation", activation)):
        choice = (
            build_strategy(name)
            .bind(model, SelectionInputs(batches=batches))
            .choose(w, 2, torch.Generator(), layer="0", bn=model[1])
        )
        top = expected.argsort(descending=True)[:2].sort().values.tolist()
        assert choice.indices == top, name
        assert choice.scores == pytest.approx(expected[top].tolist(), rel=1e-5), name
    assert model.training and torch.equal(model[1].running_mean, running_before)  # probed in eval mode


def synthetic_units() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Filters in R^6 with known coefficients along u = 2 e0, v2 = 2 e1 and two task-2 noise patches on e3, e4."""
    u, v2 = 2 * torch.eye(6)[0], 2 * torch.eye(6)[1]
    xi = torch.stack([3 * torch.eye(6)[3], -3 * torch.eye(6)[4]])
    units = torch.tensor(
        [
            [0.1, 0.0, 0, 0, 0, 0],  # weak u
            [-0.9, 0.0, 0, 0, 0, 0],  # strong u (negative: |<w, u>| counts)
            [0.5, 0.5, 0, 0, 0, 0],  # u + v2
            [0.6, 0.0, 0, 0.4, 0, 0],  # u, but memorises noise patch 1
            [0.0, 0.0, 1, 0, 0, 0],  # v1 only: nothing of task 2
        ]
    )
    clean = torch.tensor([1.0, -1.0])
    x = torch.stack([clean[:, None] * (u + v2), xi], dim=1)  # (N=2, 2 patches, d)
    return units, u, x, clean, xi


def test_signal_oracle_and_task2_alignment_on_hand_built_filters() -> None:
    units, u, x, y, xi = synthetic_units()
    inputs = SelectionInputs(batches=[(x, y)], universal=u)
    bound = {name: build_strategy(name).bind(None, inputs) for name in ("signal", "task2_alignment")}
    oracle = bound["signal"].choose(units, 2, torch.Generator(), "weight[+1]")
    assert oracle.indices == [1, 3] and oracle.scores == pytest.approx([1.8, 1.2])
    # |<w, s>| with s = mean y_i x1_i = u + v2, minus mean_i |<w, xi_i>|
    s = u + torch.eye(6)[1] * 2
    expected = (units @ s).abs() - (units @ xi.T).abs().mean(dim=1)
    assert expected.tolist() == pytest.approx([0.2, 1.8, 2.0, 0.6, 0.0])
    aligned = bound["task2_alignment"].choose(units, 2, torch.Generator(), "weight[+1]")
    assert aligned.indices == [1, 2] and aligned.scores == pytest.approx([1.8, 2.0])


def test_selection_group_options_reach_the_strategy(make_cfg) -> None:
    cfg = make_cfg("engine=lightning", "transfer/selection=taylor", "transfer.selection.batches=2")
    strategy = build_strategy(cfg.transfer.selection)
    assert type(strategy).__name__ == "Taylor" and strategy.batches == 2
    assert build_strategy(make_cfg("transfer.selection=uniform").transfer.selection).name == "uniform"
    with pytest.raises(ConfigError, match="^transfer.selection.batches=0 is not allowed: must be >= 1$"):
        validate(make_cfg("engine=lightning", "transfer/selection=fisher", "transfer.selection.batches=0"))
    with pytest.raises(ConfigError, match="^transfer.selection: .*unexpected keyword argument 'bathces'"):
        validate(make_cfg("engine=lightning", "transfer/selection=fisher", "+transfer.selection.bathces=2"))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["transfer.selection=l1"], "transfer.selection=l1 is not allowed with engine=gram: it reads the filters' weights"),
        (
            ["transfer/selection=taylor"],
            "transfer.selection=taylor is not allowed with engine=gram: it reads the filters' batches",
        ),
        (["engine=lightning", "transfer.selection=bn_scale"], "transfer.selection=bn_scale is not allowed with task=synthetic"),
        (
            ["task=digits", "model=resnet18_small", "upstream_model=resnet18_small", "transfer.selection=signal"],
            "transfer.selection=signal is not allowed with task=digits",
        ),
        (
            ["transfer.selection={_target_: tests.nowhere.Strategy}"],
            "transfer.selection._target_='tests.nowhere.Strategy' cannot be loaded",
        ),
    ],
)
def test_strategies_that_cannot_run_are_refused_with_one_line(make_cfg, overrides, message) -> None:
    with pytest.raises(ConfigError, match="^" + message.replace("(", r"\(")) as err:
        validate(make_cfg(*overrides, small="task=digits" not in overrides))
    assert "\n" not in str(err.value)


def test_a_refused_strategy_exits_2_before_anything_is_tracked(tmp_path: Path) -> None:
    done = run_cli(["transfer.selection=geometric_median"], tmp_path)
    assert done.returncode == 2 and done.stderr.strip().splitlines() == [
        line for line in done.stderr.strip().splitlines() if "geometric_median is not allowed with engine=gram" in line
    ]
    assert not (tmp_path / "mlflow.db").exists()


def test_a_users_strategy_is_chosen_by_config_alone(make_cfg, tmp_path: Path) -> None:
    folder = tmp_path / "my_conf" / "transfer" / "selection"
    folder.mkdir(parents=True)
    (folder / "last.yaml").write_text("_target_: tests.transfer.test_selection.PickLast\noffset: 0\n")
    cfg = make_cfg(f"hydra.searchpath=[file://{tmp_path / 'my_conf'}]", "transfer/selection=last", "logger=none")
    summary = run_pipeline(cfg, tmp_path / "out")
    plan = summary["transfer"]["plan"]
    width = cfg.model.width
    for row in plan:
        assert row["indices"] == list(range(width - width // 2, width)) and row["strategy"] == "PickLast"
        assert row["scores"] == [float(i) for i in row["indices"]]


@pytest.mark.parametrize(
    "name,overrides",
    [
        ("signal", ["transfer.selection=signal"]),
        ("task2_alignment", ["transfer/selection=task2_alignment", "transfer.selection.noise_weight=0.5"]),
    ],
)
def test_gram_engine_plans_the_same_filters_as_the_weights_do(make_cfg, name: str, overrides: list[str]) -> None:
    cfg = parse(make_cfg("train.dtype=float64", "task.label_noise=0.2", *overrides))
    gram_plan = run_cells([GramCell.from_spec(cfg)])[0].plan
    data = make_data(cfg)
    upstream = build_model(cfg, "upstream")
    upstream.weight.data = plain_gd(
        upstream.weight.detach(), data.task1_train.x, data.task1_train.y, cfg.train.lr, cfg.train.upstream_steps
    )
    target = build_model(cfg, "downstream")
    plan = transfer_parameters(
        upstream,
        target,
        cfg.transfer.alpha,
        cfg.transfer.selection,
        torch.Generator().manual_seed(derive_seed(cfg.seed, "selection")),
        None,
        selection_inputs(data),
    )
    assert gram_plan == [row.as_dict() for row in plan]
    assert all(row["strategy"] == name and len(row["scores"]) == row["copied"] for row in gram_plan)
    if name == "signal":  # the oracle keeps the filters most aligned with u, by their weights
        u = data.directions.u.double()
        for j, row in enumerate(plan):
            aligned = (upstream.weight[j].detach() @ u).abs()
            assert row.indices == aligned.argsort(descending=True)[: row.copied].sort().values.tolist()
            assert not math.isnan(row.scores[0])


def test_plan_rows_keep_strategy_and_scores_through_json(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(*SMALL, "transfer.selection=largest_norm", "logger=none")
    summary = run_pipeline(cfg, tmp_path / "out")
    written = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert written == json.loads(json.dumps(summary))
    text = json.dumps(written)
    assert '"strategy": "largest_norm"' in text and '"scores": [' in text


def test_a_data_driven_strategy_plans_a_digits_transfer_from_task2_batches(make_cfg, tmp_path: Path) -> None:
    from tests.pipeline.test_images_pipeline import TINY

    cfg = make_cfg(
        *TINY,
        "transfer/selection=taylor",
        "transfer.selection.batches=1",
        "train.upstream_epochs=0",
        "train.downstream_epochs=1",
        "logger=none",
        small=False,
    )
    summary = run_pipeline(cfg, tmp_path / "out")
    plan = summary["transfer"]["plan"]
    assert len(plan) == 8 and all(row["strategy"] == "taylor" for row in plan)
    for row in plan:
        assert len(row["scores"]) == row["copied"] == len(row["indices"]) and min(row["scores"]) >= 0

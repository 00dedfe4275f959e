"""CNN filter transfer (ptlab.transfer.conv): the documented plan for the paper's pairs, exact copies of
the planned filters and BatchNorm entries, everything else at the fresh init."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ptlab.config import ConfigError
from ptlab.models import build_torchvision_cnn
from ptlab.pipeline.images import check_transfer_pair
from ptlab.seeding import torch_seed
from ptlab.spec import parse
from ptlab.transfer import CNNFilterTransfer, conv_units, count_for, find_adapter, transfer_parameters

BN_KEYS = ("weight", "bias", "running_mean", "running_var")


def resnet34_from_resnet101() -> dict[str, str]:
    """The documented rule worked out by hand: per stage, the i-th 3x3 conv of a shape takes the i-th
    upstream conv of that shape (Bottleneck blocks have one 3x3 conv each, ``conv2``)."""
    plan = {"conv1": "conv1"}
    plan.update(zip(["layer1.0.conv1", "layer1.0.conv2", "layer1.1.conv1"], [f"layer1.{b}.conv2" for b in range(3)]))
    plan.update(
        zip(["layer2.0.conv2", "layer2.1.conv1", "layer2.1.conv2", "layer2.2.conv1"], [f"layer2.{b}.conv2" for b in range(4)])
    )
    layer3 = ["layer3.0.conv2"] + [f"layer3.{b}.conv{c}" for b in range(1, 6) for c in (1, 2)]
    plan.update(zip(layer3, [f"layer3.{b}.conv2" for b in range(11)]))
    plan.update(zip(["layer4.0.conv2", "layer4.1.conv1", "layer4.1.conv2"], [f"layer4.{b}.conv2" for b in range(3)]))
    return plan


def resnet50_from_resnet101() -> dict[str, str]:
    """Same block structure: every ResNet-50 conv takes the ResNet-101 conv of the same name."""
    return {unit.name: unit.name for unit in conv_units(build_torchvision_cnn("resnet50", 2, width=0.125))}


EXPECTED = {
    ("resnet101", "resnet34"): resnet34_from_resnet101,
    ("resnet101", "resnet50"): resnet50_from_resnet101,
    ("vgg16", "vgg11"): lambda: {
        "features.0": "features.0",
        "features.4": "features.7",
        "features.8": "features.14",
        "features.11": "features.17",
        "features.15": "features.24",
        "features.18": "features.27",
        "features.22": "features.34",
        "features.25": "features.37",
    },
    ("vgg16", "vgg13"): lambda: {
        "features.0": "features.0",
        "features.3": "features.3",
        "features.7": "features.7",
        "features.10": "features.10",
        "features.14": "features.14",
        "features.17": "features.17",
        "features.21": "features.24",
        "features.24": "features.27",
        "features.28": "features.34",
        "features.31": "features.37",
    },
}


def trained_looking(model: nn.Module) -> nn.Module:
    """Give every BatchNorm non-default affine parameters and running statistics, so that a copied
    entry differs from the fresh init (1, 0, 0, 1)."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_()
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 2.0)
    return model


@pytest.mark.parametrize(("upstream", "downstream"), list(EXPECTED))
def test_plan_and_copies_for_paper_pairs(upstream: str, downstream: str) -> None:
    with torch_seed(1):
        source = trained_looking(build_torchvision_cnn(upstream, num_classes=3))
    with torch_seed(2):
        target = build_torchvision_cnn(downstream, num_classes=2)
    fresh = copy.deepcopy(target.state_dict())
    plan = transfer_parameters(source, target, alpha=0.5, selection="random", generator=torch.Generator().manual_seed(0))

    expected = EXPECTED[(upstream, downstream)]()
    units = {unit.name: unit for unit in conv_units(target)}
    assert [row.target for row in plan] == list(units)  # one row per downstream conv, in module order
    assert {row.target: row.source for row in plan if row.source} == expected
    groups: dict[int, list[int]] = {}
    for row in plan:
        assert row.total == units[row.target].conv.out_channels
        assert row.copied == (count_for(0.5, row.total) if row.source else 0) == len(row.indices)
        if row.source:  # one channel set per channel space: a transferred channel reads transferred channels
            assert groups.setdefault(units[row.target].out_space, row.indices) == row.indices

    want = copy.deepcopy(fresh)
    source_state, source_units = source.state_dict(), {unit.name: unit for unit in conv_units(source)}
    source_names = {id(module): name for name, module in source.named_modules()}
    target_names = {id(module): name for name, module in target.named_modules()}
    for row in plan:
        if not row.source:
            continue
        idx = torch.tensor(row.indices)
        pairs = [
            (f"{row.target}.{key}", f"{row.source}.{key}")
            for key in ("weight", "bias")
            if f"{row.target}.{key}" in want and f"{row.source}.{key}" in source_state
        ]
        target_bn = target_names[id(units[row.target].bn)]
        source_bn = source_names[id(source_units[row.source].bn)]
        pairs += [(f"{target_bn}.{key}", f"{source_bn}.{key}") for key in BN_KEYS]
        for target_key, source_key in pairs:
            want[target_key][idx] = source_state[source_key][idx]
    got = target.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    changed = [key for key in want if not torch.equal(want[key], fresh[key])]
    assert changed and all(not key.startswith(("fc.", "classifier.")) for key in changed)


def test_alpha_zero_copies_nothing() -> None:
    source, target = build_torchvision_cnn("vgg16", 3, width=0.25), build_torchvision_cnn("vgg11", 2, width=0.25)
    fresh = copy.deepcopy(target.state_dict())
    plan = transfer_parameters(trained_looking(source), target, alpha=0.0)
    assert all(row.copied == 0 for row in plan) and all(row.source for row in plan)
    assert all(torch.equal(target.state_dict()[k], v) for k, v in fresh.items())


def test_no_matching_shape_fails_with_one_line() -> None:
    source, target = build_torchvision_cnn("resnet34", 3, width=0.25), build_torchvision_cnn("resnet18", 2, width=0.5)
    assert find_adapter(source, target) is CNNFilterTransfer
    with pytest.raises(ValueError) as err:
        transfer_parameters(source, target, alpha=0.5)
    assert "\n" not in str(err.value) and "matches" in str(err.value)


@pytest.mark.parametrize(
    ("upstream", "downstream", "pattern"),
    [
        ("resnet34_small", "vgg11_small", "no transfer rule for upstream SmallImageResNet -> downstream SmallImageVGG"),
        ("resnet34_small", "resnet18", "no conv of downstream SmallImageResNet matches"),
    ],
)
def test_pipeline_pair_check_is_one_config_error(make_cfg, upstream: str, downstream: str, pattern: str) -> None:
    cfg = parse(make_cfg("task=digits", "noise=pixels", f"upstream_model={upstream}", f"model={downstream}", small=False))
    source = build_torchvision_cnn(cfg.upstream_model.arch, 8, cfg.upstream_model.width)
    target = build_torchvision_cnn(cfg.model.arch, 2, cfg.model.width)
    with pytest.raises(ConfigError, match=pattern) as err:
        check_transfer_pair(cfg, source, target)
    assert str(err.value).startswith(f"upstream_model={cfg.upstream_model.arch} -> model={cfg.model.arch}: ")
    assert "\n" not in str(err.value)

"""Any torchvision or timm model: the factories, the 32x32 stem rule, filter transfer whose structure is
read from the module graph (ResNet, VGG, MobileNetV3, ConvNeXt, a timm ResNet, a timm ViT of another
depth), element selection between widths, and digits pipelines through model=torchvision / model=timm."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from ptlab.checks import check_paths
from ptlab.config import ConfigError
from ptlab.models import build_timm_model, build_torchvision_cnn
from ptlab.pipeline import run_pipeline
from ptlab.seeding import torch_seed
from ptlab.transfer import conv_units, count_for, find_adapter, transfer_parameters
from ptlab.transfer.conv import CNNFilterTransfer, discover
from ptlab.transfer.vit import ViTLayerTransfer

TIMM_TINY_RESNET = {"channels": [8, 16, 32, 64], "stem_width": 8}
"""timm ResNet keyword arguments that make resnet18d tiny."""


def trained_looking(model: nn.Module) -> nn.Module:
    """Every parameter and buffer redrawn, so a copied entry differs from any fresh init."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            if tensor.is_floating_point():
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    return model


def pair(build, seed_source: int = 1, seed_target: int = 2, source_kwargs=None, target_kwargs=None):
    with torch_seed(seed_source):
        source = trained_looking(build(**(source_kwargs or {})))
    with torch_seed(seed_target):
        target = build(**(target_kwargs or {}))
    return source, target


def expected_state(source: nn.Module, target: nn.Module, fresh: dict[str, torch.Tensor], plan) -> dict[str, torch.Tensor]:
    """The fresh state with each planned filter, its bias and its followers' entries written by hand,
    entry by entry from the plan's indices."""
    want = copy.deepcopy(fresh)
    src_state = source.state_dict()
    source_followers = {unit.name: unit.followers for unit in conv_units(source)}
    target_followers = {unit.name: unit.followers for unit in conv_units(target)}
    for row in plan:
        if not row.indices:
            continue
        if row.target not in target_followers:  # a norm on a residual stream: its per-channel tensors
            for key in [k for k in want if k.startswith(row.target + ".") and want[k].dim() >= 1]:
                for t_out, s_out in zip(row.indices, row.source_indices or row.indices, strict=True):
                    want[key][t_out] = src_state[key][s_out]
            continue
        weight = f"{row.target}.weight"
        keys = [
            (f"{row.target}.{k}", f"{row.source}.{k}")
            for k in ("weight", "bias")
            if f"{row.target}.{k}" in want and f"{row.source}.{k}" in src_state
        ]
        keys += list(zip(target_followers[row.target], source_followers[row.source], strict=True))
        for target_key, source_key in keys:
            for t_out, s_out in zip(row.indices, row.source_indices or row.indices, strict=True):
                if target_key == weight and row.input_indices is not None:
                    for t_in, s_in in zip(row.input_indices, row.source_input_indices, strict=True):
                        want[target_key][t_out, t_in] = src_state[source_key][s_out, s_in]
                else:
                    want[target_key][t_out] = src_state[source_key][s_out]
    return want


def check_transfer(source: nn.Module, target: nn.Module, alpha: float = 0.5):
    """Transfer, then compare every tensor of the target with the hand-written expectation; the heads
    keep their init."""
    fresh = copy.deepcopy(target.state_dict())
    plan = transfer_parameters(source, target, alpha=alpha, generator=torch.Generator().manual_seed(0))
    want = expected_state(source, target, fresh, plan)
    got = target.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        assert torch.equal(got[key], want[key]), key
    heads = discover(target).heads
    head_keys = [k for k in got if any(k.startswith(head + ".") for head in heads)]
    assert head_keys and all(torch.equal(got[k], fresh[k]) for k in head_keys)
    return plan, fresh


def spaces_share_indices(target: nn.Module, plan) -> None:
    """One index set per channel space (units and stream norms alike)."""
    structure = discover(target)
    space = {**{unit.name: unit.out_space for unit in structure.units}, **structure.stream_norms}
    seen: dict[int, list[int]] = {}
    for row in plan:
        if row.indices:
            assert seen.setdefault(space[row.target], row.indices) == row.indices, row.target


# -- the 32x32 stem rule and the factories ------------------------------------------------------------


def test_stem_rule_and_unknown_names() -> None:
    mobile = build_torchvision_cnn("mobilenet_v3_small", 2, options={"width_mult": 0.25})
    assert mobile.features[0][0].stride == (1, 1) and mobile(torch.randn(2, 3, 32, 32)).shape == (2, 2)
    native = build_torchvision_cnn("mobilenet_v3_small", 2, small_input=False, options={"width_mult": 0.25})
    assert native.features[0][0].stride == (2, 2)
    timm_resnet = build_timm_model("resnet18d", 3, options=TIMM_TINY_RESNET)
    assert timm_resnet.conv1[0].stride == (1, 1) and isinstance(timm_resnet.maxpool, nn.Identity)
    # 32x32 reaches the last stage at 4x4 (stride 8 after the adapted stem)
    assert timm_resnet.forward_features(torch.randn(1, 3, 32, 32)).shape[-1] == 4
    with pytest.raises(ConfigError, match=r"^arch='mobilenet_v3_smal' is not allowed: .*close names: mobilenet_v3_s"):
        build_torchvision_cnn("mobilenet_v3_smal", 2)
    with pytest.raises(ConfigError, match=r"^name='resnet18dd' is not allowed: .*close names: resnet18d"):
        build_timm_model("resnet18dd", 2)
    with pytest.raises(ConfigError, match=r"^width=0.5 is not allowed with arch=mobilenet_v3_small"):
        build_torchvision_cnn("mobilenet_v3_small", 2, width=0.5)


def test_preflight_checks_library_names_and_passes_presets(make_cfg) -> None:
    check_paths(make_cfg("task=digits", "model=timm", "upstream_model=resnet18_small", small=False))
    with pytest.raises(
        ConfigError,
        match=r"^upstream_model.name='resnet18dd' is not allowed: not a model of the "
        r"library \(close names: resnet18d",
    ) as err:
        check_paths(make_cfg("task=digits", "upstream_model=timm", "upstream_model.name=resnet18dd", small=False))
    assert "\n" not in str(err.value)


# -- structure discovery ---------------------------------------------------------------------------


def test_resnet_structure_residual_stream_is_one_space() -> None:
    units = {u.name: u for u in conv_units(build_torchvision_cnn("resnet18", 2, width=0.125))}
    assert "fc" not in units
    assert units["layer1.0.conv1"].followers == [f"layer1.0.bn1.{k}" for k in ("weight", "bias", "running_mean", "running_var")]
    stream = units["conv1"].out_space  # the stem writes layer1's residual stream
    assert units["layer1.0.conv2"].out_space == units["layer1.1.conv2"].out_space == stream
    assert units["layer1.0.conv1"].out_space != stream and units["layer1.0.conv1"].in_space == stream
    assert units["layer2.0.conv2"].out_space == units["layer2.0.downsample.0"].out_space != stream
    assert [units[n].stage for n in ("conv1", "layer1.0.conv1", "layer2.0.conv1", "layer4.1.conv2")] == [
        "level0",
        "level0",
        "level1",
        "level3",
    ]


def test_mobilenet_depthwise_conv_reads_and_writes_one_space() -> None:
    units = conv_units(build_torchvision_cnn("mobilenet_v3_small", 2, options={"width_mult": 0.25}))
    by_name = {u.name: u for u in units}
    dw = [u for u in units if u.depthwise]
    assert dw and all(u.out_space == u.in_space for u in dw)
    expand = by_name["features.2.block.0.0"]  # 1x1 expansion, then the depthwise conv of that block
    assert by_name["features.2.block.1.0"].depthwise and by_name["features.2.block.1.0"].in_space == expand.out_space
    # the squeeze-excitation gate multiplies the block: its second conv writes the gated space
    assert by_name["features.1.block.1.fc2"].out_space == by_name["features.1.block.0.0"].out_space


def test_convnext_layer_scale_and_norm_follow_their_unit() -> None:
    units = {u.name: u for u in conv_units(build_timm_model("convnext_atto", 2))}
    block = "stages.0.blocks.0"
    assert units[f"{block}.conv_dw"].depthwise
    assert units[f"{block}.conv_dw"].followers == [f"{block}.norm.weight", f"{block}.norm.bias"]
    assert f"{block}.gamma" in units[f"{block}.mlp.fc2"].followers
    assert units[f"{block}.mlp.fc2"].out_space == units[f"{block}.conv_dw"].in_space  # the residual stream
    # the downsampling LayerNorm of stage 1 normalises stage 0's residual stream
    assert (
        discover(build_timm_model("convnext_atto", 2)).stream_norms["stages.1.downsample.0"]
        == units[f"{block}.mlp.fc2"].out_space
    )


def test_grouped_conv_is_refused_with_one_line() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 3, groups=2), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(ValueError, match=r"does not support grouped conv 1 \(groups=2, 8 -> 8 channels\)") as err:
        discover(model)
    assert "\n" not in str(err.value)


# -- transfer: copied filters equal their source incl. followers, the rest at init ---------------

CASES = {
    "resnet18": lambda: build_torchvision_cnn("resnet18", 2, width=0.125),
    "vgg11": lambda: build_torchvision_cnn("vgg11", 2, width=0.125),
    "mobilenet_v3_small": lambda: build_torchvision_cnn("mobilenet_v3_small", 2, options={"width_mult": 0.25}),
    "convnext_atto": lambda: build_timm_model("convnext_atto", 2),
    "timm_resnet18d": lambda: build_timm_model("resnet18d", 2, options=TIMM_TINY_RESNET),
}


@pytest.mark.parametrize("name", list(CASES))
def test_equal_width_transfer_copies_planned_filters_and_followers(name: str) -> None:
    source, target = pair(CASES[name])
    assert find_adapter(source, target) is CNNFilterTransfer
    plan, fresh = check_transfer(source, target)
    assert all(row.source == row.target and row.copied == count_for(0.5, row.total) for row in plan)
    assert all(row.input_indices is None for row in plan)
    spaces_share_indices(target, plan)
    changed = {k for k, v in target.state_dict().items() if not torch.equal(v, fresh[k])}
    followers = {key for unit in conv_units(target) for key in unit.followers}
    assert changed & followers  # norm entries (and layer scales) moved with their filters
    if name == "convnext_atto":  # stream norms get a row of their own, after the units
        assert "stages.1.downsample.0.weight" in changed
        assert any(row.target == "stages.1.downsample.0" for row in plan)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["convnext_tiny", "efficientnet_b0"])
def test_equal_width_transfer_torchvision_full_size(arch: str) -> None:
    source, target = pair(lambda: build_torchvision_cnn(arch, 2))
    plan, _ = check_transfer(source, target)
    spaces_share_indices(target, plan)


def test_width_mismatched_pair_uses_element_selection() -> None:
    source, target = pair(
        lambda width: build_torchvision_cnn("resnet18", 2, width=width),
        source_kwargs={"width": 0.25},
        target_kwargs={"width": 0.125},
    )
    plan, fresh = check_transfer(source, target)
    rows = {row.target: row for row in plan}
    stem, block = rows["conv1"], rows["layer1.0.conv1"]
    # target stem width 8, source 16: round(0.5 * 8) = 4 source channels, packed into positions 0..3
    assert stem.indices == [0, 1, 2, 3] and len(stem.source_indices) == 4 and max(stem.source_indices) < 16
    assert stem.input_indices is None  # 3 image channels on both sides: whole filters
    assert block.input_indices == stem.indices and block.source_input_indices == stem.source_indices
    got, src = target.state_dict(), source.state_dict()
    w = got["layer1.0.conv1.weight"]
    for t_out, s_out in zip(block.indices, block.source_indices):
        for t_in, s_in in zip(stem.indices, stem.source_indices):
            assert torch.equal(w[t_out, t_in], src["layer1.0.conv1.weight"][s_out, s_in])
        rest = [i for i in range(w.shape[1]) if i not in stem.indices]
        assert torch.equal(w[t_out, rest], fresh["layer1.0.conv1.weight"][t_out, rest])  # other inputs at init
    untouched = [i for i in range(w.shape[0]) if i not in block.indices]
    assert torch.equal(w[untouched], fresh["layer1.0.conv1.weight"][untouched])
    assert torch.equal(got["bn1.running_var"][stem.indices], src["bn1.running_var"][stem.source_indices])
    assert json.loads(json.dumps(block.as_dict()))["source_input_indices"] == stem.source_indices

    wider_source, wider_target = pair(
        lambda width: build_torchvision_cnn("resnet18", 2, width=width),
        source_kwargs={"width": 0.125},
        target_kwargs={"width": 0.25},
    )
    plan, _ = check_transfer(wider_source, wider_target)
    assert {row.target: row.copied for row in plan}["conv1"] == 8  # min(round(0.5 * 16), 8): every source filter


def test_width_mismatched_depthwise_network_copies_what_the_plan_says() -> None:
    source, target = pair(
        lambda w: build_torchvision_cnn("mobilenet_v3_small", 2, options={"width_mult": w}),
        source_kwargs={"w": 0.5},
        target_kwargs={"w": 0.25},
    )
    plan, _ = check_transfer(source, target)  # every tensor against the plan, entry by entry
    rows = {row.target: row for row in plan}
    dw = rows["features.2.block.1.0"]  # depthwise: the channels of the expansion conv before it
    assert dw.indices == rows["features.2.block.0.0"].indices and dw.input_indices is None
    assert any(row.input_indices is not None for row in plan)


def test_timm_vit_of_another_depth_inherits_blocks_by_index() -> None:
    def vit(depth: int) -> nn.Module:
        return build_timm_model(
            "vit_tiny_patch16_224", 3, options={"img_size": 32, "patch_size": 8, "depth": depth, "embed_dim": 48, "num_heads": 2}
        )

    source, target = pair(lambda depth: vit(depth), source_kwargs={"depth": 4}, target_kwargs={"depth": 2})
    assert find_adapter(source, target) is ViTLayerTransfer
    fresh = copy.deepcopy(target.state_dict())
    transfer_parameters(source, target, alpha=0.5, adapter=ViTLayerTransfer(layers=None, position="last"))
    got, src = target.state_dict(), source.state_dict()
    for key in got:
        if key.startswith("blocks.1.") or key.split(".")[0] in ("patch_embed", "cls_token", "pos_embed", "norm"):
            assert torch.equal(got[key], src[key]), key
        else:
            assert torch.equal(got[key], fresh[key]), key


# -- digits pipelines through model=torchvision / model=timm --------------------------------------

TINY = [
    "task=digits",
    "noise=pixels",
    "task.n2=8",
    "task.k=2",
    "task.n1_ratio=2",
    "task.n_test=10",
    "train.upstream_epochs=1",
    "train.downstream_epochs=1",
    "train.batch_size=8",
    "train.progress_bar=false",
    "logger=none",
    "cache.enabled=false",
    "task.image_size=16",
]


@pytest.mark.parametrize(
    "model",
    [
        ["model=torchvision", "model.arch=mobilenet_v3_small", "+model.options.width_mult=0.25"],
        ["model=timm", "model.name=resnet18d", "+model.options.channels=[8,16,32,64]", "+model.options.stem_width=8"],
    ],
)
def test_digits_pipeline_with_any_library_model(make_cfg, tmp_path: Path, model: list[str]) -> None:
    cfg = make_cfg(*TINY, *model, small=False)
    summary = run_pipeline(cfg, tmp_path / "out")
    plan = summary["transfer"]["plan"]
    assert plan and all(row["copied"] == count_for(0.5, row["total"]) for row in plan)
    for stage in ("upstream", "transfer", "scratch"):
        assert 0.0 <= summary[stage]["test_acc"] <= 1.0 and summary[stage]["epochs"] == 1

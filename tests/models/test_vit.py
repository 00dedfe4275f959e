"""DeiT models from timm and block ("layers") transfer between them (issue 6, the paper's Figure 4).

Models are deit_tiny at 32x32 with 4x4 patches (64 tokens); the transfer tests also narrow its width
from 192 to 48 (``NARROW``, same 12 blocks and 3 heads) so that each runs in well under a second.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest
import torch

from ptlab.config import ConfigError, validate
from ptlab.models import WeightsError, create_vit
from ptlab.seeding import torch_seed
from ptlab.transfer import ParameterTransfer, Transfer, ViTLayerTransfer, find_adapter, transfer_parameters
from ptlab.transfer.options import adapter_options
from ptlab.transfer.vit import block_indices

SMALL_VIT = {"img_size": 32, "patch_size": 4}
NARROW = {"embed_dim": 48}
FRESH_FIT = SimpleNamespace(ckpt_path=None)
"""What ``ParameterTransfer.on_fit_start`` reads of the trainer: a fit not resumed from a checkpoint."""
EMBEDDINGS = ("patch_embed", "cls_token", "pos_embed", "norm")


def tiny(num_classes: int = 10, seed: int = 0, **kwargs) -> torch.nn.Module:
    """A fresh deit_tiny at 32x32 whose init is drawn from ``seed`` (a copy of a cached build)."""
    if "weights_path" in kwargs or "pretrained" in kwargs:
        return _build(num_classes, seed, tuple(kwargs.items()))
    return copy.deepcopy(_cached(num_classes, seed, tuple(sorted(kwargs.items()))))


def _build(num_classes: int, seed: int, kwargs: tuple) -> torch.nn.Module:
    with torch_seed(seed):
        return create_vit("deit_tiny", num_classes=num_classes, **{**SMALL_VIT, **dict(kwargs)})


_cached = functools.lru_cache(maxsize=None)(_build)


def narrow(num_classes: int = 10, seed: int = 0, **kwargs) -> torch.nn.Module:
    """``tiny`` at width 48."""
    return tiny(num_classes, seed, **NARROW, **kwargs)


def trained_like(model: torch.nn.Module, seed: int = 123) -> torch.nn.Module:
    """``model`` with every tensor moved away from its init (a stand-in for an upstream model)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            tensor.add_(torch.randn(tensor.shape, generator=gen))
    return model


def part(model: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The state-dict entries of ``model`` under component ``prefix`` (e.g. ``blocks.9``, ``cls_token``)."""
    return {k: v for k, v in model.state_dict().items() if k == prefix or k.startswith(prefix + ".")}


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_differs(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert all(not torch.equal(a[key], b[key]) for key in a)


# -- models --------------------------------------------------------------------------------------


def test_create_vit_is_timm_deit_with_fresh_trunc_normal_init() -> None:
    model = tiny(num_classes=7)
    assert type(model).__name__ == "VisionTransformer"
    assert (len(model.blocks), model.embed_dim, model.patch_embed.num_patches) == (12, 192, 64)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    qkv = model.blocks[0].attn.qkv.weight
    assert abs(qkv.std().item() - 0.02) < 0.001 and abs(qkv.mean().item()) < 0.001  # trunc_normal_(std=.02)
    assert_same(part(model, "blocks"), part(tiny(num_classes=7), "blocks"))  # same seed, same init


@pytest.mark.parametrize("layout", ["state_dict", "checkpoint"])
def test_weights_path_loads_into_a_model_with_another_class_count(tmp_path: Path, layout: str) -> None:
    """A 4-block deit_tiny (full width) saved, then loaded with 4 classes instead of 10."""
    saved = trained_like(tiny(num_classes=10, seed=1, depth=4))
    path = tmp_path / "deit_tiny.pth"
    torch.save(saved.state_dict() if layout == "state_dict" else {"state_dict": saved.state_dict(), "epoch": 3}, path)

    loaded = tiny(num_classes=4, seed=2, depth=4, weights_path=str(path))
    fresh = tiny(num_classes=4, seed=2, depth=4)
    for key, value in loaded.state_dict().items():
        if key.startswith("head."):
            assert value.shape[0] == 4
            assert torch.equal(value, fresh.state_dict()[key])  # a new head keeps its fresh init
        else:
            assert torch.equal(value, saved.state_dict()[key]), key


def test_weights_path_with_the_same_class_count_keeps_the_head(tmp_path: Path) -> None:
    saved = trained_like(tiny(num_classes=10, seed=1, depth=4))
    torch.save(saved.state_dict(), tmp_path / "w.pth")
    loaded = tiny(num_classes=10, seed=5, depth=4, weights_path=str(tmp_path / "w.pth"))
    assert_same(loaded.state_dict(), saved.state_dict())


def test_missing_weight_file_is_one_line_saying_what_to_put_where(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere" / "deit_tiny.pth"
    with pytest.raises(WeightsError) as err:
        tiny(weights_path=str(missing))
    message = str(err.value)
    assert "\n" not in message
    assert str(missing) in message and "deit_tiny_patch16_224" in message and "put" in message
    assert isinstance(err.value, (ConfigError, FileNotFoundError))


def test_weight_file_of_another_architecture_is_one_line(tmp_path: Path) -> None:
    torch.save(tiny(depth=2).state_dict(), tmp_path / "shallow.pth")
    with pytest.raises(WeightsError, match=r"does not fit deit_tiny_patch16_224: \d+ missing") as err:
        tiny(depth=4, weights_path=str(tmp_path / "shallow.pth"))
    assert "\n" not in str(err.value)


def test_offline_hub_without_cached_weights_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError) as err:
        tiny(pretrained=True)
    message = str(err.value)
    assert "\n" not in message
    assert "timm/deit_tiny_patch16_224.fb_in1k" in message and str(tmp_path / "hub") in message
    assert "weights_path" in message


# -- configs -------------------------------------------------------------------------------------

VIT_PAIR = ["task=digits", "model=deit_tiny", "upstream_model=deit_tiny", "transfer=layers"]


def test_layer_transfer_config_defaults_and_one_line_errors(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(*VIT_PAIR, small=False)
    validate(cfg)
    assert list(cfg.transfer.layers) == [9, 10, 11] and cfg.transfer.position == "last"
    assert all(cfg.transfer[switch] for switch in EMBEDDINGS)
    assert cfg.upstream_model.name == "deit_tiny" and cfg.model._target_ == "ptlab.models.create_vit"

    bad = {
        "transfer.position=middle": "transfer.position='middle' is not allowed: must be one of last, first, random",
        "transfer.layers=[9,9]": "transfer.layers=[9, 9] is not allowed",
        f"upstream_model.weights_path={tmp_path}/w.pth": f"upstream_model.weights_path='{tmp_path}/w.pth' is not",
        "model.img_size=30": "model.img_size=30 is not allowed: must be a multiple of patch_size=16",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError) as err:
            validate(make_cfg(*VIT_PAIR, override, small=False))
        assert str(err.value).startswith(message) and "\n" not in str(err.value)


def test_filter_transfer_config_is_unchanged(make_cfg) -> None:
    cfg = make_cfg()
    assert set(cfg.transfer) == {"kind", "alpha", "selection", "control"}
    assert adapter_options(cfg.transfer) == {}  # none of them reaches the filter adapter
    validate(cfg)


# -- transfer ------------------------------------------------------------------------------------


def test_vit_pair_gets_the_layer_adapter() -> None:
    assert find_adapter(narrow(), narrow()) is ViTLayerTransfer


def test_paper_blocks_and_embeddings_equal_the_source_the_rest_its_fresh_init() -> None:
    source = trained_like(narrow(num_classes=10, seed=1))
    target, fresh = narrow(num_classes=3, seed=2), narrow(num_classes=3, seed=2)
    callback = ParameterTransfer(Transfer(source, 0.25, options={"layers": [9, 10, 11]}))
    callback.on_fit_start(FRESH_FIT, SimpleNamespace(model=target))

    for i in range(12):
        expected = source if i in (9, 10, 11) else fresh
        assert_same(part(target, f"blocks.{i}"), part(expected, f"blocks.{i}"))
    for name in EMBEDDINGS:
        assert_same(part(target, name), part(source, name))
    assert_same(part(target, "head"), part(fresh, "head"))
    assert_differs(part(target, "blocks.0"), part(source, "blocks.0"))

    rows = {row.target: row for row in callback.plan}
    assert list(rows) == ["cls_token", "pos_embed", "patch_embed", *[f"blocks.{i}" for i in range(12)], "norm", "head"]
    block = sum(p.numel() for p in target.blocks[0].parameters())
    assert [(rows[f"blocks.{i}"].source, rows[f"blocks.{i}"].copied) for i in (8, 9)] == [("", 0), ("blocks.9", block)]
    assert rows["head"].source == "" and rows["head"].copied == 0 and rows["head"].total == 3 * 48 + 3
    assert rows["pos_embed"].copied == rows["pos_embed"].total == 65 * 48
    total_inherited = sum(r.copied for r in callback.plan)
    assert total_inherited == sum(p.numel() for p in target.parameters()) - 9 * block - (3 * 48 + 3)


def test_switches_off_keep_embeddings_and_norm_fresh() -> None:
    source = trained_like(narrow(seed=1))
    target, fresh = narrow(seed=2), narrow(seed=2)
    transfer_parameters(
        source,
        target,
        alpha=0.0,
        adapter=ViTLayerTransfer(layers=[0], patch_embed=False, cls_token=False, pos_embed=False, norm=False),
    )
    for name in (*EMBEDDINGS, "head", "blocks.1"):
        assert_same(part(target, name), part(fresh, name))
    assert_same(part(target, "blocks.0"), part(source, "blocks.0"))


@pytest.mark.parametrize(
    "alpha, position, expected",
    [
        (0.25, "last", [9, 10, 11]),
        (0.25, "first", [0, 1, 2]),
        (0.125, "last", [10, 11]),  # 1.5 blocks round half up to 2
        (0.5, "first", [0, 1, 2, 3, 4, 5]),
        (1.0, "last", list(range(12))),
        (0.0, "last", []),
    ],
)
def test_alpha_and_position_select_the_documented_blocks(alpha: float, position: str, expected: list[int]) -> None:
    assert block_indices(None, position, alpha, 12, 12, torch.Generator().manual_seed(0)) == expected


def test_random_position_is_seeded_and_copies_those_blocks() -> None:
    picks = [block_indices(None, "random", 0.25, 12, 12, torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert picks[0] == picks[1] != picks[2]
    assert len(picks[0]) == 3 == len(set(picks[0])) and picks[0] == sorted(picks[0])

    source = trained_like(narrow(seed=1))
    target, fresh = narrow(seed=2), narrow(seed=2)
    plan = transfer_parameters(
        source,
        target,
        alpha=0.25,
        generator=torch.Generator().manual_seed(0),
        adapter=ViTLayerTransfer(layers=None, position="random"),
    )
    assert [int(r.target.split(".")[1]) for r in plan if r.target.startswith("blocks.") and r.copied] == picks[0]
    for i in range(12):
        assert_same(part(target, f"blocks.{i}"), part(source if i in picks[0] else fresh, f"blocks.{i}"))


def test_shallower_downstream_maps_blocks_by_index() -> None:
    source = trained_like(narrow(seed=1))  # 12 blocks
    target, fresh = narrow(seed=2, depth=6), narrow(seed=2, depth=6)
    plan = transfer_parameters(source, target, alpha=0.5, adapter=ViTLayerTransfer(layers=None, position="last"))
    moved = [(r.source, r.target) for r in plan if r.target.startswith("blocks.") and r.copied]
    assert moved == [("blocks.3", "blocks.3"), ("blocks.4", "blocks.4"), ("blocks.5", "blocks.5")]
    for i in range(6):
        assert_same(part(target, f"blocks.{i}"), part(source if i >= 3 else fresh, f"blocks.{i}"))

    with pytest.raises(
        ValueError,
        match=r"^transfer.layers=\[9, 10, 11\] has blocks \[9, 10, 11\] outside 0..5 "
        r"\(upstream depth 12, downstream depth 6",
    ):
        transfer_parameters(source, narrow(depth=6), alpha=0.25, adapter=ViTLayerTransfer(layers=[9, 10, 11]))


def test_deeper_downstream_inherits_only_indices_the_upstream_has() -> None:
    source = trained_like(narrow(seed=1, depth=4))
    target = narrow(seed=2)  # 12 blocks: alpha 0.25 -> 3 blocks, the last 3 of the 4 shared indices
    plan = transfer_parameters(source, target, alpha=0.25, adapter=ViTLayerTransfer(layers=None))
    assert [r.target for r in plan if r.target.startswith("blocks.") and r.copied] == ["blocks.1", "blocks.2", "blocks.3"]
    assert_same(part(target, "blocks.3"), part(source, "blocks.3"))
    with pytest.raises(ValueError, match=r"transfer.alpha=0.5 asks for 6 blocks but only 4 can map by index"):
        transfer_parameters(source, narrow(), alpha=0.5, adapter=ViTLayerTransfer(layers=None))


def test_mismatched_widths_and_grids_are_one_line_errors() -> None:
    source = narrow(seed=1)
    with pytest.raises(ValueError, match="equal embedding widths: upstream embed_dim 48 vs downstream 384"):
        with torch_seed(0):
            small = create_vit("deit_small", num_classes=10, **SMALL_VIT)
        transfer_parameters(source, small, alpha=0.25, adapter=ViTLayerTransfer())
    with pytest.raises(ValueError, match=r"cannot inherit pos_embed: .*set transfer.pos_embed=false"):
        transfer_parameters(source, narrow(img_size=16), alpha=0.25, adapter=ViTLayerTransfer(patch_embed=False))
    plan = transfer_parameters(source, narrow(img_size=16), alpha=0.25, adapter=ViTLayerTransfer(pos_embed=False))
    assert [r.target for r in plan if r.copied][:2] == ["cls_token", "patch_embed"]


def test_unknown_position_is_one_line() -> None:
    with pytest.raises(ValueError, match=r"^transfer.position='middle' is unknown: choose one of last, first, random$"):
        ViTLayerTransfer(position="middle")


def test_layer_options_reach_the_adapter_through_the_config(make_cfg) -> None:
    from ptlab.transfer import adapter_options

    cfg = make_cfg(*VIT_PAIR, "transfer.layers=null", "transfer.position=first", "transfer.norm=false", small=False)
    options = adapter_options(cfg.transfer)
    assert options == {
        "layers": None,
        "position": "first",
        "patch_embed": True,
        "cls_token": True,
        "pos_embed": True,
        "norm": False,
    }
    assert adapter_options(make_cfg().transfer) == {}
    source = trained_like(narrow(seed=1))
    target, fresh = narrow(seed=2), narrow(seed=2)
    callback = ParameterTransfer(Transfer(source, cfg.transfer.alpha, options=options))
    callback.on_fit_start(FRESH_FIT, SimpleNamespace(model=target))
    assert [r.target for r in callback.plan if r.target.startswith("blocks.") and r.copied] == [
        "blocks.0",
        "blocks.1",
        "blocks.2",
    ]
    assert_same(part(target, "norm"), part(fresh, "norm"))


# -- presets, pipeline and report ----------------------------------------------------------------


def test_fig4_presets_compose_to_the_paper_pair(make_cfg) -> None:
    fig4 = make_cfg("experiment=fig4", small=False)
    validate(fig4)
    assert (fig4.model.name, fig4.upstream_model.name, fig4.upstream_model.pretrained) == ("deit_base", "deit_base", True)
    assert fig4.train.upstream_epochs == 0 and fig4.train.optimizer == "adamw" and fig4.train.label_smoothing > 0
    assert list(fig4.transfer.layers) == [9, 10, 11]
    digits = make_cfg("experiment=fig4_digits", small=False)
    validate(digits)
    assert (digits.task.name, digits.model.name, digits.model.img_size, digits.task.image_size) == ("digits", "deit_tiny", 8, 8)
    assert digits.train.upstream_epochs > 0


@pytest.mark.slow
def test_fig4_digits_pipeline_end_to_end_with_report(make_cfg, tmp_path: Path, tracking_uri: str) -> None:
    """One epoch per stage on a few digits: the plan lands in summary.json, the report draws Figure 4."""
    import json

    from ptlab.pipeline import run_pipeline
    from ptlab.report import make_report

    cfg = make_cfg(
        "experiment=fig4_digits",
        "task.n2=10",
        "task.n1_ratio=4",
        "task.n_test=20",
        "train.upstream_epochs=1",
        "train.downstream_epochs=1",
        "train.warmup_epochs=0",
        "logger.experiment_name=fig4_test",
        small=False,
    )
    run_pipeline(cfg, tmp_path / "out")
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    plan = {row["target"]: row for row in summary["transfer"]["plan"]}
    assert [name for name, row in plan.items() if row["source"]] == [
        "cls_token",
        "pos_embed",
        "patch_embed",
        "blocks.9",
        "blocks.10",
        "blocks.11",
        "norm",
    ]
    assert plan["head"]["copied"] == 0 and plan["blocks.0"]["copied"] == 0
    for stage in ("upstream", "transfer", "scratch"):
        assert 0.0 <= summary[stage]["test_acc"] <= 1.0

    paths = make_report("fig4_test", tracking_uri, tmp_path / "report", log_to_mlflow=False)
    assert sorted(p.name for p in paths) == ["fig4_test.csv", "fig4_test.md", "fig4_test.pdf", "fig4_test.png"]
    table = (tmp_path / "report" / "fig4_test.csv").read_text().splitlines()
    assert table[0].startswith("task,transfer_acc_mean") and table[1].startswith("digits,")
    gain = 100 * (summary["transfer"]["test_acc"] - summary["scratch"]["test_acc"])
    assert float(table[1].split(",")[5]) == pytest.approx(gain)


def test_fig4_table_gives_the_paired_interval_and_verdict() -> None:
    from ptlab.report.vit import fig4_table

    gains = [0.02, 0.04, 0.03]
    runs = pd.DataFrame(
        {
            "params.task.name": "digits",
            "params.seed": ["0", "1", "2"],
            "metrics.transfer_test_acc": [0.8 + g for g in gains],
            "metrics.scratch_test_acc": 0.8,
            "metrics.transfer_gain": gains,
            "start_time": [0, 1, 2],
        }
    )
    row = fig4_table(runs).iloc[0]
    half = 100 * 4.302652729911275 * 0.01 / 3**0.5  # t_{0.975, 2} * sd / sqrt(n), in points
    assert row["seeds"] == 3 and row["gain_mean"] == pytest.approx(3.0)
    assert row["gain_ci_low"] == pytest.approx(3.0 - half) and row["gain_ci_high"] == pytest.approx(3.0 + half)
    assert row["verdict"] == "better"

"""The gram engine's block scores (``block_scores``: a step block's LogME and LEEP at once) equal the cell-by-cell
scores (``cell_scores``) bitwise, and keep their refusals and NaNs."""

from __future__ import annotations

import math

import pytest
import torch

from ptlab.engines.gram.scores import block_scores, cell_scores
from ptlab.models.two_layer_cnn import ModelForm


def _inputs(cells: int, width: int, n: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    filters = 2 * width
    clean = torch.randint(0, 2, (cells, n), generator=g) * 2 - 1
    flips = torch.rand(cells, n, generator=g) < 0.2
    return {
        "signal": torch.randn(cells, 3, generator=g),
        "clean": clean.float(),
        "y": torch.where(flips, -clean, clean).float(),
        "scratch": torch.randn(cells, filters, 3 + n, generator=g),
        "transfer": torch.randn(cells, filters, 3 + n, generator=g),
        "upstream": 2 * torch.randn(cells, filters, 3 + n, generator=g),
        "bias": 0.3 * torch.randn(cells, filters, generator=g),
    }


def _alone(t: dict[str, torch.Tensor], b: int, seed: int, samples: int, form: ModelForm, bias: bool) -> dict[str, float]:
    at = (lambda key: t[key][b]) if bias else (lambda key: None)
    return cell_scores(
        seed,
        samples,
        t["signal"][b],
        t["clean"][b],
        t["y"][b],
        form,
        t["scratch"][b],
        at("bias"),
        transfer=t["transfer"][b],
        transfer_bias=at("bias"),
        upstream=t["upstream"][b],
        upstream_bias=at("bias"),
        upstream_form=form,
    )


def _same(a: float, b: float) -> bool:
    return a == b or (math.isnan(a) and math.isnan(b))


@pytest.mark.parametrize(
    "form, bias",
    [
        (ModelForm(), False),
        (ModelForm(bias=True, activation="leaky_relu", patch_reduction="mean"), True),
        (ModelForm(bias=True, activation="relu_q", filter_reduction="sum"), True),  # cell by cell: equal by construction
    ],
)
def test_block_scores_equal_cell_scores_bitwise(form: ModelForm, bias: bool) -> None:
    cells, n = 24, 30
    t = _inputs(cells, 5, n, seed=1)
    t["scratch"][3, 2, 5] = float("nan")  # a diverged start: NaN for that cell's logme_scratch only
    seeds = list(range(cells))
    samples = [n if b % 3 else 17 for b in range(cells)]  # two subset sizes, each seed its own subset
    block = block_scores(
        seeds,
        samples,
        t["signal"],
        t["clean"],
        t["y"],
        form,
        t["scratch"],
        t["bias"] if bias else None,
        transfer=t["transfer"],
        transfer_bias=t["bias"] if bias else None,
        upstream=t["upstream"],
        upstream_bias=t["bias"] if bias else None,
        upstream_form=form,
    )
    for b in range(cells):
        alone = _alone(t, b, seeds[b], samples[b], form, bias)
        assert block[b].keys() == alone.keys() == {"logme", "leep", "logme_scratch", "samples"}
        assert all(_same(block[b][k], alone[k]) for k in alone), (b, block[b], alone)
    assert math.isnan(block[3]["logme_scratch"]) and not math.isnan(block[3]["logme"])
    assert block[0]["samples"] == 17 and block[1]["samples"] == n


def test_block_scores_without_transfer_and_a_one_class_subset() -> None:
    t = _inputs(6, 4, 12, seed=2)
    block = block_scores([0] * 6, [12] * 6, t["signal"], t["clean"], t["y"], ModelForm(), t["scratch"])
    for b in range(6):
        alone = cell_scores(0, 12, t["signal"][b], t["clean"][b], t["y"][b], ModelForm(), t["scratch"][b])
        assert block[b] == alone and set(alone) == {"logme_scratch", "samples"}
    t["y"][4] = 1.0  # one class: no score is defined, NaN as alone; the other cells are scored as before
    again = block_scores([0] * 6, [12] * 6, t["signal"], t["clean"], t["y"], ModelForm(), t["scratch"])
    alone = cell_scores(0, 12, t["signal"][4], t["clean"][4], t["y"][4], ModelForm(), t["scratch"][4])
    assert math.isnan(again[4]["logme_scratch"]) and math.isnan(alone["logme_scratch"])
    assert [again[b] for b in (0, 1, 2, 3, 5)] == [block[b] for b in (0, 1, 2, 3, 5)]

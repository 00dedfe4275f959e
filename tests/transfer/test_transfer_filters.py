"""Filter transfer of the paper's Algorithm 1 through the ParameterTransfer callback."""

import pytest
import pytorch_lightning as pl
import torch

from ptlab.data import FullBatchDataModule
from ptlab.models import TwoLayerReLUCNN
from ptlab.modules import FullBatchGD
from ptlab.transfer import ParameterTransfer, Transfer, build_strategy, count_for, transfer_parameters


def make_pair(width=10, d=6, seed=0):
    torch.manual_seed(seed)
    source = TwoLayerReLUCNN(d, width, init_std=1.0)
    target = TwoLayerReLUCNN(d, width, init_std=0.01)
    return source, target, target.weight.detach().clone()


@pytest.mark.parametrize("alpha,expected", [(0.0, 0), (0.25, 3), (0.5, 5), (0.55, 6), (1.0, 10)])
def test_count_is_round_alpha_m(alpha, expected):
    assert count_for(alpha, 10) == expected


@pytest.mark.parametrize("selection", ["random", "first", "largest_norm"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 0.5, 1.0])
def test_copied_filters_equal_source_and_the_rest_keep_the_fresh_init(selection, alpha):
    source, target, fresh = make_pair()
    plan = transfer_parameters(source, target, alpha, selection, torch.Generator().manual_seed(4))
    k = count_for(alpha, 10)
    assert [row.copied for row in plan] == [k, k] and [row.total for row in plan] == [10, 10]
    for j, row in enumerate(plan):
        copied = torch.zeros(10, dtype=torch.bool)
        copied[row.indices] = True
        assert copied.sum().item() == k
        assert torch.equal(target.weight[j, copied], source.weight[j, copied])
        assert torch.equal(target.weight[j, ~copied], fresh[j, ~copied])


def test_selection_strategies_pick_the_documented_filters():
    source, _, _ = make_pair()
    gen = torch.Generator().manual_seed(0)
    assert build_strategy("first")(source.weight[0], 3, gen).tolist() == [0, 1, 2]
    norms = source.weight[0].norm(dim=1)
    assert build_strategy("largest_norm")(source.weight[0], 3, gen).tolist() == sorted(norms.topk(3).indices.tolist())
    a = build_strategy("random")(source.weight[0], 4, torch.Generator().manual_seed(1)).tolist()
    b = build_strategy("random")(source.weight[0], 4, torch.Generator().manual_seed(1)).tolist()
    assert a == b and len(set(a)) == 4
    with pytest.raises(ValueError, match="transfer.selection='best' is not allowed: must be one of random"):
        build_strategy("best")


def test_shape_mismatch_is_rejected_with_one_line():
    source = TwoLayerReLUCNN(6, 10)
    target = TwoLayerReLUCNN(7, 10)
    with pytest.raises(ValueError, match="equal weight shapes"):
        transfer_parameters(source, target, 0.5)


def test_callback_transfers_before_the_first_step():
    source, target, fresh = make_pair()
    x, y = torch.randn(4, 2, 6), torch.tensor([1.0, -1.0, 1.0, -1.0])
    callback = ParameterTransfer(Transfer(source, 0.5, "random", 11))
    module = FullBatchGD(target, lr=0.0)  # lr 0: the weights after fit are the weights after transfer
    trainer = pl.Trainer(
        max_steps=1,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[callback],
    )
    trainer.fit(module, datamodule=FullBatchDataModule(x, y, steps=1))
    assert [row.copied for row in callback.plan] == [5, 5]
    expected = fresh.clone()
    for j, row in enumerate(callback.plan):
        expected[j, row.indices] = source.weight[j, row.indices].detach()
    assert torch.equal(target.weight.detach(), expected)

"""Keeping a factorized layer dense where it is not faster (nnsvd.lowrank.inference)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnsvd.lowrank import compress_model
from nnsvd.lowrank.inference import dense_from_factors, keep_dense_where_slower, time_layer
from nnsvd.lowrank.layers import LowRankLinear, SymmetricLowRankLinear

pytestmark = pytest.mark.usefixtures("single_thread")


def model():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(40, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    compress_model(net, ["0", "2", "4"], {"0": 4, "2": 30, "4": 3})
    return net


def test_the_dense_product_computes_what_the_factors_do():
    torch.manual_seed(1)
    x = torch.randn(5, 12)
    for layer in (LowRankLinear(12, 7, 3), SymmetricLowRankLinear(12, 4)):
        dense = dense_from_factors(layer)
        assert isinstance(dense, nn.Linear) and dense.weight.shape == (layer.out_features, layer.in_features)
        torch.testing.assert_close(dense(x), layer(x), rtol=1e-5, atol=1e-6)


def test_layers_the_timer_finds_slower_are_put_back_dense_and_reported():
    net = model()
    x = torch.randn(3, 40)
    before = net(x)

    def timer(layer, tokens, repeats):  # the factors are "slower" where they save less than half the weights
        assert tokens == 1 and repeats == 5
        slow = layer.rank * (layer.in_features + layer.out_features) > layer.in_features * layer.out_features / 2
        return (1.0, 2.0) if slow else (2.0, 1.0)

    kept = keep_dense_where_slower(net, tokens=1, repeats=5, timer=timer)
    assert list(kept) == ["2"] and kept["2"] == {"dense_us": 1e6, "factorized_us": 2e6}  # 30·128 > 64·64/2
    assert isinstance(net[2], nn.Linear) and isinstance(net[0], LowRankLinear) and isinstance(net[4], LowRankLinear)
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)


def test_with_the_real_timer_the_function_is_unchanged_whatever_is_kept():
    net = model()
    x = torch.randn(3, 40)
    before = net(x)
    dense_s, factorized_s = time_layer(net[2], tokens=1, repeats=3)
    assert dense_s > 0 and factorized_s > 0
    kept = keep_dense_where_slower(net, tokens=1, repeats=3)
    assert all(isinstance(net.get_submodule(name), nn.Linear) for name in kept)
    torch.testing.assert_close(net(x), before, rtol=1e-5, atol=1e-6)

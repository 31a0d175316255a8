"""Exact counts of parameters and MACs, dense versus factorized."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from nnsvd import (
    LowRankLinear,
    SymmetricLowRankLinear,
    compress_model,
    count_macs,
    count_params,
    lowrank_from_scratch,
    param_summary,
)
from nnsvd.lowrank.counting import layer_macs

pytestmark = pytest.mark.usefixtures("single_thread")


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(20, 16),
        nn.ReLU(),
        nn.Linear(16, 16),
        nn.ReLU(),
        nn.Linear(16, 4),
        nn.ReLU(),
        nn.Linear(4, 3),  # stays dense
    )


def compressed_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = mlp()
    compress_model(model, ["0", "4"], rank={"0": 3, "4": 2})
    compress_model(model, ["2"], rank=5, symmetric=True)
    return model


def test_dense_counts():
    model = mlp()
    assert count_params(model) == (20 * 16 + 16) + (16 * 16 + 16) + (16 * 4 + 4) + (4 * 3 + 3) == 691
    assert count_macs(model) == 20 * 16 + 16 * 16 + 16 * 4 + 4 * 3 == 652
    s = param_summary(model)
    assert (s.total, s.dense_total, s.targets, s.dense_targets) == (691, 691, 0, 0)
    assert (s.macs, s.dense_macs) == (652, 652)
    assert s.compression_ratio == 1.0 and s.target_compression_ratio == 1.0


def test_counts_of_compressed_model():
    model = compressed_mlp()
    assert isinstance(model[0], LowRankLinear) and isinstance(model[2], SymmetricLowRankLinear)
    assert isinstance(model[4], LowRankLinear) and isinstance(model[6], nn.Linear)

    assert layer_macs(model[0]) == 3 * (20 + 16)
    assert layer_macs(model[2]) == 2 * 16 * 5
    assert layer_macs(model[4]) == 2 * (16 + 4)
    assert layer_macs(model[6]) == 4 * 3

    plain0 = 3 * (20 + 16) + 16  # 124
    sym2 = 16 * 5 + 16  # 96
    plain4 = 2 * (16 + 4) + 4  # 44
    dense6 = 4 * 3 + 3  # 15
    assert count_params(model) == plain0 + sym2 + plain4 + dense6 == 279
    assert count_macs(model) == 108 + 160 + 40 + 12 == 320

    s = param_summary(model)
    assert s.total == 279
    assert s.targets == plain0 + sym2 + plain4 == 264
    assert s.dense_targets == 336 + 272 + 68 == 676
    assert s.dense_total == 691 == count_params(mlp())
    assert s.macs == 320
    assert s.dense_macs == 652 == count_macs(mlp())
    assert s.compression_ratio == s.total / s.dense_total == 279 / 691
    assert s.target_compression_ratio == 264 / 676
    d = s.to_dict()
    assert d["compression_ratio"] == 279 / 691 and d["targets"] == 264 and d["dense_macs"] == 652


def test_counts_without_bias_and_from_scratch():
    model = nn.Sequential(nn.Linear(30, 10, bias=False), nn.Linear(10, 10, bias=False))
    lowrank_from_scratch(model, ["0"], rank=2)
    lowrank_from_scratch(model, ["1"], rank=4, symmetric=True)
    s = param_summary(model)
    assert s.total == 2 * 40 + 10 * 4 == 120
    assert s.dense_total == 300 + 100
    assert s.macs == 2 * 40 + 2 * 10 * 4
    assert s.dense_macs == 400


def test_conv1d_counts():
    torch.manual_seed(0)
    model = nn.Sequential(Conv1D(nf=12, nx=8), nn.ReLU(), Conv1D(nf=5, nx=12))
    assert count_params(model) == (8 * 12 + 12) + (12 * 5 + 5)
    assert count_macs(model) == 8 * 12 + 12 * 5
    compress_model(model, ["0"], rank=2)
    s = param_summary(model)
    assert s.total == 2 * (8 + 12) + 12 + 65
    assert s.dense_total == 108 + 65
    assert s.macs == 2 * 20 + 60 and s.dense_macs == 96 + 60


def test_tied_parameters_count_once():
    # two dense layers sharing a weight
    a, b = nn.Linear(8, 8), nn.Linear(8, 8)
    b.weight = a.weight
    tied = nn.Sequential(a, b)
    assert count_params(tied) == 64 + 8 + 8

    # one factorized layer registered under two names (applied twice)
    torch.manual_seed(0)
    shared = LowRankLinear(10, 10, 2)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    assert count_params(model) == 2 * 20 + 10
    s = param_summary(model)
    assert s.total == 50 and s.targets == 50
    assert s.dense_targets == 110 and s.dense_total == 110

    # two factorized layers sharing one factor
    l1, l2 = LowRankLinear(10, 6, 2), LowRankLinear(10, 6, 2)
    l2.B = l1.B
    model = nn.Sequential(l1, nn.ReLU(), nn.Linear(6, 10), l2)
    own = 2 * 6 + 6  # A and bias of each layer
    assert count_params(model) == 2 * own + 2 * 10 + (6 * 10 + 10)
    s = param_summary(model)
    assert s.targets == 2 * own + 2 * 10
    assert s.dense_targets == 2 * (60 + 6)
    assert s.dense_total == 2 * 66 + 70
    assert s.compression_ratio == s.total / s.dense_total

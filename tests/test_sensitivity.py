"""Sensitivity measurement: one factorization per layer serves every rank, and the shortcut's batches."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnsvd.compression import measurement_batches
from nnsvd.lowrank import collect_statistics, compress_model
from nnsvd.lowrank.allocation import target_shapes
from nnsvd.lowrank.sensitivity import mean_loss, measure_sensitivity


def loss_fn(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


@pytest.mark.parametrize("method", ["svd", "whiten", "asvd"])
def test_every_rank_measures_as_a_factorization_at_that_rank_would(method):
    """Truncating the largest rank's factors gives the loss of factorizing at each smaller rank."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 24), nn.ReLU(), nn.Linear(24, 10)).double()
    batches = [(torch.randn(64, 20, dtype=torch.float64), torch.randint(0, 10, (64,))) for _ in range(2)]
    shapes = target_shapes(model, ["0", "2"])
    stats = None if method == "svd" else collect_statistics(model, list(shapes), batches, loss_fn)
    before = copy.deepcopy(model.state_dict())
    measured = measure_sensitivity(model, shapes, batches, loss_fn, method=method, calibration=stats,
                                   ratios=(0.2, 0.5, 0.8))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # every layer put back
    base = mean_loss(model, batches, loss_fn)
    for name, per in measured.items():
        assert len(per) == 3
        for rank, increase in per.items():
            alone = copy.deepcopy(model)
            context = {} if stats is None else {"calibration": {name: stats[name]}}
            compress_model(alone, [name], rank, method=method, **context)
            assert increase == pytest.approx(mean_loss(alone, batches, loss_fn) - base, abs=1e-9)


def test_measurement_batches_take_the_first_samples_and_tokens():
    sequences = [torch.arange(i * 40, (i + 1) * 40).reshape(4, 10) for i in range(3)]  # 12 sequences of 10
    cut = measurement_batches(sequences, 6, 3)
    assert [b.shape for b in cut] == [(4, 3), (2, 3)] and torch.equal(cut[1], sequences[1][:2, :3])
    assert all(torch.equal(a, b) for a, b in zip(measurement_batches(sequences, None, None), sequences, strict=True))
    assert [b.shape for b in measurement_batches(sequences, None, 5)] == [(4, 5)] * 3
    images = [(torch.zeros(8, 3), torch.zeros(8)), (torch.ones(8, 3), torch.ones(8))]
    (first,) = measurement_batches(images, 5, None)
    assert first[0].shape == (5, 3) and first[1].shape == (5,)

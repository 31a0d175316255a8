"""Sensitivity measurement: one factorization per layer serves every rank, and the shortcut's batches."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnsvd.lowrank import collect_statistics, compress_model
from nnsvd.lowrank.allocation import target_shapes
from nnsvd.lowrank.sensitivity import mean_loss, measure_sensitivity
from nnsvd.run.compression import measurement_batches


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


def three_blocks(family: str):
    """A tiny random causal LM of the family with three decoder blocks."""
    from test_blockwise import CONFIGS
    from transformers import AutoModelForCausalLM

    config = CONFIGS[family]().to_dict()
    config.update({"n_layer": 3} if family == "gpt2" else {"num_hidden_layers": 3})
    config.pop("layer_types", None)  # per-layer attention types, sized for the original depth
    config = type(CONFIGS[family]()).from_dict(config)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "opt", "gpt_neox", "gpt2"])
def test_measuring_from_each_block_up_gives_the_whole_passes_figures(family, caplog):
    """blocks=…: a layer of block k is measured with blocks 0…k−1 skipped (block k fed its cached dense
    input); the loss increases equal those of whole forward passes, on every family."""
    from test_blockwise import BLOCKS, targets

    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 96, (2, 12), generator=g), torch.randint(0, 96, (1, 12), generator=g)]
    model = three_blocks(family)
    shapes = target_shapes(model, targets(family))
    stats = collect_statistics(model, list(shapes), batches, lm_loss)
    kwargs = {"method": "whiten", "calibration": stats, "ratios": (0.3, 0.7)}
    whole = measure_sensitivity(model, shapes, batches, lm_loss, **kwargs)
    before = copy.deepcopy(model.state_dict())
    by_block = measure_sensitivity(model, shapes, batches, lm_loss, blocks=BLOCKS[family], **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # blocks and layers put back
    assert len(model.get_submodule(BLOCKS[family])) == 3
    assert list(by_block) == list(whole)
    for name in whole:
        assert by_block[name] == pytest.approx(whole[name], rel=1e-5, abs=1e-7), name
    assert "differs from the whole forward pass" not in caplog.text


def test_a_forward_pass_that_reads_its_blocks_by_position_falls_back_to_whole_passes(caplog):
    """Where the dense loss from a block up is not the whole pass's, the rest is measured whole."""
    from test_blockwise import targets

    batches = [torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))]
    model = three_blocks("llama")

    def counting_loss(m, batch):  # depends on how many blocks the model holds: the shortcut changes it
        return lm_loss(m, batch) + 0.01 * len(m.model.layers)

    shapes = target_shapes(model, targets("llama"))
    whole = measure_sensitivity(model, shapes, batches, counting_loss, method="svd", ratios=(0.5,))
    by_block = measure_sensitivity(model, shapes, batches, counting_loss, method="svd", ratios=(0.5,),
                                   blocks="model.layers")
    assert "the dense loss from block 1 up" in caplog.text and "measuring the remaining layers" in caplog.text
    for name in whole:
        assert by_block[name] == pytest.approx(whole[name], rel=1e-5, abs=1e-7), name

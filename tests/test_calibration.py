"""Calibration statistics (nnsvd.lowrank.calibration) and calibrated compression, on small models."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel

from nnsvd.lowrank import (
    collect_statistics,
    compress_model,
    compress_with_calibration,
    resolve_factorizer,
    sequential_stages,
)
from nnsvd.models.mlp import MLP

pytestmark = pytest.mark.usefixtures("single_thread")


def classification_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


@pytest.fixture
def mlp_and_batches():
    torch.manual_seed(0)
    model = MLP(in_features=20, hidden=16, num_classes=5, dropout=0.5)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 20, generator=g), torch.randint(0, 5, (n,), generator=g)) for n in (7, 9, 4)]
    return model, batches


def test_statistics_are_the_exact_gram_abs_mean_and_count(mlp_and_batches):
    model, batches = mlp_and_batches
    model.train()  # collection runs in eval mode (no dropout) and restores the mode
    stats = collect_statistics(model, ["l1", "l2"], batches, classification_loss)
    assert model.training
    X1 = torch.cat([x for x, _ in batches]).double()
    model.eval()
    X2 = torch.relu(model.l1(torch.cat([x for x, _ in batches]))).detach().double()
    for name, X in (("l1", X1), ("l2", X2)):
        s = stats[name]
        assert s.tokens == 20 and s.gram.dtype == torch.float64
        torch.testing.assert_close(s.gram, X.T @ X, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(s.mean_abs, X.abs().mean(0), rtol=1e-6, atol=1e-7)
        assert s.fisher is None


def test_fisher_is_the_sum_of_squared_batch_gradients_per_output_row(mlp_and_batches):
    model, batches = mlp_and_batches
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    stats = collect_statistics(model, ["l1", "l2"], batches, classification_loss, fisher=True)
    expected = {"l1": torch.zeros(16, dtype=torch.float64), "l2": torch.zeros(16, dtype=torch.float64)}
    ref = copy.deepcopy(model).eval()
    for batch in batches:
        ref.zero_grad()
        classification_loss(ref, batch).backward()
        for name in expected:
            expected[name] += ref.get_submodule(name).weight.grad.double().square().sum(1)
    for name in expected:
        torch.testing.assert_close(stats[name].fisher, expected[name], rtol=1e-5, atol=1e-12)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == frozen
    assert all(p.grad is None for p in model.parameters())


def test_lm_statistics_flatten_tokens_and_handle_conv1d():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=32, vocab_size=50))
    batches = [torch.randint(0, 50, (3, 10)), torch.randint(0, 50, (2, 10))]
    name = "transformer.h.0.mlp.c_proj"
    stats = collect_statistics(model, [name, "transformer.h.0.attn.c_attn"], batches, lm_loss, fisher=True)
    seen = []
    handle = model.get_submodule(name).register_forward_hook(lambda m, a, o: seen.append(a[0].detach()))
    with torch.no_grad():
        for batch in batches:
            model.eval()(input_ids=batch)
    handle.remove()
    X = torch.cat([x.reshape(-1, 64) for x in seen]).double()
    assert stats[name].tokens == 50 and stats[name].gram.shape == (64, 64)
    torch.testing.assert_close(stats[name].gram, X.T @ X, rtol=1e-5, atol=1e-5)
    assert stats[name].fisher.shape == (16,)  # out rows of the out×in orientation (Conv1D stores in×out)
    assert stats["transformer.h.0.attn.c_attn"].fisher.shape == (48,)
    assert (stats[name].fisher > 0).all()


def test_sequential_stages_follow_blocks_and_layers():
    assert sequential_stages(["l1", "l2"]) == [["l1"], ["l2"]]
    names = ["transformer.h.0.attn.c_attn", "transformer.h.0.mlp.c_fc", "transformer.h.1.attn.c_attn",
             "transformer.h.10.mlp.c_proj"]
    assert sequential_stages(names) == [names[:2], [names[2]], [names[3]]]
    assert sequential_stages(["model.layers.3.self_attn.q_proj", "model.layers.3.mlp.up_proj"]) == [
        ["model.layers.3.self_attn.q_proj", "model.layers.3.mlp.up_proj"]]


@pytest.mark.parametrize("sequential", [False, True])
def test_sequential_calibration_feeds_l2_the_compressed_l1_outputs(mlp_and_batches, sequential):
    model, batches = mlp_and_batches
    dense = copy.deepcopy(model).eval()
    X = torch.cat([x for x, _ in batches])
    grams = {}
    method = resolve_factorizer("whiten", damp=0.01)

    def spy(W, rank, *, calibration, **kw):
        grams[W.shape] = calibration.gram.clone()
        return method(W, rank, calibration=calibration, **kw)

    compress_with_calibration(model, ["l2", "l1"], 3, batches=batches, loss_fn=classification_loss,
                              method=spy, sequential=sequential)
    model.eval()
    l1_out = torch.relu((model if sequential else dense).l1(X)).detach().double()
    torch.testing.assert_close(grams[(16, 16)], l1_out.T @ l1_out, rtol=1e-6, atol=1e-5)
    other = torch.relu((dense if sequential else model).l1(X)).detach().double()
    assert not torch.allclose(grams[(16, 16)], other.T @ other, rtol=1e-3)


def test_calibrated_compression_equals_compress_model_on_collected_stats(mlp_and_batches):
    model, batches = mlp_and_batches
    twin = copy.deepcopy(model)
    method = resolve_factorizer("asvd", alpha=0.5)
    report = compress_with_calibration(model, ["l1", "l2"], 4, batches=batches, loss_fn=classification_loss,
                                       method=method)
    stats = collect_statistics(twin, ["l1", "l2"], batches, classification_loss)
    compress_model(twin, ["l1", "l2"], 4, method=method, calibration=stats)
    for name in ("l1", "l2"):
        assert torch.equal(model.get_submodule(name).A, twin.get_submodule(name).A)
    assert [layer.calib_tokens for layer in report.layers] == [20, 20]

"""Block-wise reconstruction (compress.update=block), the statistics store and the loss allocation,
on tiny random models (nnsvd.lowrank.blockwise, stats_store, allocation)."""

from __future__ import annotations

import pytest
import torch
from test_blockwise import LEAVES, build, factors, lm_loss, targets
from transformers.cache_utils import Cache

from nnsvd.lowrank import (
    BlockUpdate,
    StatisticsStore,
    StatisticsStoreError,
    compress_blockwise,
    compress_model,
    dense_block_statistics,
    loss_allocation,
    resolve_factorizer,
    target_shapes,
)
from nnsvd.lowrank.allocation import budget, kept, matrix_type, uniform_ranks
from nnsvd.lowrank.methods import spectrum

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 96, (2, 16), generator=g) for _ in range(4)]


def names_of(report):
    return [layer.name for layer in report.layers]


def same_factors(a, b, names):
    fa, fb = factors(a, names), factors(b, names)
    return all(torch.equal(fa[n][0], fb[n][0]) and torch.equal(fa[n][1], fb[n][1]) for n in names)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@pytest.mark.parametrize("sequential", [False, True])
def test_zero_update_steps_equal_the_closed_form_bit_for_bit(family, sequential, batches):
    closed, updated = build(family), build(family)
    method = resolve_factorizer("whiten")
    a = compress_blockwise(closed, targets(family), 3, batches=batches, loss_fn=lm_loss, method=method,
                           sequential=sequential)
    b = compress_blockwise(updated, targets(family), 3, batches=batches, loss_fn=lm_loss, method=method,
                           sequential=sequential, update=BlockUpdate(steps=0))
    assert names_of(a) == names_of(b) and same_factors(closed, updated, names_of(a))
    assert [x.rel_data_error for x in a.layers] == [x.rel_data_error for x in b.layers]
    assert len(b.blocks) == 2 and all(r["best_step"] == 0 and r["holdout_start"] > 0 for r in b.blocks)


def block_outputs(model, batch):
    """Every decoder block's output on ``batch`` (all but the last: Hugging Face's last hidden state is normed)."""
    with torch.no_grad():
        return model(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states[1:-1]


@pytest.mark.parametrize("lr", [3e-2, 1.0])  # 1.0 diverges: the best iterate is still the closed form or better
def test_the_update_never_ends_worse_on_held_out_tokens_and_reports_the_true_error(lr, batches):
    dense, model = build("llama"), build("llama")
    update = BlockUpdate(steps=12, lr=lr, holdout=0.25, eval_every=3)
    report = compress_blockwise(model, targets("llama"), 3, batches=batches, loss_fn=lm_loss,
                                method=resolve_factorizer("whiten"), sequential=True, update=update)
    assert [r["block"] for r in report.blocks] == [0, 1]
    for r in report.blocks:
        assert r["holdout_best"] <= r["holdout_start"] and r["steps"] == 12
        assert r["best_step"] in (0, 3, 6, 9, 12) and r["train_first"] is not None
    # the recorded held-out error of block 0 is the compressed model's real block-0 output error on the
    # held-out batch (the last of four), computed here independently through the whole model
    held = batches[-1]
    (dense_out,), (comp_out,) = block_outputs(dense, held), block_outputs(model, held)
    true = float((comp_out.double() - dense_out.double()).square().sum() / dense_out.double().square().sum())
    assert report.blocks[0]["holdout_best"] == pytest.approx(true, rel=1e-6)
    assert all(p.requires_grad for p in model.parameters())  # restored after training the factors alone


def test_a_useful_update_lowers_the_held_out_error(batches):
    """With all four batches the same data, held-out equals training: Adam must then improve on the closed form."""
    same = [batches[0]] * 4
    model = build("llama")
    report = compress_blockwise(model, targets("llama"), 2, batches=same, loss_fn=lm_loss,
                                method=resolve_factorizer("whiten"), sequential=True,
                                update=BlockUpdate(steps=20, lr=1e-2, eval_every=5))
    for r in report.blocks:
        assert r["holdout_best"] < 0.9 * r["holdout_start"] and r["best_step"] > 0


def test_block_calls_carry_no_kv_cache_between_batches(batches):
    """Every attention call while calibrating and updating gets no cache, with the model's use_cache on."""
    model = build("llama")
    assert model.config.use_cache is True
    seen = []

    def spy(module, args, kwargs):  # the cache's keyword differs across transformers releases: look at the values
        seen.append(next((v for v in [*args, *kwargs.values()] if isinstance(v, Cache)), None))

    handles = [block.self_attn.register_forward_pre_hook(spy, with_kwargs=True) for block in model.model.layers]
    try:
        compress_blockwise(model, targets("llama"), 3, batches=batches, loss_fn=lm_loss,
                           method=resolve_factorizer("whiten"), sequential=True,
                           update=BlockUpdate(steps=4, lr=1e-3, eval_every=2))
    finally:
        for h in handles:
            h.remove()
    assert len(seen) > 2 * 4 * 4 and all(cache is None for cache in seen)
    assert model.config.use_cache is True
    # and the check can fail: a real forward with the cache on hands the attention a cache object
    seen.clear()
    handles = [block.self_attn.register_forward_pre_hook(spy, with_kwargs=True) for block in model.model.layers]
    try:
        with torch.no_grad():
            model(input_ids=batches[0], use_cache=True)
    finally:
        for h in handles:
            h.remove()
    assert any(cache is not None for cache in seen)


def test_the_update_needs_a_held_out_batch(batches):
    with pytest.raises(ValueError, match="needs ≥ 2"):
        compress_blockwise(build("llama"), targets("llama"), 3, batches=batches[:1], loss_fn=lm_loss,
                           method=resolve_factorizer("whiten"), update=BlockUpdate(steps=2))


def test_the_memory_estimate_covers_both_streams(batches):
    a = compress_blockwise(build("llama"), targets("llama"), 3, batches=batches, loss_fn=lm_loss,
                           method=resolve_factorizer("whiten"), sequential=True)
    b = compress_blockwise(build("llama"), targets("llama"), 3, batches=batches, loss_fn=lm_loss,
                           method=resolve_factorizer("whiten"), sequential=True, update=BlockUpdate(steps=1))
    hidden = sum(x.numel() for x in batches) * 32 * 4  # one float32 hidden vector of 32 per token
    assert b.memory_estimate - a.memory_estimate >= 2 * hidden


# ------------------------------------------------------------------------ the statistics store


@pytest.mark.parametrize("method", ["whiten", "fwsvd", "asvd"])
def test_stored_statistics_give_the_same_factors_without_a_forward_pass(method, batches, tmp_path):
    store = StatisticsStore(tmp_path / "stats")
    fisher = method == "fwsvd"
    cold, warm, fresh = build("llama"), build("llama"), build("llama")
    factorizer = resolve_factorizer(method)
    a = compress_blockwise(cold, targets("llama"), 3, batches=batches, loss_fn=lm_loss, method=factorizer,
                           fisher=fisher, store=store)
    assert store.reads == 0 and len(list((tmp_path / "stats").glob("block*.safetensors"))) == 2
    assert (tmp_path / "stats" / "fisher.safetensors").is_file() is fisher
    calls = []

    def counted(model, batch):
        calls.append(1)
        return lm_loss(model, batch)

    b = compress_blockwise(warm, targets("llama"), 3, batches=batches, loss_fn=counted, method=factorizer,
                           fisher=fisher, store=StatisticsStore(tmp_path / "stats"))
    assert calls == []  # every block's statistics (and the Fisher) from the store: not one forward pass
    c = compress_blockwise(fresh, targets("llama"), 3, batches=batches, loss_fn=lm_loss, method=factorizer,
                           fisher=fisher)
    names = names_of(a)
    assert names == names_of(b) == names_of(c) and len(names) == 2 * len(LEAVES["llama"])
    assert same_factors(cold, warm, names) and same_factors(cold, fresh, names)
    assert [x.rel_data_error for x in a.layers] == [x.rel_data_error for x in b.layers]


def test_allocation_statistics_are_the_block_by_block_ones_and_are_stored(batches, tmp_path):
    model = build("llama")
    names = list(target_shapes(model, targets("llama")))
    store = StatisticsStore(tmp_path / "s")
    first = dense_block_statistics(model, names, batches, lm_loss, store=store)
    again = dense_block_statistics(model, names, batches, lm_loss, store=StatisticsStore(tmp_path / "s"))
    assert list(first) == list(again) == names
    for name in names:
        assert torch.equal(first[name].gram, again[name].gram) and first[name].tokens == again[name].tokens == 4 * 2 * 16
    q, k = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"
    assert again[q].inputs is again[k].inputs  # a shared input comes back shared
    # compressing from them equals compressing block by block
    twin = build("llama")
    compress_model(model, names, 3, method=resolve_factorizer("whiten"), calibration=first)
    compress_blockwise(twin, targets("llama"), 3, batches=batches, loss_fn=lm_loss, method=resolve_factorizer("whiten"))
    assert same_factors(model, twin, names)


def test_a_corrupt_store_file_fails_with_what_to_do(batches, tmp_path):
    store = StatisticsStore(tmp_path / "s")
    compress_blockwise(build("llama"), targets("llama"), 3, batches=batches, loss_fn=lm_loss,
                       method=resolve_factorizer("whiten"), store=store)
    (tmp_path / "s" / "block1.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StatisticsStoreError, match="cannot be read .*delete that folder"):
        compress_blockwise(build("llama"), targets("llama"), 3, batches=batches, loss_fn=lm_loss,
                           method=resolve_factorizer("whiten"), store=StatisticsStore(tmp_path / "s"))


# ------------------------------------------------------------------------ the loss allocation


def test_matrix_types_star_the_block_index():
    assert matrix_type("model.layers.12.self_attn.q_proj") == "model.layers.*.self_attn.q_proj"
    assert matrix_type("transformer.h.3.attn.c_attn") == "transformer.h.*.attn.c_attn"
    assert matrix_type("l1") == "l1"


@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
def test_loss_allocation_is_svd_llm_v2s_split_within_each_type_budget(ratio, batches):
    """R_l = |G|·ratio·(1/log L_l)/Σ_G 1/log L_j within each matrix type, L_l the whitened truncation loss at
    the uniform rank, computed here independently; every type within its own share of the budget."""
    model = build("llama")
    names = list(target_shapes(model, targets("llama")))
    shapes = target_shapes(model, targets("llama"))
    stats = dense_block_statistics(model, names, batches, lm_loss)
    method = resolve_factorizer("whiten")
    ranks = loss_allocation(model, shapes, ratio, method=method, calibration=stats)
    assert kept(shapes, ranks) <= budget(shapes, ratio)
    uniform = uniform_ranks(shapes, ratio)
    for leaf in LEAVES["llama"]:
        group = {n: s for n, s in shapes.items() if n.endswith(leaf)}
        assert kept(group, ranks) <= budget(group, ratio)  # each type within its own share
        loss = {}
        for n in group:
            sigma = spectrum(model.get_submodule(n).weight, method, stats[n]).double()
            loss[n] = float(sigma[uniform[n]:].square().sum()) ** 0.5
        low = min(loss.values())
        if low <= 2.718281828459045:
            loss = {n: v * 2.718281828459045 / low for n, v in loss.items()}
        inverse = {n: 1 / torch.log(torch.tensor(v, dtype=torch.float64)).item() for n, v in loss.items()}
        mean = sum(inverse.values()) / len(inverse)
        for n, s in group.items():
            share = s.weights * (1 - min(ratio * inverse[n] / mean, 1.0)) / s.step
            assert ranks[n] in (int(share), int(share) - 1) or ranks[n] == s.max_rank, (n, ranks[n], share)
        first, second = sorted(group, key=loss.get)
        assert ranks[second] >= ranks[first]  # the larger loss keeps at least as much

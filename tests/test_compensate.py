"""Alternating closed-form updates of A and B (nnsvd.lowrank.compensate) and compress.update=alternating
on tiny random models (nnsvd.lowrank.blockwise.compensate_block)."""

from __future__ import annotations

import pytest
import torch
from test_blockwise import build, factors, lm_loss, targets

from nnsvd.lowrank import BlockUpdate, compress_blockwise, resolve_factorizer
from nnsvd.lowrank.compensate import PairedGrams, alternate, objective, ridge, step_a, step_b
from nnsvd.lowrank.weighted import weighted_truncation

pytestmark = pytest.mark.usefixtures("single_thread")


def problem(seed=0, out=12, inp=10, tokens=200, noise=0.3):
    """A dense weight, dense inputs X and compressed-stream inputs X̃ = X + noise, their Grams."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out, inp, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, inp, generator=g, dtype=torch.float64) @ torch.randn(inp, inp, generator=g,
                                                                                  dtype=torch.float64)
    x_tilde = x + noise * torch.randn(tokens, inp, generator=g, dtype=torch.float64)
    grams = PairedGrams.zeros(inp)
    grams.add(x[:120], x_tilde[:120])
    grams.add(x[120:], x_tilde[120:])  # two batches: sums, like one
    return w, x, x_tilde, grams


def whitened(w, grams, rank):
    """The whitened truncation (SVD-LLM) of W for the compressed stream's Gram: the start of the update."""
    f = weighted_truncation(w, rank, right=torch.linalg.cholesky(grams.compressed))
    return f.A, f.B


def test_grams_are_the_sums_over_tokens_and_the_objective_is_the_output_error():
    w, x, x_tilde, grams = problem()
    torch.testing.assert_close(grams.dense, x.T @ x)
    torch.testing.assert_close(grams.cross, x.T @ x_tilde)
    torch.testing.assert_close(grams.compressed, x_tilde.T @ x_tilde)
    m = torch.randn(12, 10, dtype=torch.float64)
    direct = float((x @ w.T - x_tilde @ m.T).square().sum())
    assert objective(w, m, grams) == pytest.approx(direct, rel=1e-10)


def test_each_half_step_is_the_exact_minimizer_and_the_objective_never_rises():
    w, _, _, grams = problem()
    a, b = whitened(w, grams, 4)
    lam = ridge(grams, 1e-6)
    values = [objective(w, a @ b, grams, lam)]
    for _ in range(6):
        a = step_a(w, b, grams, lam)
        # a minimizer: any perturbation of A raises f
        for _ in range(3):
            bumped = a + 1e-3 * torch.randn_like(a)
            assert objective(w, bumped @ b, grams, lam) > objective(w, a @ b, grams, lam)
        values.append(objective(w, a @ b, grams, lam))
        b = step_b(w, a, grams, lam)
        for _ in range(3):
            bumped = b + 1e-3 * torch.randn_like(b)
            assert objective(w, a @ bumped, grams, lam) > objective(w, a @ b, grams, lam)
        values.append(objective(w, a @ b, grams, lam))
    assert all(later <= earlier * (1 + 1e-12) for earlier, later in zip(values, values[1:]))
    assert values[-1] < (1 - 1e-3) * values[0]  # the streams differ, so the whitened start is not optimal


def test_with_equal_streams_the_whitened_truncation_is_already_optimal():
    w, x, _, _ = problem()
    grams = PairedGrams.zeros(10)
    grams.add(x, x)
    a, b = whitened(w, grams, 4)
    result = alternate(w, a, b, grams, None, steps=5)
    assert result.train_best == pytest.approx(result.train_start, rel=1e-6)


def test_the_best_held_out_round_is_kept_and_never_worse_than_the_start():
    w, x, x_tilde, _ = problem(tokens=60, noise=1.0)
    train, held = PairedGrams.zeros(10), PairedGrams.zeros(10)
    train.add(x[:30], x_tilde[:30])  # few tokens and much noise: the training optimum overfits
    held.add(x[30:], x_tilde[30:])
    a, b = whitened(w, train, 6)
    result = alternate(w, a, b, train, held, steps=8)
    assert result.holdout_best <= result.holdout_start
    assert result.train_best <= result.train_start
    kept = objective(w, result.a @ result.b, held) / objective(w, torch.zeros_like(w), held)
    assert kept == pytest.approx(result.holdout_best, rel=1e-9)


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(2)
    return [torch.randint(0, 96, (2, 16), generator=g) for _ in range(4)]


def block_outputs(model, batch):
    with torch.no_grad():
        return model(input_ids=batch, output_hidden_states=True, use_cache=False).hidden_states[1:-1]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_zero_rounds_equal_the_closed_form_bit_for_bit(family, batches):
    closed, updated = build(family), build(family)
    method = resolve_factorizer("whiten")
    a = compress_blockwise(closed, targets(family), 3, batches=batches, loss_fn=lm_loss, method=method,
                           sequential=True)
    b = compress_blockwise(updated, targets(family), 3, batches=batches, loss_fn=lm_loss, method=method,
                           sequential=True, update=BlockUpdate(steps=0, kind="alternating"))
    names = [layer.name for layer in a.layers]
    fa, fb = factors(closed, names), factors(updated, names)
    assert all(torch.equal(fa[n][0], fb[n][0]) and torch.equal(fa[n][1], fb[n][1]) for n in names)
    assert all(r["best_step"] == 0 for r in b.blocks)


def test_the_alternating_update_never_ends_a_block_worse_and_reports_the_true_error(batches):
    dense, model = build("llama"), build("llama")
    update = BlockUpdate(steps=4, holdout=0.25, kind="alternating")
    report = compress_blockwise(model, targets("llama"), 3, batches=batches, loss_fn=lm_loss,
                                method=resolve_factorizer("whiten"), sequential=True, update=update)
    assert [r["block"] for r in report.blocks] == [0, 1]
    for r in report.blocks:
        assert r["holdout_best"] <= r["holdout_start"]
        assert len(r["layers"]) == 7 and all(layer["holdout_best"] <= layer["holdout_start"]
                                             for layer in r["layers"].values())
    # block 0's recorded held-out error is the compressed model's real block-0 output error on the held-out batch
    held = batches[-1]
    (dense_out,), (comp_out,) = block_outputs(dense, held), block_outputs(model, held)
    true = float((comp_out.double() - dense_out.double()).square().sum() / dense_out.double().square().sum())
    assert report.blocks[0]["holdout_best"] == pytest.approx(true, rel=1e-6)


def test_the_alternating_update_lowers_the_block_error_where_train_and_held_out_agree(batches):
    """All four batches the same data: held-out equals training, so a gain in the layers' objective shows."""
    same = [batches[0]] * 4
    model = build("llama")
    report = compress_blockwise(model, targets("llama"), 2, batches=same, loss_fn=lm_loss,
                                method=resolve_factorizer("whiten"), sequential=True,
                                update=BlockUpdate(steps=6, kind="alternating"))
    # block 0 sees the same input on both streams: its q/k/v/gate/up start at their optimum; o and down do not
    assert report.blocks[1]["holdout_best"] < report.blocks[1]["holdout_start"]
    assert any(layer["best_step"] > 0 for r in report.blocks for layer in r["layers"].values())

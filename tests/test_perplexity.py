"""Strided sliding-window perplexity against a token-by-token reference."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from nnsvd.training.perplexity import Window, evaluate_perplexity, lm_loss, strided_windows


@pytest.fixture(scope="module")
def model() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=1000)
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def ids() -> torch.Tensor:
    return torch.randint(0, 1000, (157,), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def naive_perplexity(model, ids: torch.Tensor, max_length: int, stride: int) -> tuple[float, int]:
    """(mean NLL, tokens), one forward per token t with exactly the context its window gives it.

    Token t is scored by the first window of the HF loop whose new targets contain it; its
    context is that window's tokens from its begin up to t − 1 (none → not scored).
    """
    n, nll, tokens = ids.numel(), 0.0, 0
    begin_for = {}
    prev_end = 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        for t in range(prev_end, end):
            begin_for[t] = begin
        prev_end = end
        if end == n:
            break
    assert sorted(begin_for) == list(range(n))
    for t in range(1, n):
        begin = begin_for[t]
        if begin == t:
            continue
        logits = model(input_ids=ids[begin:t][None]).logits[0, -1].double()
        nll -= float(torch.log_softmax(logits, -1)[ids[t]])
        tokens += 1
    return nll / tokens, tokens


@pytest.mark.parametrize(
    ("max_length", "stride", "batch_size"),
    [(32, 8, 3), (32, 32, 2), (64, 64, 8), (40, 7, 4), (16, 15, 1)],
)
def test_strided_matches_token_by_token_reference(model, ids, max_length, stride, batch_size):
    assert ids.numel() % stride != 0  # a partial last window is exercised
    got = evaluate_perplexity(model, ids, max_length=max_length, stride=stride, batch_size=batch_size)
    nll, tokens = naive_perplexity(model, ids, max_length, stride)
    assert got["tokens"] == tokens
    assert got["nll"] == pytest.approx(nll, rel=1e-4)
    assert got["ppl"] == pytest.approx(math.exp(nll), rel=1e-4)


def test_token_counts(model, ids):
    n = ids.numel()
    # stride < max_length: every token but the very first is scored exactly once
    assert evaluate_perplexity(model, ids, max_length=32, stride=16)["tokens"] == n - 1
    # disjoint windows: each window's first token has no context
    windows = math.ceil(n / 32)
    assert evaluate_perplexity(model, ids, max_length=32, stride=32)["tokens"] == n - windows
    # defaults: max_length = n_positions = 64, stride = max_length
    assert evaluate_perplexity(model, ids)["tokens"] == n - math.ceil(n / 64)


def test_max_tokens_truncates_the_stream(model, ids):
    got = evaluate_perplexity(model, ids, max_length=32, stride=32, max_tokens=100)
    assert got["tokens"] == 100 - math.ceil(100 / 32)
    assert got == evaluate_perplexity(model, ids[:100], max_length=32, stride=32)
    assert evaluate_perplexity(model, ids, max_length=32, stride=8, max_tokens=70)["tokens"] == 69


def test_token_weighted_not_window_mean(model, ids):
    """A short last window must weigh by its tokens: compare with per-window sums."""
    windows = strided_windows(ids.numel(), 64, 64)
    assert [w.end - w.begin for w in windows] == [64, 64, 29]
    per_window = [evaluate_perplexity(model, ids[w.begin : w.end], max_length=64) for w in windows]
    total = sum(r["nll"] * r["tokens"] for r in per_window) / sum(r["tokens"] for r in per_window)
    assert evaluate_perplexity(model, ids, max_length=64)["nll"] == pytest.approx(total, rel=1e-5)


def test_windows_follow_the_hf_loop():
    windows = strided_windows(10, 4, 2)
    assert windows == [Window(0, 4, 4), Window(2, 6, 2), Window(4, 8, 2), Window(6, 10, 2)]
    assert [w.first_target for w in windows] == [1, 2, 2, 2]
    assert strided_windows(10, 4, 4) == [Window(0, 4, 4), Window(4, 8, 4), Window(8, 10, 2)]
    assert [w.first_target for w in strided_windows(10, 4, 4)] == [1, 1, 1]
    assert strided_windows(9, 4, 3) == [Window(0, 4, 4), Window(3, 7, 3), Window(6, 9, 2)]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"max_length": 32, "stride": 33},
            "eval.stride=33 is out of range: allowed 1 ≤ eval.stride ≤ eval.max_length (32)",
        ),
        ({"max_length": 32, "stride": 0}, "eval.stride=0"),
        ({"max_length": 32, "stride": -4}, "eval.stride=-4"),
        ({"max_length": 65}, "eval.max_length=65 is out of range: allowed 2 ≤ eval.max_length ≤ 64"),
        ({"max_tokens": 1}, "eval.max_tokens=1"),
    ],
)
def test_invalid_settings_name_the_key(model, ids, kwargs, message):
    with pytest.raises(ValueError, match="^" + message.replace("(", r"\(").replace(")", r"\)")) as err:
        evaluate_perplexity(model, ids, **kwargs)
    assert "\n" not in str(err.value)


def test_restores_training_mode(model, ids):
    model.train()
    try:
        evaluate_perplexity(model, ids[:40], max_length=32)
        assert model.training
    finally:
        model.eval()


def test_lm_loss_is_the_mean_next_token_cross_entropy(model, ids):
    batch = ids[:96].view(3, 32)
    with torch.no_grad():
        logits = model(input_ids=batch).logits[:, :-1].double()
        loss = lm_loss(model, batch)
    expected = -torch.log_softmax(logits, -1).gather(-1, batch[:, 1:, None]).mean()
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)

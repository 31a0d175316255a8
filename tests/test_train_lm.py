"""The causal-LM training loop: it learns, is reproducible, logs, stops on request, refuses NaNs."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from nnsvd.lowrank import compress_model
from nnsvd.lowrank.regularizers import orthonormal_penalty
from nnsvd.models.gpt2 import GPT2_TARGETS
from nnsvd.training.language_modeling import DivergenceError, train_causal_lm


def tiny_model(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    return GPT2LMHeadModel(
        GPT2Config(
            n_layer=2, n_embd=32, n_head=2, n_positions=32, vocab_size=64, bos_token_id=63, eos_token_id=63
        )
    )


def blocks() -> torch.Tensor:
    """A learnable stream: an arithmetic progression mod 64, cut into 16-token blocks."""
    start = torch.randint(0, 64, (40, 1), generator=torch.Generator().manual_seed(0))
    return (start + 3 * torch.arange(16)) % 64


KW = {"steps": 30, "batch_size": 8, "lr": 2e-2, "warmup_steps": 5, "weight_decay": 0.1}


def test_loss_decreases_and_history_is_logged():
    model = tiny_model()
    logged = []
    result = train_causal_lm(model, blocks(), **KW, log_fn=lambda m, s: logged.append((s, m)))
    losses = [m["train/loss"] for _, m in logged]
    assert len(logged) == 30 and [s for s, _ in logged] == list(range(1, 31))
    assert losses[-1] < 0.5 * losses[0]
    assert result["steps"] == 30 and not result["interrupted"]
    assert result["final_loss"] == losses[-1]
    assert result["history"] == [{"step": s, **m} for s, m in logged]
    lrs = [m["train/lr"] for _, m in logged]
    assert lrs[0] == 0.0 and lrs[5] == pytest.approx(2e-2) and lrs[-1] < lrs[5]


def test_reproducible_given_seed():
    a, b, c = tiny_model(), tiny_model(), tiny_model()
    ra = train_causal_lm(a, blocks(), **KW, seed=1)
    rb = train_causal_lm(b, blocks(), **KW, seed=1)
    rc = train_causal_lm(c, blocks(), **KW, seed=2)
    assert ra["history"] == rb["history"]
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert ra["final_loss"] != rc["final_loss"]


def test_eval_and_penalty_on_a_compressed_model():
    model = tiny_model()
    compress_model(model, GPT2_TARGETS, rank=4)
    calls = []

    def eval_fn(m):
        calls.append(m.training)
        return 12.5

    result = train_causal_lm(
        model,
        blocks(),
        **{**KW, "steps": 10},
        eval_every=4,
        eval_fn=eval_fn,
        penalty_fn=orthonormal_penalty,
        alpha=0.01,
    )
    evals = [r for r in result["history"] if "val/ppl" in r]
    assert [r["step"] for r in evals] == [4, 8, 10] and result["final_val_ppl"] == 12.5
    penalties = [r["train/penalty"] for r in result["history"] if "train/penalty" in r]
    assert all(p > 0 for p in penalties)
    assert model.training  # back in training mode after each evaluation


def test_should_stop_interrupts():
    ticks = iter(range(100))
    result = train_causal_lm(tiny_model(), blocks(), **KW, should_stop=lambda: next(ticks) >= 3)
    assert result["interrupted"] and result["steps"] == 3
    assert [r["step"] for r in result["history"]] == [1, 2, 3]


def test_divergence_names_the_step_and_the_fix():
    with pytest.raises(DivergenceError, match=r"^training diverged at step 1: .*lower train.lr") as err:
        train_causal_lm(
            tiny_model(), blocks(), **KW, penalty_fn=lambda m: m.lm_head.weight.sum() * math.nan, alpha=1.0
        )
    assert "\n" not in str(err.value)
    with pytest.raises(DivergenceError, match="at step"):
        train_causal_lm(tiny_model(), blocks(), **{**KW, "lr": 1e6, "grad_clip": 0.0})

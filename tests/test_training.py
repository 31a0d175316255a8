"""nnsvd.training: the one loop (fit), its hooks, and exact resume for both recipes."""

from __future__ import annotations

import math
from contextlib import contextmanager

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from nnsvd.errors import DivergenceError
from nnsvd.lowrank import compress_model
from nnsvd.lowrank.regularizers import orthonormal_penalty
from nnsvd.models.gpt2 import GPT2_TARGETS
from nnsvd.models.mlp import MLP
from nnsvd.training import StepRecord, fit, on_step
from nnsvd.training.classification import train_classifier
from nnsvd.training.language_modeling import train_causal_lm

pytestmark = pytest.mark.usefixtures("single_thread")


class Counting:
    """A recipe that trains nothing: unit n logs {"n": n}; it finishes with {"done": True}."""

    unit = "step"
    evaluate = None

    def __init__(self, total: int):
        self.total, self.sessions = total, []

    @contextmanager
    def session(self, model, resume_state):
        self.sessions.append(resume_state)
        yield

    def train_unit(self, model, number):
        yield {"step": number, "n": number}

    def finish(self, model, done):
        yield {"step": done, "done": True}

    def state(self):
        return {"extra": 1}


def test_fit_logs_every_record_then_the_closing_ones():
    logged, seen = [], []
    result = fit(torch.nn.Linear(1, 1), Counting(3), log=logged.append, callbacks=[seen.append])
    assert result.history == logged == [{"step": 1, "n": 1}, {"step": 2, "n": 2}, {"step": 3, "n": 3},
                                        {"step": 3, "done": True}]
    assert [(r.unit, r.number, r.total, r.metrics) for r in seen] == [
        ("step", 1, 3, {"n": 1}), ("step", 2, 3, {"n": 2}), ("step", 3, 3, {"n": 3}), ("step", 3, 3, {"done": True})]
    assert result.epochs == 3 and not result.interrupted and result.resume_state is None


def test_a_stop_before_a_unit_interrupts_and_the_state_continues_it():
    asked = iter(range(10))
    recipe = Counting(5)
    first = fit(torch.nn.Linear(1, 1), recipe, should_stop=lambda: next(asked) >= 2)
    assert first.interrupted and first.epochs == 2
    assert first.history == [{"step": 1, "n": 1}, {"step": 2, "n": 2}]  # no closing record
    assert first.resume_state == {"step": 2, "history": first.history, "extra": 1}
    second = fit(torch.nn.Linear(1, 1), recipe, resume_state=first.resume_state)
    assert recipe.sessions == [None, first.resume_state]
    assert second.history == fit(torch.nn.Linear(1, 1), Counting(5)).history


def test_on_step_reaches_every_fit_inside_its_block_only():
    seen: list[StepRecord] = []
    with on_step(seen.append):
        fit(torch.nn.Linear(1, 1), Counting(2))
    fit(torch.nn.Linear(1, 1), Counting(2))
    assert [r.number for r in seen] == [1, 2, 2]


# ------------------------------------------------------------- the two recipes: exact resume


def mlp() -> MLP:
    torch.manual_seed(0)
    model = MLP(in_features=12, hidden=16, num_classes=4, dropout=0.2)  # dropout: resume must keep the RNG
    compress_model(model, ["l1", "l2"], rank=3)
    return model


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16, vocab_size=32, bos_token_id=31,
                        eos_token_id=31, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)
    model = GPT2LMHeadModel(config)
    compress_model(model, GPT2_TARGETS, rank=3)
    return model


_g = torch.Generator().manual_seed(1)
X, Y = torch.randn(200, 12, generator=_g), torch.randint(0, 4, (200,), generator=_g)
BLOCKS = torch.randint(0, 32, (20, 8), generator=_g)


def classify(model, **kw):
    return train_classifier(model, X, Y, epochs=4, batch_size=32, lr=1e-2, alpha=0.01, seed=3,
                            evaluate=lambda m: {"val/acc": float(m(X).argmax(1).eq(Y).float().mean())}, **kw)


def language_model(model, **kw):
    def eval_fn(m):
        with torch.no_grad():
            return math.exp(float(m.eval()(input_ids=BLOCKS[:4], labels=BLOCKS[:4]).loss))

    return train_causal_lm(model, BLOCKS, steps=9, batch_size=4, lr=1e-2, warmup_steps=2, grad_accum=2,
                           eval_every=4, eval_fn=eval_fn, penalty_fn=orthonormal_penalty, alpha=0.01, log_every=2,
                           seed=5, **kw)


def stop_after(n: int):
    asked = iter(range(100))
    return lambda: next(asked) >= n


def same_weights(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


def test_a_classifier_resumed_equals_one_trained_straight():
    torch.manual_seed(7)
    straight = mlp()
    whole = classify(straight)
    torch.manual_seed(7)
    resumed = mlp()
    part = classify(resumed, should_stop=stop_after(2))
    assert part.interrupted and part.epochs == 2 and len(part.history) == 2
    torch.manual_seed(123)  # a new process: the saved RNG state, not this seed, continues it
    rest = classify(resumed, resume_state=part.resume_state)
    assert rest.history == whole.history and same_weights(resumed, straight)


def test_a_language_model_resumed_equals_one_trained_straight():
    straight = gpt2()
    whole = language_model(straight)
    resumed = gpt2()
    part = language_model(resumed, should_stop=stop_after(5))
    assert part["interrupted"] and part["steps"] == 5
    rest = language_model(resumed, resume_state=part["resume_state"])
    assert rest["history"] == whole["history"] and same_weights(resumed, straight)
    assert rest["final_val_ppl"] == whole["final_val_ppl"] and rest["final_loss"] == whole["final_loss"]


def test_callbacks_see_the_validation_and_can_apply_it_to_another_model():
    rows = []

    def probe(record: StepRecord) -> None:
        if "val/ppl" in record.metrics:
            again = record.evaluate(record.model)["val/ppl"]
            rows.append((record.number, record.metrics["val/ppl"], again))
            record.model.train()

    language_model(gpt2(), callbacks=[probe])
    assert [n for n, _, _ in rows] == [4, 8, 9]
    assert all(logged == again for _, logged, again in rows)


def test_a_diverging_classifier_names_the_epoch_step_and_fix():
    with pytest.raises(DivergenceError, match=r"^training diverged at epoch 1 step \d+/7: .*lower train.lr"):
        train_classifier(mlp(), X, Y, epochs=1, batch_size=32, lr=1e30)

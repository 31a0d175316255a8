"""Fine-tuning a causal language model on packed token blocks: AdamW, warmup + cosine, steps of sampled blocks.

No Hydra, no W&B: logging, evaluation, the factor penalty and interruption come in as callables.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from nnsvd.errors import DivergenceError
from nnsvd.training.loop import (
    StepCallback,
    TrainResult,
    check_finite,
    fit,
    penalty_of,
    restore_rng,
    rng_state,
)

__all__ = ["CausalLMSteps", "DivergenceError", "train_causal_lm"]


def _autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA devices that support it; a no-op context elsewhere."""
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices (weights and low-rank factors), not biases, LayerNorm gains or 1-D tensors (nanoGPT)."""
    params = [p for p in model.parameters() if p.requires_grad]  # shared (tied) tensors appear once
    return [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]


class CausalLMSteps:
    """The language-model recipe: optimizer steps on random blocks of train_blocks (N×T).

    Each step averages the causal-LM loss over grad_accum micro-batches of batch_size blocks
    drawn uniformly with replacement, adds alpha·penalty_fn(model), clips the gradient norm to
    grad_clip (0 = off) and steps AdamW (β = 0.9, 0.95 as in nanoGPT). The learning rate warms
    up linearly over warmup_steps, then follows a half cosine from lr down to min_lr_ratio·lr
    at the last step.

    Records: {"train/loss", "train/penalty", "train/lr", "train/grad_norm"} every log_every steps
    and at the last; {"val/ppl": eval_fn(model)} after the last step and, when eval_every > 0,
    every eval_every steps. Batch sampling and dropout draw from RNGs seeded with ``seed`` inside a fork of the
    global RNG state, so a run is reproducible and leaves the caller's RNG untouched.
    """

    unit = "step"

    def __init__(
        self,
        train_blocks: Tensor,
        *,
        steps: int,
        batch_size: int,
        lr: float,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        grad_clip: float = 1.0,
        grad_accum: int = 1,
        eval_every: int = 0,
        eval_fn: Callable[[nn.Module], float] | None = None,
        penalty_fn: Callable[[nn.Module], Tensor] | None = None,
        alpha: float = 0.0,
        log_every: int = 1,
        device: torch.device | str | None = None,
        seed: int = 0,
        lr_key: str = "train.lr",
    ) -> None:
        if train_blocks.dim() != 2:
            raise ValueError(f"train_blocks must be N×T token blocks, got shape {tuple(train_blocks.shape)}")
        if steps < 1 or batch_size < 1 or grad_accum < 1:
            raise ValueError(f"steps={steps}, batch_size={batch_size}, grad_accum={grad_accum} must all be ≥ 1")
        self.blocks, self.total, self.batch_size, self.grad_accum = train_blocks, steps, batch_size, grad_accum
        self.lr, self.weight_decay, self.warmup_steps, self.min_lr_ratio = lr, weight_decay, warmup_steps, min_lr_ratio
        self.grad_clip, self.eval_every, self.eval_fn, self.log_every = grad_clip, eval_every, eval_fn, log_every
        self.penalty_fn, self.alpha, self.seed, self.lr_key = penalty_fn, alpha, seed, lr_key
        self.device = None if device is None else torch.device(device)
        self.evaluate = None if eval_fn is None else (lambda m: {"val/ppl": float(eval_fn(m))})
        self.loss: float = math.nan  # the last step's loss
        self.val_ppl: float | None = None  # the last validation's perplexity

    @contextmanager
    def session(self, model: nn.Module, resume_state: dict | None) -> Iterator[None]:
        device = self.device = self.device if self.device is not None else next(model.parameters()).device
        model.to(device)
        self._build_optimizer(model, resume_state)
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            self._seed(device, resume_state)
            model.train()
            yield

    def _build_optimizer(self, model: nn.Module, resume_state: dict | None) -> None:
        self.optimizer = torch.optim.AdamW(_param_groups(model, self.weight_decay), lr=self.lr, betas=(0.9, 0.95))
        self.scheduler = get_cosine_with_min_lr_schedule_with_warmup(
            self.optimizer, num_warmup_steps=self.warmup_steps, num_training_steps=self.total,
            min_lr_rate=self.min_lr_ratio,
        )
        if resume_state is not None:
            self.optimizer.load_state_dict(resume_state["optimizer"])
            self.scheduler.load_state_dict(resume_state["scheduler"])

    def _seed(self, device: torch.device, resume_state: dict | None) -> None:
        """Seed the generators this run draws from (inside the fork), or restore them to resume."""
        # Dropout draws from the device's default generator; seed only that one (and the CPU's).
        torch.random.default_generator.manual_seed(self.seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(self.seed)
        self.batches = torch.Generator().manual_seed(self.seed)
        if resume_state is not None:
            restore_rng(resume_state, self.batches, device)

    def train_unit(self, model: nn.Module, number: int) -> Iterator[dict]:
        self.optimizer.zero_grad(set_to_none=True)
        loss_value = 0.0
        for _ in range(self.grad_accum):
            rows = torch.randint(self.blocks.shape[0], (self.batch_size,), generator=self.batches)
            x = self.blocks[rows].to(self.device)
            with _autocast(self.device):
                loss = model(input_ids=x, labels=x).loss / self.grad_accum
            loss.backward()
            loss_value += float(loss.detach())
        penalty = penalty_of(model, self.penalty_fn, self.alpha)
        penalty_value = 0.0 if penalty is None else float(penalty.detach())
        check_finite(f"step {number}", loss_value, penalty_value, self.lr, self.lr_key)
        if penalty is not None:
            (self.alpha * penalty).backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), self.grad_clip or math.inf))
        current_lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.loss = loss_value
        if number % self.log_every == 0 or number == self.total:
            yield {"step": number, "train/loss": loss_value, "train/penalty": penalty_value,
                   "train/lr": current_lr, "train/grad_norm": grad_norm}
        if self.eval_fn is not None and self.eval_every > 0 and number % self.eval_every == 0 and number != self.total:
            yield self._validate(model, number)

    def finish(self, model: nn.Module, done: int) -> Iterator[dict]:
        if self.eval_fn is not None:
            yield self._validate(model, done)

    def _validate(self, model: nn.Module, step: int) -> dict:
        self.val_ppl = float(self.eval_fn(model))
        model.train()
        return {"step": step, "val/ppl": self.val_ppl}

    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                **rng_state(self.batches, self.device)}


def train_causal_lm(
    model: nn.Module,
    train_blocks: Tensor,
    *,
    log_fn: Callable[[dict, int], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    resume_state: dict | None = None,
    callbacks: Sequence[StepCallback] = (),
    **recipe: object,
) -> dict:
    """``fit`` with ``CausalLMSteps(train_blocks, **recipe)``, its result as a dict (the library's older form).

    log_fn(metrics, step) receives every record without its "step". Returns {"steps", "train_s",
    "final_loss", "final_val_ppl", "interrupted", "history", "resume_state"}; when interrupted,
    resume_state passed back as ``resume_state`` continues exactly where training stopped.
    Raises DivergenceError naming the step when the loss or penalty is not finite.
    """
    steps = CausalLMSteps(train_blocks, **recipe)
    log = None if log_fn is None else (lambda record: log_fn({k: v for k, v in record.items() if k != "step"},
                                                             record["step"]))
    result: TrainResult = fit(model, steps, log=log, callbacks=callbacks, should_stop=should_stop,
                              resume_state=resume_state)
    return {
        "steps": result.epochs,
        "train_s": result.train_s,
        "final_loss": steps.loss,
        "final_val_ppl": steps.val_ppl,
        "interrupted": result.interrupted,
        "history": result.history,
        "resume_state": result.resume_state,
    }

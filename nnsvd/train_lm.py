"""Fine-tuning a causal language model on packed token blocks: AdamW, warmup + cosine, one plain loop.

No Hydra, no W&B: logging, evaluation, the factor penalty and interruption come in as callables.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import Tensor, nn
from transformers import get_cosine_with_min_lr_schedule_with_warmup

from nnsvd.errors import DivergenceError


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


def train_causal_lm(
    model: nn.Module,
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
    log_fn: Callable[[dict, int], None] | None = None,
    log_every: int = 1,
    should_stop: Callable[[], bool] | None = None,
    device: torch.device | str | None = None,
    seed: int = 0,
    resume_state: dict | None = None,
    lr_key: str = "train.lr",
) -> dict:
    """Train ``model`` in place for ``steps`` optimizer steps on random blocks of train_blocks (N×T).

    Each step averages the causal-LM loss over grad_accum micro-batches of batch_size blocks
    drawn uniformly with replacement, adds alpha·penalty_fn(model), clips the gradient norm to
    grad_clip (0 = off) and steps AdamW (β = 0.9, 0.95 as in nanoGPT). The learning rate warms
    up linearly over warmup_steps, then follows a half cosine from lr down to min_lr_ratio·lr
    at the last step.

    eval_fn(model) → validation perplexity every eval_every steps and at the end (0 = only at
    the end); it is logged as {"val/ppl"}. log_fn(metrics, step) receives {"train/loss",
    "train/penalty", "train/lr", "train/grad_norm"} every log_every steps. should_stop() is
    checked before every step; when it returns True the loop ends early, without the final
    evaluation, and the result says interrupted=True.

    Batch sampling and dropout draw from RNGs seeded with ``seed`` inside a fork of the global
    RNG state, so a run is reproducible and leaves the caller's RNG untouched.

    Returns {"steps", "train_s", "final_loss", "final_val_ppl", "interrupted", "history",
    "resume_state"}, with history a list of every logged record (each with its "step"). When
    interrupted, resume_state holds the step, optimizer, scheduler and RNG states; passing it back
    as ``resume_state`` continues exactly where training stopped.
    Raises DivergenceError naming the step when the loss or penalty is not finite.
    """
    if train_blocks.dim() != 2:
        raise ValueError(f"train_blocks must be N×T token blocks, got shape {tuple(train_blocks.shape)}")
    if steps < 1 or batch_size < 1 or grad_accum < 1:
        raise ValueError(f"steps={steps}, batch_size={batch_size}, grad_accum={grad_accum} must all be ≥ 1")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    model.to(device)
    optimizer = torch.optim.AdamW(_param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.95))
    scheduler = get_cosine_with_min_lr_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps, min_lr_rate=min_lr_ratio
    )
    history: list[dict] = [] if resume_state is None else list(resume_state["history"])
    first = 1
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        first = int(resume_state["step"]) + 1

    def log(metrics: dict, step: int) -> None:
        history.append({"step": step, **metrics})
        if log_fn is not None:
            log_fn(metrics, step)

    def evaluate(step: int) -> float:
        ppl = float(eval_fn(model))
        model.train()
        log({"val/ppl": ppl}, step)
        return ppl

    cuda_devices = [device] if device.type == "cuda" else []
    start = time.perf_counter()
    loss_value, val_ppl, interrupted, step = math.nan, None, False, 0
    with torch.random.fork_rng(devices=cuda_devices):
        # Dropout draws from the device's default generator; seed only that one (and the CPU's).
        torch.random.default_generator.manual_seed(seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
        batches = torch.Generator().manual_seed(seed)
        if resume_state is not None:
            torch.random.default_generator.set_state(resume_state["rng"])
            batches.set_state(resume_state["batches"])
            if device.type == "cuda" and resume_state.get("cuda_rng") is not None:
                torch.cuda.set_rng_state(resume_state["cuda_rng"], device)
        model.train()
        step = first - 1
        for step in range(first, steps + 1):
            if should_stop is not None and should_stop():
                interrupted, step = True, step - 1
                break
            optimizer.zero_grad(set_to_none=True)
            loss_value = 0.0
            for _ in range(grad_accum):
                rows = torch.randint(train_blocks.shape[0], (batch_size,), generator=batches)
                x = train_blocks[rows].to(device)
                with _autocast(device):
                    loss = model(input_ids=x, labels=x).loss / grad_accum
                loss.backward()
                loss_value += float(loss.detach())
            penalty = penalty_fn(model) if penalty_fn is not None and alpha != 0.0 else None
            penalty_value = 0.0 if penalty is None else float(penalty.detach())
            if not (math.isfinite(loss_value) and math.isfinite(penalty_value)):
                raise DivergenceError(
                    f"training diverged at step {step}: loss={loss_value}, penalty={penalty_value}; "
                    f"lower {lr_key} (now {lr:g})"
                )
            if penalty is not None:
                (alpha * penalty).backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip or math.inf))
            current_lr = scheduler.get_last_lr()[0]
            optimizer.step()
            scheduler.step()
            if step % log_every == 0 or step == steps:
                log(
                    {
                        "train/loss": loss_value,
                        "train/penalty": penalty_value,
                        "train/lr": current_lr,
                        "train/grad_norm": grad_norm,
                    },
                    step,
                )
            if eval_fn is not None and eval_every > 0 and step % eval_every == 0 and step != steps:
                val_ppl = evaluate(step)
        if eval_fn is not None and step > 0 and not interrupted:
            val_ppl = evaluate(step)
        state = None
        if interrupted:
            state = {
                "step": step,
                "history": history,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": torch.random.default_generator.get_state(),
                "batches": batches.get_state(),
                "cuda_rng": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
            }
    return {
        "steps": step,
        "train_s": time.perf_counter() - start,
        "final_loss": loss_value,
        "final_val_ppl": val_ppl,
        "interrupted": interrupted,
        "history": history,
        "resume_state": state,
    }

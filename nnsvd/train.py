"""Training loop for classifiers on in-memory tensors (the MNIST MLP)."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from nnsvd.errors import DivergenceError
from nnsvd.regularizers import orthonormal_penalty

LogFn = Callable[[dict], None]


@dataclass
class TrainState:
    """Everything needed to continue training exactly where it stopped."""

    epoch: int = 0  # epochs completed
    history: list[dict] = field(default_factory=list)


@dataclass
class TrainResult:
    train_s: float
    epochs: int
    history: list[dict]
    interrupted: bool = False
    resume_state: dict | None = None  # set when interrupted: pass it back to continue exactly


def _progress_enabled() -> bool:
    import sys

    return sys.stderr.isatty()


def check_finite(loss: Tensor, where: str, lr: float, key: str = "train.lr") -> None:
    """Raise DivergenceError when the loss is NaN or infinite."""
    if not torch.isfinite(loss):
        raise DivergenceError(f"loss became {loss.item()} at {where}; lower {key} (now {lr:g}) and rerun")


def train_classifier(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float = 0.0,
    alpha: float = 0.0,
    seed: int = 0,
    evaluate: Callable[[nn.Module], dict] | None = None,
    log: LogFn | None = None,
    desc: str = "train",
    lr_key: str = "train.lr",
    resume_state: dict | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Adam on cross-entropy + alpha·orthonormal_penalty, mini-batches from device tensors.

    The epoch permutation comes from a generator seeded with (seed, epoch), so training can
    stop after any epoch and continue with identical results: an interrupted result's
    ``resume_state`` (epochs done, history, optimizer and RNG states), passed back, continues it. ``evaluate(model)`` runs after every epoch; its dict is logged.
    ``should_stop()`` is checked before each epoch: when it says so, training returns
    with ``interrupted=True`` and the optimizer state.
    """
    state = TrainState()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay, fused=True)
    if resume_state is not None:
        state = TrainState(epoch=int(resume_state["epoch"]), history=list(resume_state["history"]))
        optimizer.load_state_dict(resume_state["optimizer"])
        torch.set_rng_state(resume_state["rng"])
    n = len(x)
    steps_per_epoch = math.ceil(n / batch_size)
    start = time.perf_counter()
    bar = tqdm(total=epochs, initial=state.epoch, desc=desc, unit="epoch", disable=not _progress_enabled())
    interrupted = False
    for epoch in range(state.epoch, epochs):
        if should_stop is not None and should_stop():
            interrupted = True
            break
        model.train()
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).to(x.device)
        loss_sum = torch.zeros((), device=x.device)
        penalty_sum = torch.zeros((), device=x.device)
        for step, idx in enumerate(
            tqdm(perm.split(batch_size), desc=f"epoch {epoch + 1}", leave=False, disable=not _progress_enabled())
        ):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            total = loss
            if alpha > 0:
                penalty = orthonormal_penalty(model)
                total = loss + alpha * penalty
                penalty_sum += penalty.detach()
            check_finite(total, f"epoch {epoch + 1} step {step + 1}/{steps_per_epoch}", lr, lr_key)
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            loss_sum += loss.detach()
        record = {"epoch": epoch + 1, "train/loss": loss_sum.item() / steps_per_epoch}
        if alpha > 0:
            record["train/penalty"] = penalty_sum.item() / steps_per_epoch
        if evaluate is not None:
            record.update(evaluate(model))
        state.epoch = epoch + 1
        state.history.append(record)
        if log is not None:
            log(record)
        bar.update(1)
        bar.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in record.items() if k != "epoch"})
    bar.close()
    return TrainResult(
        train_s=time.perf_counter() - start,
        epochs=state.epoch,
        history=state.history,
        interrupted=interrupted,
        resume_state=(
            {"epoch": state.epoch, "history": state.history, "optimizer": optimizer.state_dict(),
             "rng": torch.get_rng_state()}
            if interrupted
            else None
        ),
    )


@torch.no_grad()
def evaluate_classifier(model: nn.Module, x: Tensor, y: Tensor, batch_size: int = 4096) -> tuple[float, float]:
    """(accuracy, mean cross-entropy) in eval mode (dropout off)."""
    was_training = model.training
    model.eval()
    correct, loss = 0, 0.0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        logits = model(xb)
        loss += F.cross_entropy(logits, yb, reduction="sum").item()
        correct += (logits.argmax(1) == yb).sum().item()
    model.train(was_training)
    return correct / len(x), loss / len(x)

"""Training classifiers on in-memory tensors (the MNIST MLP): epochs of shuffled mini-batches."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm.auto import tqdm

from nnsvd.lowrank.regularizers import orthonormal_penalty
from nnsvd.training.loop import (
    StepCallback,
    TrainResult,
    check_finite,
    fit,
    penalty_of,
    progress_enabled,
    restore_rng,
    rng_state,
)

__all__ = ["ClassifierEpochs", "TrainResult", "evaluate_classifier", "train_classifier"]

LogFn = Callable[[dict], None]


class ClassifierEpochs:
    """The classifier recipe: Adam on cross-entropy + alpha·orthonormal_penalty, epochs over shuffled tensors.

    Epoch e's order is a permutation drawn from a generator seeded with seed·100003 + e, so it does
    not depend on what ran before; dropout draws from the caller's global RNG, whose CPU state resume
    keeps (on a GPU, dropout's CUDA generator is not kept). Each epoch yields one record: mean train
    loss (and penalty), then ``evaluate(model)``.
    """

    unit = "epoch"

    def __init__(
        self, x: Tensor, y: Tensor, *, epochs: int, batch_size: int, lr: float, weight_decay: float = 0.0,
        alpha: float = 0.0, seed: int = 0, evaluate: Callable[[nn.Module], dict] | None = None,
        lr_key: str = "train.lr",
    ) -> None:
        self.x, self.y, self.total, self.batch_size = x, y, epochs, batch_size
        self.lr, self.weight_decay, self.alpha, self.seed, self.lr_key = lr, weight_decay, alpha, seed, lr_key
        self.penalty_fn = orthonormal_penalty if alpha > 0 else None
        self.evaluate = evaluate
        self.steps_per_epoch = math.ceil(len(x) / batch_size)

    @contextmanager
    def session(self, model: nn.Module, resume_state: dict | None) -> Iterator[None]:
        self.optimizer = torch.optim.Adam(
            model.parameters(), lr=self.lr, weight_decay=self.weight_decay, fused=True
        )
        if resume_state is not None:
            self.optimizer.load_state_dict(resume_state["optimizer"])
            restore_rng(resume_state)
        yield

    def train_unit(self, model: nn.Module, number: int) -> Iterator[dict]:
        model.train()  # the last epoch's evaluation may have left it in eval mode
        x, y, epoch = self.x, self.y, number - 1
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch))
        loss_sum = torch.zeros((), device=x.device)
        penalty_sum = torch.zeros((), device=x.device)
        batches = perm.to(x.device).split(self.batch_size)
        for step, idx in enumerate(tqdm(batches, desc=f"epoch {number}", leave=False, disable=not progress_enabled())):
            loss = F.cross_entropy(model(x[idx]), y[idx])
            penalty = penalty_of(model, self.penalty_fn, self.alpha)
            total, penalty_value = loss, 0.0
            if penalty is not None:
                total, penalty_value = loss + self.alpha * penalty, penalty.detach()
                penalty_sum += penalty_value
            where = f"epoch {number} step {step + 1}/{self.steps_per_epoch}"
            check_finite(where, loss.detach(), penalty_value, self.lr, self.lr_key)
            self.optimizer.zero_grad(set_to_none=True)
            total.backward()
            self.optimizer.step()
            loss_sum += loss.detach()
        record = {"epoch": number, "train/loss": loss_sum.item() / self.steps_per_epoch}
        if self.penalty_fn is not None:
            record["train/penalty"] = penalty_sum.item() / self.steps_per_epoch
        if self.evaluate is not None:
            record.update(self.evaluate(model))
        yield record

    def finish(self, model: nn.Module, done: int) -> Iterator[dict]:
        yield from ()  # each epoch's record already holds its evaluation

    def state(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), **rng_state()}


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
    callbacks: Sequence[StepCallback] = (),
) -> TrainResult:
    """``fit`` with the ``ClassifierEpochs`` recipe: one record per epoch, with ``evaluate(model)``'s dict.

    ``should_stop()`` is checked before each epoch; an interrupted result's ``resume_state`` (epochs
    done, history, optimizer and RNG states), passed back, continues with identical results.
    """
    recipe = ClassifierEpochs(
        x, y, epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay, alpha=alpha, seed=seed,
        evaluate=evaluate, lr_key=lr_key,
    )
    return fit(model, recipe, log=log, callbacks=callbacks, should_stop=should_stop, resume_state=resume_state,
               progress=desc)


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

"""The training loop shared by classifiers and language models.

A ``Recipe`` says what one unit of progress is (an epoch over shuffled tensors, an optimizer step on
sampled token blocks) and owns its optimizer and random generators. ``fit`` does the rest once:
resume, the stop check before every unit, the history, logging, callbacks and the typed result.
The helpers below (penalty, divergence check, RNG state) are what the recipes' steps share.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from nnsvd.errors import DivergenceError


@dataclass
class TrainResult:
    """What a training run did; an interrupted one carries the state that continues it exactly."""

    train_s: float
    epochs: int  # units completed: epochs of a classifier, optimizer steps of a language model
    history: list[dict]
    interrupted: bool = False
    resume_state: dict | None = None  # set when interrupted: pass it back to continue exactly


@dataclass(frozen=True)
class StepRecord:
    """One record as it is logged, with what a callback needs to measure more at that point."""

    unit: str  # "epoch" or "step"
    number: int  # the unit the record belongs to (1-based)
    total: int  # units the run trains for
    metrics: dict  # the logged record, without the unit key
    model: nn.Module  # the model being trained: a callback may read or copy it, never change it
    evaluate: Callable[[nn.Module], dict] | None  # the recipe's validation, to apply to other models too


StepCallback = Callable[[StepRecord], None]

_registered: list[StepCallback] = []  # on_step's: seen by every fit in this process


@contextmanager
def on_step(*callbacks: StepCallback) -> Iterator[None]:
    """Within the block, every ``fit`` also calls ``callbacks`` on each record it logs.

    For code that cannot reach the call of ``fit`` (a probe around run.py's whole pipeline)."""
    _registered.extend(callbacks)
    try:
        yield
    finally:
        for callback in callbacks:
            _registered.remove(callback)


class Recipe(Protocol):
    """One kind of training: what a unit of progress does, and the state resume needs."""

    unit: str  # "epoch" or "step": the key of each record and of the resume state
    total: int  # units to train
    evaluate: Callable[[nn.Module], dict] | None  # validation metrics of a model (for callbacks)

    def session(self, model: nn.Module, resume_state: dict | None) -> AbstractContextManager[None]:
        """Build the optimizer and random generators, restored from ``resume_state``; the loop runs inside."""

    def train_unit(self, model: nn.Module, number: int) -> Iterator[dict]:
        """Train unit ``number`` (1-based), yielding each record to log as it is made."""

    def finish(self, model: nn.Module, done: int) -> Iterator[dict]:
        """After the last unit (never after an interruption): yield any closing records."""

    def state(self) -> dict:
        """Optimizer, scheduler and RNG states: with the unit count and the history, what resume needs."""


def fit(
    model: nn.Module,
    recipe: Recipe,
    *,
    log: Callable[[dict], None] | None = None,
    callbacks: Sequence[StepCallback] = (),
    should_stop: Callable[[], bool] | None = None,
    resume_state: dict | None = None,
    progress: str | None = None,
) -> TrainResult:
    """Train ``model`` in place for ``recipe.total`` units, continuing ``resume_state`` when given.

    ``should_stop()`` is checked before every unit: when it says so, the loop ends without the
    recipe's closing records and the result is interrupted, with a ``resume_state`` (units done,
    history, ``recipe.state()``) that, passed back, continues exactly. Every record the recipe
    yields (with its unit key) goes to the history and ``log``, then to ``callbacks`` and those
    of ``on_step``. ``progress`` names a bar over the units, drawn on a terminal only.
    """
    done = 0 if resume_state is None else int(resume_state[recipe.unit])
    history: list[dict] = [] if resume_state is None else list(resume_state["history"])
    listeners = [*callbacks, *_registered]

    def emit(record: dict) -> None:
        history.append(record)
        if log is not None:
            log(record)
        if listeners:
            metrics = {k: v for k, v in record.items() if k != recipe.unit}
            step = StepRecord(recipe.unit, record[recipe.unit], recipe.total, metrics, model, recipe.evaluate)
            for listener in listeners:
                listener(step)

    bar = tqdm(total=recipe.total, initial=done, desc=progress, unit=recipe.unit,
               disable=progress is None or not progress_enabled())
    interrupted, state = False, None
    with recipe.session(model, resume_state):
        start = time.perf_counter()
        for number in range(done + 1, recipe.total + 1):
            if should_stop is not None and should_stop():
                interrupted = True
                break
            for record in recipe.train_unit(model, number):
                emit(record)
                bar.set_postfix({k.split("/")[-1]: f"{v:.4f}" for k, v in record.items() if k != recipe.unit})
            done = number
            bar.update(1)
        if not interrupted and done > 0:
            for record in recipe.finish(model, done):
                emit(record)
        if interrupted:
            state = {recipe.unit: done, "history": history, **recipe.state()}
    bar.close()
    return TrainResult(time.perf_counter() - start, done, history, interrupted, state)


def progress_enabled() -> bool:
    """Progress bars only on a terminal: a log file would keep every redraw."""
    return sys.stderr.isatty()


def penalty_of(model: nn.Module, penalty_fn: Callable[[nn.Module], Tensor] | None, alpha: float) -> Tensor | None:
    """P(model), the penalty that alpha·P adds to the loss; None when there is none (alpha = 0)."""
    return None if penalty_fn is None or alpha == 0.0 else penalty_fn(model)


def check_finite(where: str, loss: Tensor | float, penalty: Tensor | float, lr: float, lr_key: str) -> None:
    """Raise DivergenceError, naming ``where`` and the fix, when the loss or the penalty P is NaN or ±∞.

    It reads loss + P: one device sync for tensors, as the step needs no other."""
    if math.isfinite(float(loss + penalty)):
        return
    raise DivergenceError(
        f"training diverged at {where}: loss={float(loss)}, penalty={float(penalty)}; lower {lr_key} (now {lr:g})"
    )


def rng_state(batches: torch.Generator | None = None, device: torch.device | None = None) -> dict:
    """States of the default CPU generator, ``batches`` and ``device``'s CUDA generator, for ``restore_rng``."""
    state = {"rng": torch.random.default_generator.get_state()}
    if batches is not None:
        state["batches"] = batches.get_state()
    if device is not None:
        state["cuda_rng"] = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return state


def restore_rng(state: dict, batches: torch.Generator | None = None, device: torch.device | None = None) -> None:
    """Put back the generator states that ``rng_state`` took (a missing CUDA state leaves that one)."""
    torch.random.default_generator.set_state(state["rng"])
    if batches is not None:
        batches.set_state(state["batches"])
    if device is not None and device.type == "cuda" and state.get("cuda_rng") is not None:
        torch.cuda.set_rng_state(state["cuda_rng"], device)

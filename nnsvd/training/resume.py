"""The state of an interrupted training phase, saved in the run directory so that a requeued job
resumes where it stopped: the model in the task's own format, and the trainer state beside it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from torch import nn

from nnsvd.errors import CheckpointError

RESUME_DIR = "interrupted"
TRAINER = "trainer.pt"


def save_train_state(run_dir: Path, phase: str, model: nn.Module, save: Callable, trainer: Mapping) -> Path:
    """Save an interrupted training phase atomically: the model through ``save(model, dir)`` (the
    task's own format) and the trainer state (optimizer, RNG, progress) beside it.

    ``trainer`` holds only tensors, numbers, strings, lists and dicts, so it loads back with
    ``torch.load(weights_only=True)`` (no arbitrary unpickling).
    """
    import torch

    directory = Path(run_dir) / RESUME_DIR
    tmp = Path(tempfile.mkdtemp(dir=run_dir, prefix=f".{RESUME_DIR}.", suffix=".tmp"))
    try:
        save(model, tmp)
        torch.save({"phase": phase, **trainer}, tmp / TRAINER)
        shutil.rmtree(directory, ignore_errors=True)
        os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def load_train_state(run_dir: Path, phase: str, load: Callable) -> tuple[nn.Module, dict] | None:
    """(model, trainer state) of an interrupted ``phase`` saved in ``run_dir``, else None.

    ``load(dir)`` is the task's loader, returning (model, record)."""
    import torch

    directory = Path(run_dir) / RESUME_DIR
    if not (directory / TRAINER).is_file():
        return None
    try:
        trainer = torch.load(directory / TRAINER, weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"the interrupted-training state in {directory} is unreadable ({exc}); delete it") from exc
    if trainer.get("phase") != phase:
        return None
    model, _ = load(directory)
    return model, trainer


def has_train_state(run_dir: Path) -> bool:
    """Whether an interrupted training phase saved its state in ``run_dir``."""
    return (Path(run_dir) / RESUME_DIR / TRAINER).is_file()


def clear_train_state(run_dir: Path) -> None:
    shutil.rmtree(Path(run_dir) / RESUME_DIR, ignore_errors=True)

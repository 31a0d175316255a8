"""What every task provides to the pipeline, and the registry that picks a task by ``model.name``.

A task owns one kind of experiment (the MNIST MLP, a causal LM): it builds the model, reads the
data, trains, evaluates, calibrates, and saves and opens checkpoints. The pipeline calls only what
``Task`` declares. A new kind of experiment is a new subclass and one line in ``TASKS``.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import nn

from nnsvd.errors import ConfigError

if TYPE_CHECKING:
    from nnsvd.config import CalibrationConfig, Config, TrainConfig
    from nnsvd.training.classification import TrainResult


class Task(ABC):
    """One kind of experiment, built from the run's typed ``Config``.

    Optional abilities say whether they are there (``supports_bound``, ``supports_sample``); the
    defaults say they are not."""

    main_metric: ClassVar[str]  # the key of ``evaluate``'s result that a run reports (results.json, the summary)
    higher_is_better: ClassVar[bool]
    length_key: ClassVar[str]  # how training length is counted: the TrainConfig key ("epochs" or "steps")
    calibrates_by_block: ClassVar[bool]  # data-aware compression calibrates one decoder block at a time
    supports_bound: ClassVar[bool] = False  # ``bound`` measures the compressed model's output error
    supports_sample: ClassVar[bool] = False  # ``sample`` writes a text continuation
    weights: str | None = None  # where a pretrained model's weights came from (None: trained here)
    zero_shot: Any = None  # lm-eval's TaskManager when eval.tasks is set (nnsvd.training.zero_shot.check_tasks)

    @abstractmethod
    def __init__(self, config: Config, data_root: Path, device: torch.device, cache_dir: Path | None) -> None:
        """Keep the settings; nothing is loaded yet."""

    @abstractmethod
    def length(self, train: TrainConfig) -> int:
        """How long ``train`` trains, in ``length_key`` units (0: not at all)."""

    @abstractmethod
    def build(self) -> nn.Module:
        """The dense model: a random init, or pretrained weights."""

    @abstractmethod
    def prepare(self) -> None:
        """Load the data (a missing dataset fails here)."""

    @abstractmethod
    def targets(self, model: nn.Module) -> list[str]:
        """The names (or patterns) of the layers to factorize."""

    @abstractmethod
    def train(
        self, model: nn.Module, train_cfg: TrainConfig, *, alpha: float, log_fn: Callable[[dict], None], desc: str,
        lr_key: str, should_stop: Callable[[], bool] | None = None, resume_state: dict | None = None,
    ) -> TrainResult:
        """Train ``model`` in place as ``train_cfg`` says, with the orthonormal penalty weighted by ``alpha``."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict:
        """The model's metrics, ``main_metric`` among them."""

    @abstractmethod
    def calibration_batches(self, cal: CalibrationConfig, model: nn.Module) -> list:
        """``cal.samples`` samples of the training data (never test), in batches."""

    @staticmethod
    @abstractmethod
    def calibration_loss(model: nn.Module, batch: Any) -> torch.Tensor:
        """The loss of one calibration batch: what the Fisher weights and the sensitivity measure."""

    @abstractmethod
    def save(self, model: nn.Module, directory: Path, meta: Mapping | None = None) -> Path:
        """Write the model (and ``meta``) to ``directory``; returns where it is."""

    @abstractmethod
    def load(self, path: str | Path) -> tuple[nn.Module, dict]:
        """A model this run saved (dense cache, interrupted state), of this run's architecture."""

    @abstractmethod
    def open_checkpoint(self, path: str | Path, explicit: set[str]) -> tuple[nn.Module, dict]:
        """The user's checkpoint=, whose own architecture is used; the model.* keys given on the
        command line (``explicit``) must agree with it."""

    def bound(self, dense: nn.Module, compressed: nn.Module) -> dict | None:
        """The measured output error of ``compressed`` against ``dense`` and its bounds (None: not available)."""
        return None

    def sample(self, model: nn.Module) -> str | None:
        """A short text the model writes (None: not available)."""
        return None


# model.name → "module:class". Imported on demand: an MLP run never imports transformers.
TASKS: dict[str, str] = {
    "mlp": "nnsvd.tasks.classification:ClassificationTask",
    "gpt2": "nnsvd.tasks.language_modeling:GPT2Task",
    "causal_lm": "nnsvd.tasks.language_modeling:LanguageModelingTask",
}


def task_class(name: str) -> type[Task]:
    """The task class of ``model.name``; a ConfigError names the known ones."""
    if name not in TASKS:
        raise ConfigError(f"model.name={name!r} is unknown; allowed: {', '.join(TASKS)}")
    module, _, cls = TASKS[name].partition(":")
    return getattr(importlib.import_module(module), cls)

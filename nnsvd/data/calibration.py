"""Which calibration samples a data-aware compression sees: drawn from training data, never test."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from nnsvd.errors import ConfigError

if TYPE_CHECKING:
    from nnsvd.config import CalibrationConfig

CALIBRATION_SPLITS = ("train", "validation")


def check_calibration(cal: CalibrationConfig) -> None:
    """One-line ConfigErrors for calibration settings that cannot work, before any long work."""
    if cal.split not in CALIBRATION_SPLITS:
        why = " (calibrating on test data would leak it into the model)" if cal.split == "test" else ""
        raise ConfigError(
            f"calibration.split={cal.split} is refused{why}; allowed: {', '.join(CALIBRATION_SPLITS)}"
        )
    for key, value in (("samples", cal.samples), ("batch_size", cal.batch_size)):
        if value < 1:
            raise ConfigError(f"calibration.{key}={value} must be ≥ 1")


def draw_samples(available: int, cal: CalibrationConfig, *, unit: str) -> Tensor:
    """``cal.samples`` distinct indices out of ``available``, drawn with a generator seeded by ``cal.seed``."""
    if cal.samples > available:
        raise ConfigError(
            f"calibration.samples={cal.samples} is more than the {available} {unit} of the {cal.split} split; "
            f"allowed: 1 ≤ calibration.samples ≤ {available}"
        )
    return torch.randperm(available, generator=torch.Generator().manual_seed(cal.seed))[: cal.samples]

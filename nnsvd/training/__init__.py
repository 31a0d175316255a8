"""Training: one loop (``fit``) for every kind of model, each kind a small recipe."""

from nnsvd.training.loop import Recipe, StepRecord, TrainResult, fit, on_step

__all__ = ["Recipe", "StepRecord", "TrainResult", "fit", "on_step"]

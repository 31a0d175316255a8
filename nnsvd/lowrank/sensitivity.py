"""ASVD's sensitivity allocation: how much the task loss rises when one layer alone is compressed.

For each target and each candidate ratio ρ (the fraction of that layer's weights removed), the
layer alone is factorized at its uniform rank for ρ, the task loss is measured on the
calibration batches, and the layer is put back. The layer is factorized once, at the largest of
its ranks: the methods' factors are ordered by singular value (A = U√Σ, B = √Σ·Vᵀ, weighted or
not), so the first r columns of A and rows of B are its rank-r truncation. The loss increase over the dense model, made
monotone with diminishing returns (its lower convex hull in the rank), is the layer's loss curve
for ``greedy_allocation``, which then picks per-layer ranks that meet the budget and minimize
the summed increase. Plain PyTorch: no Hydra, no W&B.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from nnsvd.lowrank.allocation import Shape, budget, convex_curve, greedy_allocation, uniform_ranks
from nnsvd.lowrank.calibration import LossFn
from nnsvd.lowrank.factorize import Factorizer
from nnsvd.lowrank.layers import LowRankLinear
from nnsvd.lowrank.progress import Progress
from nnsvd.lowrank.surgery import compress_model

log = logging.getLogger(__name__)

SENSITIVITY_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


@torch.no_grad()
def mean_loss(model: nn.Module, batches: Sequence, loss_fn: LossFn) -> float:
    """The task loss over the batches, each weighted by its number of samples, in eval mode."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        n = len(batch[0]) if isinstance(batch, tuple | list) else len(batch)
        total += float(loss_fn(model, batch)) * n
        count += n
    model.train(was_training)
    return total / count


def measure_sensitivity(
    model: nn.Module,
    shapes: Mapping[str, Shape],
    batches: Sequence,
    loss_fn: LossFn,
    *,
    method: str | Factorizer = "auto",
    calibration: Mapping[str, object] | None = None,
    ratios: Sequence[float] = SENSITIVITY_RATIOS,
) -> dict[str, dict[int, float]]:
    """{layer: {rank: loss increase}}: each layer alone compressed at each ratio's uniform rank.

    The model is left as it was (every layer is put back after its measurements).
    """
    base = mean_loss(model, batches, loss_fn)
    measured: dict[str, dict[int, float]] = {}
    progress = Progress("measuring sensitivity", len(shapes), "layers", log)
    for name in shapes:
        original = model.get_submodule(name)
        ranks = sorted({uniform_ranks({name: shapes[name]}, ratio)[name] for ratio in ratios}, reverse=True)
        context = {} if calibration is None else {"calibration": {name: calibration[name]}}
        compress_model(model, [name], ranks[0], method=method, **context)
        top = model.get_submodule(name)
        measured[name] = {}
        for rank in ranks:
            model.set_submodule(name, top if rank == ranks[0] else truncated(top, rank))
            measured[name][rank] = mean_loss(model, batches, loss_fn) - base
        model.set_submodule(name, original)
        log.debug("sensitivity of %s: %s", name, ", ".join(f"r{r}: {d:+.4f}" for r, d in sorted(measured[name].items())))
        progress.update()
    progress.finish()
    return measured


@torch.no_grad()
def truncated(layer: LowRankLinear, rank: int) -> LowRankLinear:
    """The rank-r truncation of a factorized layer whose factors are ordered by singular value:
    A's first r columns and B's first r rows (and the same bias)."""
    A, B = layer.A, layer.B
    new = LowRankLinear(layer.in_features, layer.out_features, rank, bias=layer.bias is not None,
                        device=A.device, dtype=A.dtype)
    new.A.copy_(A[:, :rank])
    new.B.copy_(B[:rank])
    if layer.bias is not None:
        new.bias.copy_(layer.bias)
    return new


def sensitivity_allocation(
    shapes: Mapping[str, Shape],
    measured: Mapping[str, Mapping[int, float]],
    ratio: float,
) -> dict[str, int]:
    """Ranks within the measured range of each layer that meet the budget and minimize the summed
    loss increase of the convexified curves (see greedy_allocation)."""
    losses, low, high = {}, {}, {}
    for name in shapes:
        points = {int(r): float(d) for r, d in measured[name].items()}
        low[name], high[name] = min(points), max(points)
        curve = convex_curve(points, range(low[name], high[name] + 1))
        losses[name] = [curve.get(r, curve[low[name]]) for r in range(high[name] + 1)]
    return greedy_allocation(shapes, losses, budget(shapes, ratio), min_ranks=low, max_ranks=high)

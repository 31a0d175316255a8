"""ASVD's sensitivity allocation: how much the task loss rises when one layer alone is compressed.

For each target and each candidate ratio ρ (the fraction of that layer's weights removed), the
layer alone is factorized at its uniform rank for ρ, the task loss is measured on the
calibration batches, and the layer is put back. The layer is factorized once, at the largest of
its ranks: the methods' factors are ordered by singular value (A = U√Σ, B = √Σ·Vᵀ, weighted or
not), so the first r columns of A and rows of B are its rank-r truncation. The loss increase over the dense model, made
monotone with diminishing returns (its lower convex hull in the rank), is the layer's loss curve
for ``greedy_allocation``, which then picks per-layer ranks that meet the budget and minimize
the summed increase. Plain PyTorch: no Hydra, no W&B.

With ``blocks`` (a decoder-only transformer's ModuleList of blocks), a layer of block k is measured
from block k's cached dense input: the blocks below it are taken out of the forward pass, whose
result they cannot change, so a measurement costs the blocks from k up and the head, about half a
forward pass on average. The dense loss through that shortcut must equal the whole forward pass's;
where it does not (a family whose forward reads its blocks by position), every layer is measured
with the whole pass instead, and the log says so.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from nnsvd.lowrank.allocation import Shape, budget, convex_curve, greedy_allocation, uniform_ranks
from nnsvd.lowrank.blockwise import BlockInputs, _without_kv_cache, capture_block_inputs, targets_by_block
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
    blocks: str | None = None,
) -> dict[str, dict[int, float]]:
    """{layer: {rank: loss increase}}: each layer alone compressed at each ratio's uniform rank.

    With ``blocks``, each layer's measurements skip the blocks below its own (see the module
    docstring); the figures equal the whole forward pass's. The model is left as it was (every
    layer is put back after its measurements).
    """
    base = mean_loss(model, batches, loss_fn)
    whole = functools.partial(mean_loss, model, batches, loss_fn)
    pairs = _losses_by_block(model, shapes, batches, loss_fn, blocks, base) if blocks else ((n, whole) for n in shapes)
    measured: dict[str, dict[int, float]] = {}
    progress = Progress("measuring sensitivity", len(shapes), "layers", log)
    for name, loss in pairs:
        original = model.get_submodule(name)
        ranks = sorted({uniform_ranks({name: shapes[name]}, ratio)[name] for ratio in ratios}, reverse=True)
        context = {} if calibration is None else {"calibration": {name: calibration[name]}}
        compress_model(model, [name], ranks[0], method=method, **context)
        top = model.get_submodule(name)
        measured[name] = {}
        for rank in ranks:
            model.set_submodule(name, top if rank == ranks[0] else truncated(top, rank))
            measured[name][rank] = loss() - base
        model.set_submodule(name, original)
        log.debug("sensitivity of %s: %s", name, ", ".join(f"r{r}: {d:+.4f}" for r, d in sorted(measured[name].items())))
        progress.update()
    progress.finish()
    return {name: measured[name] for name in shapes}


def _losses_by_block(
    model: nn.Module, shapes: Mapping[str, Shape], batches: Sequence, loss_fn: LossFn, blocks: str, base: float
) -> Iterator[tuple[str, Callable[[], float]]]:
    """(layer, a function that measures the model's loss) for every target, block by block: the
    loss from the layer's own block up, with that block's dense inputs cached (and moved one block
    on after its layers are measured). Where the dense loss from a block up differs from ``base``,
    the whole pass's, this and every later layer is measured with the whole pass."""
    layers = model.get_submodule(blocks)
    per_block = targets_by_block(list(shapes), blocks, len(layers))
    with _without_kv_cache(model), torch.no_grad():
        inputs = capture_block_inputs(model, layers[0], batches, loss_fn)
    exact = True
    for k, names in enumerate(per_block):
        if names and exact:
            # block k's layers are all measured before the generator moves inputs.hidden on
            from_block = functools.partial(_loss_from_block, model, batches, loss_fn, blocks, k, inputs)
            dense = from_block()
            exact = abs(dense - base) <= 1e-6 * max(abs(base), 1.0)
            if not exact:
                log.warning("sensitivity: the dense loss from block %d up (%.8g) differs from the whole forward "
                            "pass's (%.8g): measuring the remaining layers with the whole pass", k, dense, base)
        for name in names:
            yield name, (from_block if exact else functools.partial(mean_loss, model, batches, loss_fn))
        if not any(per_block[k + 1:]):
            return
        if exact:
            with torch.no_grad():
                inputs.hidden = [inputs.run(layers[k], j) for j in range(len(inputs))]


def _loss_from_block(model: nn.Module, batches: Sequence, loss_fn: LossFn, blocks: str, k: int,
                     inputs: BlockInputs) -> float:
    """The mean loss with the forward passes starting at block k, from ``inputs.hidden``."""
    with skipping_blocks(model, blocks, k, inputs.hidden):
        return mean_loss(model, batches, loss_fn)


@contextmanager
def skipping_blocks(model: nn.Module, blocks: str, k: int, hidden: Sequence[Tensor]) -> Iterator[None]:
    """The model's forward passes without its blocks 0…k−1: the ModuleList ``blocks`` holds blocks k…
    only, and in the j-th forward pass block k receives ``hidden[j]`` (its dense input on batch j)
    in place of what the embeddings give it."""
    parent_name, _, attribute = blocks.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    full = getattr(parent, attribute)
    feed = iter(hidden)

    def substitute(module: nn.Module, args: tuple, kwargs: dict):
        if args:
            return (next(feed), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": next(feed)}

    handle = full[k].register_forward_pre_hook(substitute, with_kwargs=True)
    setattr(parent, attribute, nn.ModuleList(list(full)[k:]))
    try:
        with _without_kv_cache(model):
            yield
    finally:
        setattr(parent, attribute, full)
        handle.remove()


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

"""Calibration statistics: what the data-aware methods know about a layer's real inputs.

A calibration pass runs the model on calibration batches with forward hooks on the target
layers and accumulates, for each layer's input rows x (one per token or image):

- the Gram XᵀX = Σ x·xᵀ (in×in): the whitening method's weight, and the data error of any method;
- Σ |x| per input channel: ASVD's activation scale;
- the token count;
- with ``fisher=True``, after a backward pass on the task loss, Σ (∂ℓ/∂W_ij)² summed over the
  input index j: FWSVD's importance of output row i.

Each batch is accumulated in the model's dtype (float32 at least), then added into a float64
running sum. Plain PyTorch: no Hydra, no W&B.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nnsvd.lowrank.factorize import work_device
from nnsvd.lowrank.layers import is_conv1d, linear_weight

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, object], Tensor]
"""``loss_fn(model, batch) -> scalar loss``: runs the model on one calibration batch."""


@dataclass
class InputStats:
    """Statistics of the rows x of one layer's input over the calibration data (float64)."""

    gram: Tensor  # Σ x·xᵀ = XᵀX, in×in
    abs_sum: Tensor  # Σ |x| per input channel
    tokens: int = 0

    @property
    def mean_abs(self) -> Tensor:
        """Per-channel mean |x| (ASVD's activation scale)."""
        return self.abs_sum / max(self.tokens, 1)

    def add(self, x: Tensor) -> None:
        """Accumulate a batch of input rows x (…×in): the batch in its dtype (≥ float32), the sum in float64."""
        x = x.detach().reshape(-1, x.shape[-1])
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        self.gram += (x.T @ x).to(device=self.gram.device, dtype=torch.float64)
        self.abs_sum += x.abs().sum(0).to(device=self.abs_sum.device, dtype=torch.float64)
        self.tokens += x.shape[0]


@dataclass
class LayerStats:
    """What one target layer's data-aware factorization gets as ``calibration=``."""

    inputs: InputStats
    fisher: Tensor | None = None  # per output row: Σ_batches Σ_j (∂ℓ/∂W_ij)²

    @property
    def gram(self) -> Tensor:
        return self.inputs.gram

    @property
    def mean_abs(self) -> Tensor:
        return self.inputs.mean_abs

    @property
    def tokens(self) -> int:
        return self.inputs.tokens


def stats_nbytes(model: nn.Module, names: Sequence[str], *, fisher: bool = False) -> int:
    """Bytes of float64 statistics for these layers: in² + in per layer (+ out with Fisher)."""
    total = 0
    for name in names:
        out_f, in_f = linear_weight(model.get_submodule(name))[0].shape
        total += 8 * (in_f * in_f + in_f + (out_f if fisher else 0))
    return total


def _weight_grad(module: nn.Module) -> Tensor | None:
    """∂ℓ/∂W in nn.Linear's out×in orientation (Conv1D stores W transposed)."""
    grad = module.weight.grad
    if grad is None:
        return None
    return grad.T if is_conv1d(module) else grad


class StatsCollector:
    """Forward hooks that accumulate LayerStats for the named layers while they are installed.

    ``with StatsCollector(model, names) as c: model(batch)`` then ``c.stats[name]``. With
    ``fisher=True`` call ``c.add_fisher()`` after each backward pass.
    """

    def __init__(self, model: nn.Module, names: Sequence[str], *, fisher: bool = False) -> None:
        self.model, self.names, self.fisher = model, list(names), fisher
        self.stats: dict[str, LayerStats] = {}
        for name in self.names:
            module = model.get_submodule(name)
            W, _ = linear_weight(module)
            device = work_device(W)
            in_f = W.shape[1]
            inputs = InputStats(
                torch.zeros(in_f, in_f, dtype=torch.float64, device=device),
                torch.zeros(in_f, dtype=torch.float64, device=device),
            )
            fisher_rows = torch.zeros(W.shape[0], dtype=torch.float64, device=device) if fisher else None
            self.stats[name] = LayerStats(inputs, fisher_rows)
        self._handles: list = []

    def __enter__(self) -> StatsCollector:
        for name in self.names:
            stats = self.stats[name].inputs
            module = self.model.get_submodule(name)
            self._handles.append(module.register_forward_hook(lambda m, args, out, s=stats: s.add(args[0])))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def add_fisher(self) -> None:
        """Add Σ_j (∂ℓ/∂W_ij)² of the gradients now in .grad, then clear those gradients."""
        for name in self.names:
            module = self.model.get_submodule(name)
            grad = _weight_grad(module)
            if grad is not None:
                fisher = self.stats[name].fisher
                fisher += grad.to(torch.float64).square().sum(1).to(fisher.device)
            module.weight.grad = None


def collect_statistics(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence,
    loss_fn: LossFn,
    *,
    fisher: bool = False,
) -> dict[str, LayerStats]:
    """{name: LayerStats} of the named layers over the calibration batches, in eval mode.

    Without Fisher each batch is one forward pass (no autograd). With Fisher it is a forward
    and backward pass of ``loss_fn`` in which only the target weights require gradients, so
    autograd does no work below the first target; every other parameter's requires_grad is
    restored afterwards. Fisher is the per-batch empirical Fisher (the square of each batch's
    mean-loss gradient, summed over batches): batch_size 1 gives the per-sample form.
    """
    log.info(
        "calibration statistics of %d layer(s) over %d batches: %.1f MB (float64)%s",
        len(names), len(batches), stats_nbytes(model, names, fisher=fisher) / 2**20, ", with Fisher" if fisher else "",
    )
    was_training = model.training
    model.eval()
    collector = StatsCollector(model, names, fisher=fisher)
    targets = {id(model.get_submodule(n).weight) for n in names}
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        if fisher:
            for p in model.parameters():
                p.requires_grad_(id(p) in targets)
                p.grad = None
        with collector:
            for batch in batches:
                if fisher:
                    loss_fn(model, batch).backward()
                    collector.add_fisher()
                else:
                    with torch.no_grad():
                        loss_fn(model, batch)
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return collector.stats


_INDEX = re.compile(r"^(.*?\.\d+)(?:\.|$)")


def sequential_stages(names: Sequence[str]) -> list[list[str]]:
    """The targets grouped into the stages of sequential calibration, in the given (model) order.

    Layers under the same numbered block (``transformer.h.3.…``, ``model.layers.3.…``) form one
    stage; a layer outside any numbered block is a stage of its own (the MLP's l1, then l2).
    """
    stages: dict[str, list[str]] = {}
    for name in names:
        match = _INDEX.match(name)
        stages.setdefault(match.group(1) if match else name, []).append(name)
    return list(stages.values())


def stats_summary(stats: Mapping[str, LayerStats]) -> dict:
    """Tokens per layer, for the log and the results."""
    return {name: s.tokens for name, s in stats.items()}

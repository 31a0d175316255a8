"""Calibration statistics: what the data-aware methods know about a layer's real inputs.

A calibration pass runs the model on calibration batches with forward hooks on the target
layers and accumulates, for each distinct input x of the targets (one row per token or image):

- the Gram XᵀX = Σ x·xᵀ (in×in): the whitening method's weight, and the data error of any method;
- Σ |x| per input channel: ASVD's activation scale;
- the token count;
- with ``fisher=True``, after a backward pass on the task loss, Σ (∂ℓ/∂W_ij)² summed over the
  input index j: FWSVD's importance of output row i (per layer: it depends on the weight).

Targets that read the same tensor (a transformer's q/k/v projections; gate/up) share one
InputStats: ``shared_input_groups`` finds them by tensor identity in one forward pass, and the
collector then keeps one Gram and installs one hook per distinct input.

Each batch is accumulated in the model's dtype (float32 at least), then added into a float64
running sum. Plain PyTorch: no Hydra, no W&B.
"""

from __future__ import annotations

import logging
import re
import weakref
from collections.abc import Callable, Iterable, Sequence
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

    @classmethod
    def zeros(cls, features: int, device: torch.device | str | None = None) -> InputStats:
        return cls(
            torch.zeros(features, features, dtype=torch.float64, device=device),
            torch.zeros(features, dtype=torch.float64, device=device),
        )

    @property
    def mean_abs(self) -> Tensor:
        """Per-channel mean |x| (ASVD's activation scale)."""
        return self.abs_sum / max(self.tokens, 1)

    def add(self, x: Tensor) -> None:
        """Accumulate a batch of input rows x (…×in): the batch in its dtype (≥ float32), the sum in float64."""
        x = x.detach().reshape(-1, x.shape[-1])
        x = x.to(torch.promote_types(x.dtype, torch.float32))
        # add_ casts each entry as it adds: no in×in float64 temporary beside the batch's Gram
        self.gram.add_((x.T @ x).to(self.gram.device))
        self.abs_sum.add_(x.abs().sum(0).to(self.abs_sum.device))
        self.tokens += x.shape[0]


@dataclass
class LayerStats:
    """What one target layer's data-aware factorization gets as ``calibration=``.

    ``inputs`` may be the same object for several layers (those that read the same tensor).
    """

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


def _shape(model: nn.Module, name: str) -> tuple[int, int]:
    out_f, in_f = linear_weight(model.get_submodule(name))[0].shape
    return out_f, in_f


def stats_nbytes(
    model: nn.Module, names: Sequence[str], *, fisher: bool = False, groups: Sequence[Sequence[str]] | None = None
) -> int:
    """Bytes of float64 statistics for these layers: in² + in per distinct input (each layer its own
    when ``groups`` is None), + out per layer with Fisher."""
    groups = [[name] for name in names] if groups is None else groups
    total = sum(8 * (in_f * in_f + in_f) for in_f in (_shape(model, group[0])[1] for group in groups))
    if fisher:
        total += sum(8 * _shape(model, name)[0] for name in names)
    return total


def shared_input_groups(model: nn.Module, names: Sequence[str], forward: Callable[[], object]) -> list[list[str]]:
    """The named layers grouped by the input tensor they read, found by identity in one ``forward()``.

    Layers whose first argument is the very same tensor object (q/k/v of one attention; gate/up
    of one MLP) form one group. Only weak references to the inputs are kept, so the pass holds
    no activations. A layer called more than once per pass, or not at all, is a group of its own.
    """
    groups: list[tuple[weakref.ref, list[str]]] = []
    calls = dict.fromkeys(names, 0)

    def probe(name: str, x: Tensor) -> None:
        calls[name] += 1
        if calls[name] == 1:
            match = next((members for ref, members in groups if ref() is x), None)
            if match is None:
                groups.append((weakref.ref(x), [name]))
            else:
                match.append(name)

    handles = [
        model.get_submodule(name).register_forward_pre_hook(lambda m, args, name=name: probe(name, args[0]))
        for name in names
    ]
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    shared = [[n for n in members if calls[n] == 1] for _, members in groups]
    alone = [[n] for n in names if calls[n] != 1]
    order = {name: i for i, name in enumerate(names)}
    return sorted((g for g in shared + alone if g), key=lambda g: order[g[0]])


class StatsCollector:
    """Forward hooks that accumulate the input statistics of the named layers while installed.

    ``with StatsCollector(model, names) as c: model(batch)`` then ``c.stats[name]``. ``groups``
    (from ``shared_input_groups``) says which layers read the same tensor: each group gets one
    InputStats, filled by one hook on its first layer. None: every layer its own.
    Fisher rows, when wanted, come from a ``FisherCollector`` (``c.stats`` has fisher=None).
    """

    def __init__(
        self, model: nn.Module, names: Sequence[str], *, groups: Sequence[Sequence[str]] | None = None
    ) -> None:
        self.model, self.names = model, list(names)
        self.groups = [[name] for name in self.names] if groups is None else [list(g) for g in groups]
        grouped = sorted(n for g in self.groups for n in g)
        if grouped != sorted(self.names):
            raise ValueError(f"groups {self.groups} do not partition the layers {self.names}")
        self.stats: dict[str, LayerStats] = {}
        for group in self.groups:
            W, _ = linear_weight(model.get_submodule(group[0]))
            inputs = InputStats.zeros(W.shape[1], work_device(W))
            for name in group:
                in_f = _shape(model, name)[1]
                if in_f != W.shape[1]:
                    raise ValueError(f"layers {group} cannot share an input: '{name}' takes {in_f} features")
                self.stats[name] = LayerStats(inputs)
        self._handles: list = []

    def __enter__(self) -> StatsCollector:
        for group in self.groups:
            inputs = self.stats[group[0]].inputs
            module = self.model.get_submodule(group[0])
            self._handles.append(module.register_forward_hook(lambda m, args, out, s=inputs: s.add(args[0])))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class FisherCollector:
    """Gradient hooks that add Σ_j (∂ℓ/∂W_ij)² of each backward pass into a float64 row sum per
    named layer (``c.fisher[name]``, out rows), then free that gradient at once: a backward pass
    holds one target's weight gradient at a time, not all of them.
    """

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.model, self.names = model, list(names)
        self.fisher: dict[str, Tensor] = {}
        for name in self.names:
            W, _ = linear_weight(model.get_submodule(name))
            self.fisher[name] = torch.zeros(W.shape[0], dtype=torch.float64, device=work_device(W))
        self._handles: list = []

    def _hook(self, name: str, transposed: bool) -> Callable[[Tensor], None]:
        rows = self.fisher[name]

        def fold(weight: Tensor) -> None:
            grad = weight.grad.to(torch.float64).square()
            rows.add_(grad.sum(0 if transposed else 1).to(rows.device))  # Conv1D stores W transposed
            weight.grad = None

        return fold

    def __enter__(self) -> FisherCollector:
        for name in self.names:
            module = self.model.get_submodule(name)
            hook = self._hook(name, is_conv1d(module))
            self._handles.append(module.weight.register_post_accumulate_grad_hook(hook))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def collect_fisher(model: nn.Module, names: Sequence[str], batches: Iterable, loss_fn: LossFn) -> dict[str, Tensor]:
    """{name: Fisher rows} of the named layers: a forward and backward pass of ``loss_fn`` per batch,
    in eval mode, in which only the target weights require gradients (autograd does no work below
    the first target); every parameter's requires_grad is restored afterwards. This is the
    per-batch empirical Fisher (the square of each batch's mean-loss gradient, summed over
    batches): batch_size 1 gives the per-sample form.
    """
    was_training = model.training
    model.eval()
    collector = FisherCollector(model, names)
    targets = {id(model.get_submodule(n).weight) for n in names}
    saved = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in targets)
            p.grad = None
        with collector:
            for batch in batches:
                loss_fn(model, batch).backward()
    finally:
        for p, flag in saved.items():
            p.requires_grad_(flag)
        model.train(was_training)
    return collector.fisher


def collect_statistics(
    model: nn.Module,
    names: Sequence[str],
    batches: Sequence,
    loss_fn: LossFn,
    *,
    fisher: bool = False,
    groups: Sequence[Sequence[str]] | None = None,
    share_inputs: bool = True,
) -> dict[str, LayerStats]:
    """{name: LayerStats} of the named layers over the calibration batches, in eval mode.

    Layers that read the same tensor share one InputStats: ``groups`` when given, else (with
    share_inputs) found on the first batch by ``shared_input_groups``, which costs one extra
    forward pass of that batch. Without Fisher each batch is one forward pass (no autograd).
    With Fisher it is a forward and backward pass (see ``collect_fisher``), whose forward also
    feeds the input statistics.
    """
    batches = list(batches)
    was_training = model.training
    model.eval()
    try:
        if groups is None and share_inputs and batches:
            groups = shared_input_groups(model, names, lambda: loss_fn(model, batches[0]))
        collector = StatsCollector(model, names, groups=groups)
        with collector:
            if fisher:
                rows = collect_fisher(model, names, batches, loss_fn)
            else:
                with torch.no_grad():
                    for batch in batches:
                        loss_fn(model, batch)
    finally:
        model.train(was_training)
    if fisher:
        for name, stats in collector.stats.items():
            stats.fisher = rows[name]
    return collector.stats


def restrict_groups(groups: Sequence[Sequence[str]], names: Iterable[str]) -> list[list[str]]:
    """The groups cut down to ``names`` (the targets of one stage or block), empty groups dropped."""
    keep = set(names)
    return [kept for kept in ([n for n in group if n in keep] for group in groups) if kept]


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

"""Calibrated compression of a decoder-only transformer one decoder block at a time, within memory.

``compress_with_calibration`` runs the whole model over the calibration batches and holds every
target's float64 statistics at once. ``compress_blockwise`` does the same work in the model's
own order, holding one block's statistics at a time:

1. **Capture.** A forward pre-hook on the first decoder block records, for each calibration
   batch, the hidden states the block receives and its other arguments (attention mask,
   position ids, rotary embeddings, …), then stops the forward: nothing above it runs.
2. **Block by block.** For block k: one pass over the cached inputs collects the block's input
   statistics (one Gram per distinct input: q/k/v share one, gate/up another), the targets are
   compressed one by one with the data-aware factorizer (a Gram is freed once the last layer that
   reads it is done), and each cached input is replaced by the block's output, the input of block
   k + 1. By default these are the dense
   block's outputs, computed in the statistics pass: the result equals the all-at-once path's.
   With ``sequential=True`` they are computed after compressing, so block k + 1 is calibrated on
   what the compressed blocks before it really feed it (the staged sequential path's result).
3. **Fisher** (FWSVD) needs the gradient of the loss, i.e. a whole-model backward: one
   forward + backward pass over the calibration batches collects every target's Fisher rows
   first (one float64 vector per layer; each weight gradient is folded and freed as soon as it is
   accumulated). It is the dense model's Fisher, also with ``sequential=True``.

Peak memory beyond the model itself: one block's statistics + the cached activations (one
hidden-state vector per calibration token, in the model's dtype, plus the block arguments,
stored once when equal across batches) + the float64 working set of factorizing one layer.
No copy of the model is made. Plain PyTorch (the decoder blocks are any ``nn.ModuleList``); on
Linux, glibc's malloc_trim hands freed heap memory back between layers.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import logging
import sys
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from nnsvd.lowrank.calibration import (
    LayerStats,
    LossFn,
    StatsCollector,
    collect_fisher,
    shared_input_groups,
    stats_nbytes,
)
from nnsvd.lowrank.factorize import Factorizer
from nnsvd.lowrank.layers import linear_weight
from nnsvd.lowrank.progress import Progress
from nnsvd.lowrank.report import CompressionReport
from nnsvd.lowrank.surgery import TargetError, compress_model, plan_compression

log = logging.getLogger(__name__)

def decoder_blocks(model: nn.Module) -> str:
    """The qualified name of the model's decoder blocks: the ``nn.ModuleList`` under the base model
    (``model.base_model`` for a Hugging Face model) that holds the most parameters.

    ``model.layers`` (LLaMA, Mistral, Qwen, Gemma), ``transformer.h`` (GPT-2),
    ``model.decoder.layers`` (OPT), ``gpt_neox.layers`` (GPT-NeoX).
    """
    base = getattr(model, "base_model", model)
    prefix = next((name for name, module in model.named_modules() if module is base), "")
    lists = [
        (sum(p.numel() for p in module.parameters()), name)
        for name, module in base.named_modules()
        if isinstance(module, nn.ModuleList) and len(module) > 0
    ]
    if not lists:
        raise TargetError(f"{type(model).__name__} has no decoder blocks (no nn.ModuleList of layers)")
    _, name = max(lists)
    return f"{prefix}.{name}" if prefix else name


def targets_by_block(names: Sequence[str], blocks: str, count: int) -> list[list[str]]:
    """The target names under ``blocks.0.``, ``blocks.1.``, …: one list per block, in order.

    A target outside every block (an embedding, ``lm_head``) raises TargetError: block-by-block
    calibration has no inputs for it.
    """
    per_block: list[list[str]] = [[] for _ in range(count)]
    for name in names:
        rest = name[len(blocks) + 1:] if name.startswith(blocks + ".") else ""
        index = rest.split(".", 1)[0]
        if not index.isdigit() or int(index) >= count:
            raise TargetError(
                f"target '{name}' lies outside the decoder blocks ({blocks}.N.…): block-by-block calibration "
                "compresses layers inside the blocks only; leave it out of the targets"
            )
        per_block[int(index)].append(name)
    return per_block


# ------------------------------------------------------------------------ the cached inputs


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (macOS, musl, Windows)."""
    if sys.platform != "linux":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_freed_memory() -> None:
    """Hand the heap memory that freed tensors left behind back to the OS (glibc's malloc_trim).

    glibc keeps freed blocks below its mmap threshold (which grows up to 32 MB) in the heap, so the
    resident set of a CPU run would carry the freed activations, batch Grams and factorization
    temporaries of every layer before. Called between phases and layers; a no-op elsewhere.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class _Captured(Exception):
    """Raised by the capture hook to stop the forward pass at the first block."""


def _is_cache(value: object) -> bool:
    if "transformers" not in sys.modules:
        return False
    from transformers.cache_utils import Cache

    return isinstance(value, Cache)


def _detached(value: object) -> object:
    """The argument as the block should get it again: tensors detached, KV caches dropped."""
    if isinstance(value, Tensor):
        return value.detach()
    if _is_cache(value):
        return None
    if isinstance(value, tuple | list):
        return type(value)(_detached(v) for v in value)
    if isinstance(value, dict):
        return {k: (False if k == "use_cache" else _detached(v)) for k, v in value.items()}
    return value


def _reuse(new: object, old: object) -> object:
    """``new`` with every tensor equal to its counterpart in ``old`` replaced by that one, so that
    arguments equal across batches (masks, rotary embeddings) are stored once."""
    if isinstance(new, Tensor):
        same = (
            isinstance(old, Tensor) and new.shape == old.shape and new.dtype == old.dtype
            and new.device == old.device and torch.equal(new, old)
        )
        return old if same else new
    if isinstance(new, tuple | list) and type(old) is type(new) and len(old) == len(new):
        return type(new)(_reuse(a, b) for a, b in zip(new, old))
    if isinstance(new, dict) and isinstance(old, dict):
        return {k: _reuse(v, old.get(k)) for k, v in new.items()}
    return new


def _tensors(value: object) -> Iterable[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


@dataclass
class BlockInputs:
    """What the current block receives for each calibration batch: the hidden states (replaced by
    the block's outputs as the blocks are passed), and the other arguments, which all blocks share."""

    hidden: list[Tensor] = field(default_factory=list)
    args: list[tuple] = field(default_factory=list)
    kwargs: list[dict] = field(default_factory=list)
    hidden_key: str | None = None  # the keyword the hidden states came as; None: first positional

    def __len__(self) -> int:
        return len(self.hidden)

    def run(self, block: nn.Module, j: int) -> Tensor:
        """The block's output (its hidden states) on batch j."""
        if self.hidden_key is None:
            out = block(self.hidden[j], *self.args[j], **self.kwargs[j])
        else:
            out = block(*self.args[j], **{self.hidden_key: self.hidden[j]}, **self.kwargs[j])
        return out[0] if isinstance(out, tuple | list) else out

    def hidden_nbytes(self) -> int:
        return sum(h.numel() * h.element_size() for h in self.hidden)

    def context_nbytes(self) -> int:
        """Bytes of the distinct tensors among the other arguments."""
        seen = {id(t): t for t in _tensors((self.args, self.kwargs))}
        return sum(t.numel() * t.element_size() for t in seen.values())

    def tokens(self) -> int:
        return sum(h.numel() // h.shape[-1] for h in self.hidden)


@contextmanager
def _without_kv_cache(model: nn.Module):
    """The model's config.use_cache off while calibrating: no KV cache is built, and none is replayed."""
    config = getattr(model, "config", None)
    saved = getattr(config, "use_cache", None)
    if saved is not None:
        config.use_cache = False
    try:
        yield
    finally:
        if saved is not None:
            config.use_cache = saved


def capture_block_inputs(model: nn.Module, block: nn.Module, batches: Iterable, loss_fn: LossFn) -> BlockInputs:
    """Run ``loss_fn(model, batch)`` for each batch up to ``block`` and record what the block gets.

    The forward pass stops at the block (a pre-hook raises), so nothing above it runs. KV caches
    among the arguments are dropped and ``use_cache`` is set to False; tensors equal to the
    previous batch's (the attention mask, position ids, rotary embeddings of same-length batches)
    are stored once.
    """
    inputs = BlockInputs()

    def grab(module: nn.Module, args: tuple, kwargs: dict) -> None:
        if args:
            hidden, rest, named = args[0], _detached(args[1:]), _detached(kwargs)
        else:
            inputs.hidden_key = "hidden_states"
            hidden, rest = kwargs["hidden_states"], ()
            named = _detached({k: v for k, v in kwargs.items() if k != "hidden_states"})
        if inputs.hidden:
            rest, named = _reuse(rest, inputs.args[-1]), _reuse(named, inputs.kwargs[-1])
        inputs.hidden.append(hidden.detach())
        inputs.args.append(rest)
        inputs.kwargs.append(named)
        raise _Captured

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in batches:
                try:
                    loss_fn(model, batch)
                except _Captured:
                    continue
                raise RuntimeError("the model's forward pass never reached its first decoder block")
    finally:
        handle.remove()
    return inputs


# ------------------------------------------------------------------------------ the estimate


@dataclass
class MemoryEstimate:
    """Bytes beyond the model that block-by-block calibration holds at its peak."""

    statistics: int  # the largest block's float64 statistics (one Gram + |x| sum per distinct input)
    activations: int  # the cached hidden states of every calibration token, in the model's dtype
    arguments: int  # the cached block arguments (masks, rotary embeddings), distinct tensors once
    fisher: int  # every target's Fisher rows (float64), held throughout with FWSVD
    factorization: int  # whitening's float64 working set on the largest target (see _factorization_nbytes)
    distinct_inputs: int  # Grams in the largest block
    block_targets: int  # targets in the largest block

    @property
    def total(self) -> int:
        return self.statistics + self.activations + self.arguments + self.fisher + self.factorization

    def describe(self) -> str:
        return (
            f"{_size(self.total)} beyond the model: one block's statistics {_size(self.statistics)} "
            f"(float64, {self.distinct_inputs} distinct inputs for {self.block_targets} targets) + cached "
            f"activations {_size(self.activations)} + block arguments {_size(self.arguments)}"
            + (f" + Fisher rows {_size(self.fisher)}" if self.fisher else "")
            + f" + factorizing one layer ≈ {_size(self.factorization)}"
        )


def _size(nbytes: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def _factorization_nbytes(model: nn.Module, names: Iterable[str]) -> int:
    """Whitening's float64 working set on the largest target (W: out×in, k = min(out, in)), the
    largest of its phases: the damped Gram and its Cholesky factor C (2·in² + out·in with W);
    C, W, W·C and the k×k Gram of the SVD (in² + 2·out·in + 2·k²); C, W and the residual
    W − A·B (in² + 3·out·in)."""
    total = 0
    for name in names:
        o, i = linear_weight(model.get_submodule(name))[0].shape
        k = min(o, i)
        total = max(total, 8 * max(2 * i * i + o * i, i * i + 2 * o * i + 2 * k * k, i * i + 3 * o * i))
    return total


# -------------------------------------------------------------------------------- the flow


def compress_blockwise(
    model: nn.Module,
    targets: Iterable[str],
    rank: int | Mapping[str, int],
    *,
    batches: Sequence,
    loss_fn: LossFn,
    method: str | Factorizer,
    sequential: bool = False,
    fisher: bool = False,
    allow_full_rank: bool = False,
    blocks: str | None = None,
) -> CompressionReport:
    """Calibrate and compress the targets one decoder block at a time (see the module docstring).

    Same arguments and result as ``compress_with_calibration``; ``rank`` is one rank or a
    {pattern or layer name: rank} mapping. ``blocks`` names the ModuleList of decoder blocks
    (default: ``decoder_blocks(model)``); every target must lie inside one of them.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("compress_blockwise needs at least one calibration batch")
    plan = plan_compression(model, targets, rank, symmetric=False, allow_full_rank=allow_full_rank)
    blocks = decoder_blocks(model) if blocks is None else blocks
    layers = model.get_submodule(blocks)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    names = sorted((name for name, *_ in plan), key=order.__getitem__)
    per_block = targets_by_block(names, blocks, len(layers))
    ranks = {name: r for name, _, r, _ in plan}  # validated: each block's layers get exactly these
    del plan  # it holds the dense layers, which must go as they are replaced

    was_training = model.training
    model.eval()
    report = CompressionReport()
    try:
        with _without_kv_cache(model):
            fisher_rows = collect_fisher(model, names, batches, loss_fn) if fisher else {}
            inputs = capture_block_inputs(model, layers[0], batches, loss_fn)
            groups = [
                shared_input_groups(model, block_names, lambda block=block: inputs.run(block, 0)) if block_names else []
                for block, block_names in zip(layers, per_block)
            ]
            _release_freed_memory()
            estimate = estimate_memory(model, per_block, groups, inputs, fisher_rows)
            log.info(
                "calibration: %d batches (%d tokens), %d target layers in %d stage(s), one decoder block (%s.N) at a "
                "time%s; peak memory estimate %s",
                len(batches), inputs.tokens(), len(names), sum(1 for b in per_block if b), blocks,
                ", each calibrated on the compressed blocks before it" if sequential else "", estimate.describe(),
            )
            report.memory_estimate = estimate.total
            with Progress("calibrating and compressing", len(layers), "blocks", log, rate_unit="tokens") as p:
                for block, block_names, block_groups in zip(layers, per_block, groups):
                    report.layers += _compress_block(
                        model, block, block_names, block_groups, inputs, ranks, fisher_rows, method=method,
                        sequential=sequential, allow_full_rank=allow_full_rank,
                    ).layers
                    _release_freed_memory()
                    p.update(1, inputs.tokens())
    finally:
        model.train(was_training)
    return report


def _compress_block(
    model: nn.Module, block: nn.Module, names: list[str], groups: list[list[str]], inputs: BlockInputs,
    ranks: Mapping[str, int], fisher_rows: Mapping[str, Tensor], *, method, sequential: bool, allow_full_rank: bool,
) -> CompressionReport:
    """Collect one block's statistics on ``inputs``, compress its targets, and move ``inputs`` on to
    the next block (the dense outputs, or with ``sequential`` the compressed block's)."""
    with torch.no_grad():
        if not names:
            for j in range(len(inputs)):
                inputs.hidden[j] = inputs.run(block, j)
            return CompressionReport()
        collector = StatsCollector(model, names, groups=groups)
        with collector:
            for j in range(len(inputs)):
                out = inputs.run(block, j)
                if not sequential:
                    inputs.hidden[j] = out
                del out
        stats: dict[str, LayerStats] = collector.stats
        del collector
        _release_freed_memory()  # the block's forward temporaries, before the factorizations' working sets
        report = CompressionReport()
        for name in names:  # one layer at a time: its dense weight and its working set are freed before the next
            stats[name].fisher = fisher_rows.get(name)
            report.layers += compress_model(
                model, [name], {name: ranks[name]}, method=method, allow_full_rank=allow_full_rank,
                calibration={name: stats.pop(name)},
            ).layers
            _release_freed_memory()
        if sequential:
            for j in range(len(inputs)):
                inputs.hidden[j] = inputs.run(block, j)
    return report


def estimate_memory(
    model: nn.Module, per_block: Sequence[Sequence[str]], groups: Sequence[Sequence[Sequence[str]]],
    inputs: BlockInputs, fisher_rows: Mapping[str, Tensor],
) -> MemoryEstimate:
    """The peak extra memory of block-by-block calibration, from shapes (see MemoryEstimate)."""
    sizes = [
        (stats_nbytes(model, names, groups=g), len(g), len(names)) for names, g in zip(per_block, groups) if names
    ]
    statistics, distinct, count = max(sizes, default=(0, 0, 0))
    return MemoryEstimate(
        statistics=statistics,
        activations=inputs.hidden_nbytes(),
        arguments=inputs.context_nbytes(),
        fisher=sum(t.numel() * t.element_size() for t in fisher_rows.values()),
        factorization=_factorization_nbytes(model, [n for names in per_block for n in names]),
        distinct_inputs=distinct,
        block_targets=count,
    )

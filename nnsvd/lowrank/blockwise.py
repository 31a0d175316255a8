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

import copy
import ctypes
import ctypes.util
import functools
import logging
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
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
from nnsvd.lowrank.compensate import PairedGrams, alternate
from nnsvd.lowrank.factorize import Factorizer, work_device
from nnsvd.lowrank.layers import linear_weight
from nnsvd.lowrank.progress import Progress
from nnsvd.lowrank.report import CompressionReport
from nnsvd.lowrank.stats_store import StatisticsStore
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
        return self.run_on(block, self.hidden[j], j)

    def run_on(self, block: nn.Module, hidden: Tensor, j: int) -> Tensor:
        """The block's output on ``hidden`` with batch j's other arguments (no KV cache among them)."""
        if self.hidden_key is None:
            out = block(hidden, *self.args[j], **self.kwargs[j])
        else:
            out = block(*self.args[j], **{self.hidden_key: hidden}, **self.kwargs[j])
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
    update: int = 0  # compress.update=block: the dense stream and its outputs beside the compressed one, + autograd

    @property
    def total(self) -> int:
        return self.statistics + self.activations + self.arguments + self.fisher + self.factorization + self.update

    def describe(self) -> str:
        return (
            f"{_size(self.total)} beyond the model: one block's statistics {_size(self.statistics)} "
            f"(float64, {self.distinct_inputs} distinct inputs for {self.block_targets} targets) + cached "
            f"activations {_size(self.activations)} + block arguments {_size(self.arguments)}"
            + (f" + Fisher rows {_size(self.fisher)}" if self.fisher else "")
            + f" + factorizing one layer ≈ {_size(self.factorization)}"
            + (f" + block-wise reconstruction (dense stream, its outputs, one batch's gradients) {_size(self.update)}"
               if self.update else "")
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


@dataclass(frozen=True)
class BlockUpdate:
    """Block-wise reconstruction after the closed form (``compress.update=block``).

    Adam on the block's factors only, minimizing the block-output error
    ‖block_c(h̃) − block_d(h)‖² / ‖block_d(h)‖² over the training batches, where h is the dense
    stream's input to the block and h̃ the compressed stream's (BRECQ's and OmniQuant's objective
    for quantization). ``holdout`` of the calibration batches (the last ones) are left out of the
    training and scored every ``eval_every`` steps; the best iterate on them is kept, so a block
    never ends worse on held-out tokens than its closed form. ``steps=0`` leaves the closed form.
    """

    steps: int = 32
    lr: float = 1e-4
    holdout: float = 0.25
    eval_every: int = 8
    kind: str = "block"  # or "alternating": closed-form A/B updates per layer (see compensate_block)

    def split(self, count: int) -> tuple[list[int], list[int]]:
        """(training, held-out) batch indices: the last ⌈holdout·count⌉ batches held out."""
        held = min(count - 1, max(1, round(self.holdout * count))) if self.holdout > 0 else 0
        return list(range(count - held)), list(range(count - held, count))


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
    store: StatisticsStore | None = None,
    update: BlockUpdate | None = None,
) -> CompressionReport:
    """Calibrate and compress the targets one decoder block at a time (see the module docstring).

    Same arguments and result as ``compress_with_calibration``; ``rank`` is one rank or a
    {pattern or layer name: rank} mapping. ``blocks`` names the ModuleList of decoder blocks
    (default: ``decoder_blocks(model)``); every target must lie inside one of them.

    ``store`` keeps the dense model's statistics (and Fisher rows) on disk, keyed by the caller:
    where it holds every block's, no forward pass runs at all. It is read and written only where
    the statistics are the dense stream's (not ``sequential``). ``update`` trains each block's
    factors after its closed form (see BlockUpdate); it runs both streams, the dense and the
    compressed, and records per block the held-out error before and after in ``report.blocks``.
    """
    batches = list(batches)
    if not batches:
        raise ValueError("compress_blockwise needs at least one calibration batch")
    plan = plan_compression(model, targets, rank, symmetric=False, allow_full_rank=allow_full_rank)
    blocks, layers, names, per_block = _targets_in_blocks(model, [name for name, *_ in plan], blocks)
    ranks = {name: r for name, _, r, _ in plan}  # validated: each block's layers get exactly these
    del plan  # it holds the dense layers, which must go as they are replaced
    if update is not None and update.steps > 0 and update.split(len(batches))[1] == []:
        raise ValueError(f"block-wise reconstruction holds out calibration batches: it needs ≥ 2, got {len(batches)}")
    dense_stats = not sequential and store is not None
    parts = _parts(per_block)

    was_training = model.training
    model.eval()
    report = CompressionReport()
    try:
        with _without_kv_cache(model):
            fisher_rows = _fisher(model, names, batches, loss_fn, store) if fisher else {}
            if dense_stats and update is None and all(store.has(part) for part in parts.values()):
                return _compress_from_store(model, per_block, store, ranks, fisher_rows, method=method,
                                            allow_full_rank=allow_full_rank, blocks=blocks)
            inputs = capture_block_inputs(model, layers[0], batches, loss_fn)
            groups = [
                shared_input_groups(model, block_names, lambda block=block: inputs.run(block, 0)) if block_names else []
                for block, block_names in zip(layers, per_block)
            ]
            _release_freed_memory()
            estimate = estimate_memory(model, per_block, groups, inputs, fisher_rows, update=update is not None)
            log.info(
                "calibration: %d batches (%d tokens), %d target layers in %d stage(s), one decoder block (%s.N) at a "
                "time%s%s; peak memory estimate %s",
                len(batches), inputs.tokens(), len(names), sum(1 for b in per_block if b), blocks,
                ", each calibrated on the compressed blocks before it" if sequential else "",
                (f", then {update.steps} Adam steps per block on its output error" if update.kind == "block" else
                 f", then {update.steps} rounds of alternating A/B updates per layer") if update else "",
                estimate.describe(),
            )
            report.memory_estimate = estimate.total
            dense_hidden = list(inputs.hidden) if update is not None else None  # the dense stream (shared at first)
            with Progress("calibrating and compressing", len(layers), "blocks", log, rate_unit="tokens") as p:
                for k, (block, block_names, block_groups) in enumerate(zip(layers, per_block, groups)):
                    part = parts.get(k) if dense_stats else None
                    block_report, report_block = _compress_block(
                        model, block, block_names, block_groups, inputs, ranks, fisher_rows, method=method,
                        sequential=sequential, allow_full_rank=allow_full_rank, dense_hidden=dense_hidden,
                        update=update, store=store if part else None, part=part,
                    )
                    report.layers += block_report.layers
                    if report_block is not None:
                        report.blocks.append({"block": k, **report_block})
                    _release_freed_memory()
                    p.update(1, inputs.tokens())
    finally:
        model.train(was_training)
    return report


def _fisher(model: nn.Module, names: list[str], batches: list, loss_fn: LossFn, store) -> dict[str, Tensor]:
    """Every target's Fisher rows: from the store where it has them, else one backward pass per batch."""
    if store is not None and store.has_fisher():
        rows = store.load_fisher()
        if set(rows) == set(names):
            log.info("Fisher rows from the statistics cache %s", store.root)
            return rows
    rows = collect_fisher(model, names, batches, loss_fn)
    if store is not None:
        store.save_fisher(rows)
    return rows


def _compress_from_store(
    model: nn.Module, per_block: list[list[str]], store: StatisticsStore, ranks: Mapping[str, int],
    fisher_rows: Mapping[str, Tensor], *, method, allow_full_rank: bool, blocks: str,
) -> CompressionReport:
    """Every block's dense statistics from the store, one block at a time: no forward pass."""
    log.info("calibration statistics of %d target layers from the cache %s (one decoder block, %s.N, at a time)",
             sum(map(len, per_block)), store.root, blocks)
    report = CompressionReport()
    nbytes = 0
    parts = _parts(per_block)
    with Progress("compressing from cached statistics", len(per_block), "blocks", log) as p:
        for k, block_names in enumerate(per_block):
            if block_names:
                device = work_device(linear_weight(model.get_submodule(block_names[0]))[0])
                stats = store.load(parts[k], device=device)
                nbytes = max(nbytes, sum({id(s.inputs): s.gram.numel() * 8 for s in stats.values()}.values()))
                report.layers += _factorize_layers(model, block_names, stats, ranks, fisher_rows, method=method,
                                                   allow_full_rank=allow_full_rank).layers
            p.update(1)
    report.memory_estimate = nbytes + _factorization_nbytes(model, [n for names in per_block for n in names])
    return report


def dense_block_statistics(
    model: nn.Module, names: Sequence[str], batches: Sequence, loss_fn: LossFn, *, fisher: bool = False,
    blocks: str | None = None, store: StatisticsStore | None = None,
) -> dict[str, LayerStats]:
    """Every target's statistics on the dense model, collected one decoder block at a time (the
    statistics ``compress_blockwise`` compresses from), held all at once: what an allocation that
    reads every layer's spectrum needs. From ``store`` where it holds them; written to it otherwise."""
    batches = list(batches)
    blocks, layers, names, per_block = _targets_in_blocks(model, names, blocks)
    parts = _parts(per_block)
    was_training = model.training
    model.eval()
    try:
        with _without_kv_cache(model):
            fisher_rows = _fisher(model, names, batches, loss_fn, store) if fisher else {}
            stats: dict[str, LayerStats] = {}
            if store is not None and all(store.has(part) for part in parts.values()):
                log.info("calibration statistics of %d target layers from the cache %s", len(names), store.root)
                for part in parts.values():
                    stats.update(store.load(part))
            else:
                inputs = capture_block_inputs(model, layers[0], batches, loss_fn)
                with torch.no_grad(), Progress("collecting statistics", len(layers), "blocks", log) as p:
                    for k, (block, block_names) in enumerate(zip(layers, per_block)):
                        if block_names:
                            groups = shared_input_groups(model, block_names, lambda block=block: inputs.run(block, 0))
                            block_stats = _collect(model, block, block_names, groups, inputs, advance=True)
                            if store is not None:
                                store.save(parts[k], block_stats)
                            stats.update(block_stats)
                        else:
                            for j in range(len(inputs)):
                                inputs.hidden[j] = inputs.run(block, j)
                        p.update(1)
                del inputs
    finally:
        model.train(was_training)
    for name in stats:
        stats[name].fisher = fisher_rows.get(name)
    return {name: stats[name] for name in names}


def _compress_block(
    model: nn.Module, block: nn.Module, names: list[str], groups: list[list[str]], inputs: BlockInputs,
    ranks: Mapping[str, int], fisher_rows: Mapping[str, Tensor], *, method, sequential: bool, allow_full_rank: bool,
    dense_hidden: list[Tensor] | None = None, update: BlockUpdate | None = None,
    store: StatisticsStore | None = None, part: str | None = None,
) -> tuple[CompressionReport, dict | None]:
    """Collect one block's statistics, compress its targets, optionally train its factors on the
    block-output error, and move the streams on to the next block.

    ``inputs.hidden`` is the stream the next block reads: the dense one (the default), or with
    ``sequential`` the compressed one. With ``update``, ``dense_hidden`` carries the dense stream
    beside it (statistics from it unless ``sequential``) and ``inputs.hidden`` is the compressed one.
    """
    count = len(inputs)
    two_streams = dense_hidden is not None
    with torch.no_grad():
        if not names:
            for j in range(count):
                inputs.hidden[j] = inputs.run(block, j)
                if two_streams:
                    dense_hidden[j] = inputs.run_on(block, dense_hidden[j], j)
            return CompressionReport(), None
        dense_out: list[Tensor] = []
        if two_streams:
            # the dense block's outputs on the dense stream: the targets of the update, the next dense inputs,
            # and (unless sequential) the statistics' stream
            collector = StatsCollector(model, names, groups=groups)
            with collector if not sequential else nullcontext():
                dense_out = [inputs.run_on(block, dense_hidden[j], j) for j in range(count)]
            stats: dict[str, LayerStats] = collector.stats
            del collector
        if not two_streams or sequential:
            stats = _collect(model, block, names, groups, inputs, advance=not sequential)
        if store is not None and part is not None:
            store.save(part, stats)
        _release_freed_memory()  # the block's forward temporaries, before the factorizations' working sets
        alternating = update is not None and update.kind == "alternating"
        relative = _relative_names(block, [model.get_submodule(n) for n in names]) if alternating else []
        dense_block = copy.deepcopy(block) if alternating else None  # the dense layers' inputs, beside the compressed
        report = _factorize_layers(model, names, stats, ranks, fisher_rows, method=method,
                                   allow_full_rank=allow_full_rank)
    record = None
    if dense_block is not None:
        layers = {rel: model.get_submodule(n) for rel, n in zip(relative, names)}
        record = compensate_block(block, dense_block, layers, inputs, dense_hidden, dense_out, update)
        del dense_block
    elif update is not None:
        record = reconstruct_block(block, [model.get_submodule(n) for n in names], inputs, dense_out, update)
    with torch.no_grad():
        if sequential or two_streams:
            for j in range(count):
                inputs.hidden[j] = inputs.run(block, j)
        if two_streams:
            for j in range(count):
                dense_hidden[j] = dense_out[j]
    return report, record


def _factorize_layers(
    model: nn.Module, names: Sequence[str], stats: dict[str, LayerStats], ranks: Mapping[str, int],
    fisher_rows: Mapping[str, Tensor], *, method, allow_full_rank: bool,
) -> CompressionReport:
    """Compress the named layers from their statistics, one layer at a time: each layer's dense
    weight, statistics and working set are freed before the next (``stats`` is emptied)."""
    report = CompressionReport()
    for name in names:
        stats[name].fisher = fisher_rows.get(name)
        report.layers += compress_model(
            model, [name], {name: ranks[name]}, method=method, allow_full_rank=allow_full_rank,
            calibration={name: stats.pop(name)},
        ).layers
        _release_freed_memory()
    return report


def _targets_in_blocks(
    model: nn.Module, names: Iterable[str], blocks: str | None
) -> tuple[str, nn.ModuleList, list[str], list[list[str]]]:
    """(the blocks' name, the blocks, the target names in model order, the targets of each block)."""
    blocks = decoder_blocks(model) if blocks is None else blocks
    layers = model.get_submodule(blocks)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    names = sorted(names, key=order.__getitem__)
    return blocks, layers, names, targets_by_block(names, blocks, len(layers))


def _parts(per_block: Sequence[Sequence[str]]) -> dict[int, str]:
    """{block index: its StatisticsStore part name} of the blocks that hold targets."""
    return {k: f"block{k}" for k, names in enumerate(per_block) if names}


def _collect(
    model: nn.Module, block: nn.Module, names: Sequence[str], groups: Sequence[Sequence[str]], inputs: BlockInputs,
    *, advance: bool,
) -> dict[str, LayerStats]:
    """One pass of the block over ``inputs`` with the named layers' statistics collected; with
    ``advance`` each input is replaced by the block's output (the next block's input)."""
    collector = StatsCollector(model, names, groups=groups)
    with collector:
        for j in range(len(inputs)):
            out = inputs.run(block, j)
            if advance:
                inputs.hidden[j] = out
            del out
    return collector.stats


def _relative_error(block: nn.Module, inputs: BlockInputs, targets: Sequence[Tensor], indices: Sequence[int]) -> float:
    """Σ_j ‖block(h̃_j) − y_j‖² / Σ_j ‖y_j‖² over the batches ``indices``, in float64."""
    err = norm = 0.0
    with torch.no_grad():
        for j in indices:
            out = inputs.run(block, j)
            err += float((out.double() - targets[j].double()).square().sum())
            norm += float(targets[j].double().square().sum())
    return err / max(norm, 1e-300)


def reconstruct_block(
    block: nn.Module, factorized: Sequence[nn.Module], inputs: BlockInputs, targets: Sequence[Tensor],
    update: BlockUpdate,
) -> dict:
    """Train the factors of ``factorized`` (the block's compressed layers) with Adam on the block's
    relative output error ‖block(h̃) − y‖²/‖y‖² over the training batches; keep the iterate that is
    best on the held-out batches (the closed form is step 0, so the result is never worse there).

    Returns the record: held-out error at the start and at the best step, that step, and the
    training loss of the first and last steps.
    """
    train, held = update.split(len(inputs))
    start = _relative_error(block, inputs, targets, held) if held else None
    out = {"holdout_start": start, "holdout_best": start, "best_step": 0, "steps": update.steps,
           "train_first": None, "train_last": None}
    if update.steps <= 0 or not held:
        return out
    params = [p for module in factorized for p in module.parameters()]
    saved = {p: p.requires_grad for p in block.parameters()}
    for p in block.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    best = [p.detach().clone() for p in params]
    optimizer = torch.optim.Adam(params, lr=update.lr)
    try:
        with torch.enable_grad():
            for step in range(1, update.steps + 1):
                j = train[(step - 1) % len(train)]
                y = targets[j]
                loss = (inputs.run(block, j) - y).square().sum() / y.square().sum().clamp_min(1e-30)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                value = float(loss.detach())
                if not math.isfinite(value):
                    log.warning("block-wise reconstruction diverged at step %d (loss %s): keeping step %d",
                                step, value, out["best_step"])
                    break
                out["train_first"] = value if out["train_first"] is None else out["train_first"]
                out["train_last"] = value
                if step % update.eval_every == 0 or step == update.steps:
                    held_err = _relative_error(block, inputs, targets, held)
                    if held_err < out["holdout_best"]:
                        out["holdout_best"], out["best_step"] = held_err, step
                        best = [p.detach().clone() for p in params]
    finally:
        with torch.no_grad():
            for p, b in zip(params, best):
                p.copy_(b)
        for p, flag in saved.items():
            p.requires_grad_(flag)
            p.grad = None
    log.info("block-wise reconstruction: held-out output error %.4g → %.4g (best at step %d of %d; training loss "
             "%.4g → %.4g)", out["holdout_start"], out["holdout_best"], out["best_step"], update.steps,
             out["train_first"] or float("nan"), out["train_last"] or float("nan"))
    return out


def _relative_names(block: nn.Module, modules: Sequence[nn.Module]) -> list[str]:
    """Each module's name inside ``block``."""
    names = {id(m): n for n, m in block.named_modules()}
    return [names[id(m)] for m in modules]


def _paired_grams(
    block: nn.Module, dense_block: nn.Module, names: Sequence[str], inputs: BlockInputs, dense_hidden: Sequence[Tensor],
    indices: Sequence[int],
) -> dict[str, PairedGrams]:
    """{layer name in the block: PairedGrams} over the batches ``indices``: each named layer's input in
    ``dense_block`` on the dense stream (X) beside its input in ``block`` on the compressed stream (X̃).
    Layers that read the same tensors (q/k/v, gate/up) share one set of sums."""
    dense_seen: dict[str, Tensor] = {}
    seen: dict[str, Tensor] = {}

    def grabber(store: dict[str, Tensor], name: str):
        def grab(module: nn.Module, args: tuple) -> None:
            store[name] = args[0].detach()
        return grab

    handles = [block.get_submodule(n).register_forward_pre_hook(grabber(seen, n)) for n in names]
    handles += [dense_block.get_submodule(n).register_forward_pre_hook(grabber(dense_seen, n)) for n in names]
    grams: dict[str, PairedGrams] = {}
    try:
        with torch.no_grad():
            for j in indices:
                inputs.run_on(dense_block, dense_hidden[j], j)
                inputs.run(block, j)
                owners: list[str] = []  # the first layer of each distinct (X, X̃) pair in this batch
                for n in names:
                    owner = next((o for o in owners if dense_seen[o] is dense_seen[n] and seen[o] is seen[n]), None)
                    if owner is None:
                        owners.append(n)
                        if n not in grams:
                            grams[n] = PairedGrams.zeros(dense_seen[n].shape[-1], dense_seen[n].device)
                        grams[n].add(dense_seen[n], seen[n])
                    else:
                        grams.setdefault(n, grams[owner])
                dense_seen.clear()
                seen.clear()
    finally:
        for h in handles:
            h.remove()
    return grams


def _input_groups(
    block: nn.Module, dense_block: nn.Module, names: Sequence[str], inputs: BlockInputs, dense_hidden: Sequence[Tensor],
    j: int,
) -> list[list[str]]:
    """The named layers grouped by the input they share (q/k/v, gate/up), in the order the block runs them."""
    order: list[str] = []
    hooks = [block.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: order.append(n)) for n in names]
    try:
        with torch.no_grad():
            inputs.run(block, j)
    finally:
        for h in hooks:
            h.remove()
    grams = _paired_grams(block, dense_block, names, inputs, dense_hidden, [j])
    groups: dict[int, list[str]] = {}
    for n in dict.fromkeys(order):
        groups.setdefault(id(grams[n]), []).append(n)
    return list(groups.values())


def compensate_block(
    block: nn.Module, dense_block: nn.Module, layers: Mapping[str, nn.Module], inputs: BlockInputs,
    dense_hidden: Sequence[Tensor], targets: Sequence[Tensor], update: BlockUpdate,
) -> dict:
    """Alternating closed-form updates of each compressed layer's A and B (``compress.update=alternating``,
    after AdaSVD): per layer, ``update.steps`` rounds minimizing ‖X·Wᵀ − X̃·(AB)ᵀ‖² from the block's
    training batches, where X is the layer's input in the dense block on the dense stream and X̃ its input in
    the compressed block on the compressed stream (nnsvd.lowrank.compensate). Each layer keeps its round that
    is best on the held-out batches; then, if the block's held-out output error ‖block(h̃) − y‖²/‖y‖² is
    higher than its closed form's, the closed form is put back, so a block never ends worse there.

    The layers are updated group by group in the order the block runs them (q/k/v, then o, …), each group
    from statistics taken after the groups before it changed: what it is fitted on is what it then reads.
    Returns the record of ``reconstruct_block``'s form (without the training losses, which would cost two
    more passes over the training batches), plus each layer's best round.
    """
    train, held = update.split(len(inputs))
    start = _relative_error(block, inputs, targets, held) if held else None
    out = {"holdout_start": start, "holdout_best": start, "best_step": 0, "steps": update.steps,
           "train_first": None, "train_last": None, "layers": {}}
    if update.steps <= 0 or not held:
        return out
    closed = {n: (m.A.detach().clone(), m.B.detach().clone()) for n, m in layers.items()}
    for group in _input_groups(block, dense_block, list(layers), inputs, dense_hidden, train[0]):
        # statistics after the groups before it are updated: X̃ is what this group reads now
        train_grams = _paired_grams(block, dense_block, group, inputs, dense_hidden, train)
        held_grams = _paired_grams(block, dense_block, group, inputs, dense_hidden, held)
        with torch.no_grad():
            for n in group:
                layer = layers[n]
                weight = linear_weight(dense_block.get_submodule(n))[0]
                result = alternate(weight, layer.A, layer.B, train_grams[n], held_grams[n], update.steps)
                layer.A.copy_(result.a)
                layer.B.copy_(result.b)
                out["layers"][n] = {"best_step": result.best_step, "holdout_start": result.holdout_start,
                                    "holdout_best": result.holdout_best}
        del train_grams, held_grams
    end = _relative_error(block, inputs, targets, held)
    if end > start:
        with torch.no_grad():
            for n, layer in layers.items():
                layer.A.copy_(closed[n][0])
                layer.B.copy_(closed[n][1])
        log.info("alternating update: held-out block output error %.4g → %.4g, higher: the closed form is kept",
                 start, end)
        return out
    out["holdout_best"] = end
    out["best_step"] = max(r["best_step"] for r in out["layers"].values())
    log.info("alternating update: held-out block output error %.4g → %.4g (%d rounds per layer, best rounds %s)",
             start, end, update.steps, sorted({r["best_step"] for r in out["layers"].values()}))
    return out


def estimate_memory(
    model: nn.Module, per_block: Sequence[Sequence[str]], groups: Sequence[Sequence[Sequence[str]]],
    inputs: BlockInputs, fisher_rows: Mapping[str, Tensor], *, update: bool = False,
) -> MemoryEstimate:
    """The peak extra memory of block-by-block calibration, from shapes (see MemoryEstimate)."""
    sizes = [
        (stats_nbytes(model, names, groups=g), len(g), len(names)) for names, g in zip(per_block, groups) if names
    ]
    statistics, distinct, count = max(sizes, default=(0, 0, 0))
    extra = 0
    if update and inputs.hidden:
        # two more streams of hidden states (the dense inputs and the dense block's outputs), and for one
        # batch autograd's saved inputs and outputs of every target in the largest block, with their gradients
        batch_tokens = max(h.numel() // h.shape[-1] for h in inputs.hidden)
        per_token = max((sum(sum(linear_weight(model.get_submodule(n))[0].shape) for n in names)
                         for names in per_block if names), default=0)
        extra = 2 * inputs.hidden_nbytes() + 2 * batch_tokens * per_token * inputs.hidden[0].element_size()
    return MemoryEstimate(
        statistics=statistics,
        activations=inputs.hidden_nbytes(),
        arguments=inputs.context_nbytes(),
        fisher=sum(t.numel() * t.element_size() for t in fisher_rows.values()),
        factorization=_factorization_nbytes(model, [n for names in per_block for n in names]),
        distinct_inputs=distinct,
        block_targets=count,
        update=extra,
    )

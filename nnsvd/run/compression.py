"""The compress stage of an experiment: its settings checked up front, then calibration, rank
allocation under a budget, factorization, and the record of what was done.

The math lives in ``nnsvd.lowrank``; this module reads the run's config and calls it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from nnsvd.config import (
    Allocation,
    CalibrationConfig,
    CompressConfig,
    CompressMethod,
    Config,
    SpectrumLoss,
    plain,
)
from nnsvd.data.calibration import check_calibration
from nnsvd.errors import ConfigError
from nnsvd.files import write_json_atomic
from nnsvd.lowrank import (
    SYMMETRIC,
    BlockUpdate,
    CompressionReport,
    StatisticsStore,
    collect_statistics,
    compress_blockwise,
    compress_model,
    compress_with_calibration,
    decoder_blocks,
    dense_block_statistics,
    is_data_aware,
    plan_compression,
    resolve_factorizer,
    targets_by_block,
)
from nnsvd.lowrank.allocation import (
    BudgetError,
    budget,
    check_ratio,
    kept,
    loss_allocation,
    removed_fraction,
    spectrum_allocation,
    target_shapes,
    uniform_ranks,
)
from nnsvd.lowrank.counting import param_summary
from nnsvd.lowrank.sensitivity import measure_sensitivity, sensitivity_allocation
from nnsvd.tasks.base import Task

log = logging.getLogger("nnsvd")

PLAIN_METHOD_NAMES = "auto, svd, gram, randomized"


def method_options(compress: CompressConfig) -> dict:
    """The keyword options of the configured method (compress.asvd_alpha, compress.damp)."""
    options = {CompressMethod.asvd: {"alpha": compress.asvd_alpha}, CompressMethod.whiten: {"damp": compress.damp}}
    return options.get(compress.method, {})


def factorizer(compress: CompressConfig):
    """The configured method with its options bound."""
    return resolve_factorizer(compress.method.value, **method_options(compress))


def data_aware(compress: CompressConfig) -> bool:
    """Whether the configured method calibrates on data (asvd, whiten, fwsvd)."""
    return is_data_aware(compress.method.value)


def allocated(compress: CompressConfig) -> bool:
    """Whether a ratio is shared out by reading the model (any allocation but uniform)."""
    return compress.ratio is not None and compress.allocation != Allocation.uniform


def wants_fisher(compress: CompressConfig, calibration: CalibrationConfig) -> bool:
    """calibration.fisher, where null means: when the method needs it (fwsvd)."""
    fisher = calibration.fisher
    return compress.method == CompressMethod.fwsvd if fisher is None else bool(fisher)


def needs_calibration(compress: CompressConfig, flow: str) -> bool:
    """Whether the compress stage needs calibration batches: a data-aware method, or sensitivity allocation."""
    sensitivity = compress.ratio is not None and compress.allocation == Allocation.sensitivity
    return flow == "compress" and (data_aware(compress) or sensitivity)


def check_size(rank: int | None, comp: CompressConfig, flow: str) -> None:
    """rank and compress.ratio are two ways to size the factors: exactly one for compress and scratch."""
    ratio, allocation = comp.ratio, comp.allocation
    if rank is not None and ratio is not None:
        raise ConfigError(
            f"rank={rank} and compress.ratio={ratio} both size the factors; give one: rank=R for one rank "
            "everywhere, or compress.ratio=F for the fraction of the target weights to remove"
        )
    if ratio is not None:
        check_ratio(ratio)
        if allocation != Allocation.uniform and flow == "scratch":
            raise ConfigError(
                f"compress.allocation={allocation.value} reads a trained model's weights, but mode=scratch trains "
                "from random init; use compress.allocation=uniform"
            )
    elif allocation != Allocation.uniform:
        raise ConfigError(
            f"compress.allocation={allocation.value} shares out a parameter budget: set compress.ratio=F "
            f"(e.g. compress.ratio=0.4) instead of rank={rank}, or use compress.allocation=uniform"
        )


def check_compression(
    config: Config, flow: str, task: Task, model: nn.Module, targets: list[str], symmetric: bool
) -> int | dict[str, int] | None:
    """One-line ConfigErrors for compression settings that cannot work, before any data or training.

    Returns the ranks known now: the rank, or a uniform allocation's per-layer ranks (which
    mode=scratch needs); None when the allocation reads the trained weights later.
    """
    comp, cal = config.compress, config.calibration
    full = comp.allow_full_rank
    check_size(config.rank, comp, flow)
    if comp.ratio is None:
        ranks = config.rank
        plan = plan_compression(model, targets, ranks, symmetric=symmetric, allow_full_rank=full)
    else:
        plan = plan_compression(model, targets, 1, symmetric=symmetric, allow_full_rank=full)
        if any(form == SYMMETRIC for *_, form in plan):
            raise ConfigError(
                "compress.ratio budgets the plain two-factor form, but regularizer.symmetric=true ties square "
                "targets; use rank=R with the symmetric regularizer, or regularizer.symmetric=false"
            )
        shapes = target_shapes(model, targets)
        ranks = uniform_ranks(shapes, comp.ratio)
        if kept(shapes, ranks) > budget(shapes, comp.ratio):
            raise BudgetError(
                f"compress.ratio={comp.ratio} removes more than rank 1 everywhere does "
                f"({removed_fraction(shapes, dict.fromkeys(shapes, 1)):.3f}); lower compress.ratio"
            )
        if comp.allocation != Allocation.uniform:
            ranks = None
    check_method(comp, cal, flow, plan)
    check_sensitivity(comp, task)
    check_update(comp, cal, flow, task)
    if flow == "compress" and data_aware(comp) and task.calibrates_by_block:
        # block by block compresses the layers inside the decoder blocks only: one line otherwise
        blocks = decoder_blocks(model)
        targets_by_block([name for name, *_ in plan], blocks, len(model.get_submodule(blocks)))
    del plan  # it holds the dense target layers: kept, they would outlive their compression
    return ranks


def check_update(comp: CompressConfig, cal: CalibrationConfig, flow: str, task: Task) -> None:
    """compress.update and its settings: block-wise reconstruction of a language model's calibrated factors."""
    if comp.update is None:
        return
    update = comp.update.value
    if flow != "compress":
        raise ConfigError(f"compress.update={update} updates the factors of a compressed model: use mode=compress")
    if not task.calibrates_by_block:
        raise ConfigError(
            f"compress.update={update} trains each decoder block's factors against the dense block's output: "
            "it needs a language model (model=gpt2, model=causal_lm, model=smollm2); use compress.update=null"
        )
    if not data_aware(comp):
        raise ConfigError(
            f"compress.update={update} starts from a calibrated closed form: use a data-aware compress.method "
            f"(whiten, asvd, fwsvd), not {comp.method.value}"
        )
    if comp.update_steps < 0:
        raise ConfigError(f"compress.update_steps={comp.update_steps} must be ≥ 0 (0 keeps the closed form)")
    if not comp.update_lr > 0:
        raise ConfigError(f"compress.update_lr={comp.update_lr} must be > 0")
    if not 0 < comp.update_holdout < 1:
        raise ConfigError(
            f"compress.update_holdout={comp.update_holdout} must lie in (0, 1): the fraction of the calibration "
            "batches held out of the update, on which its best step is chosen"
        )
    if comp.update_eval_every < 1:
        raise ConfigError(f"compress.update_eval_every={comp.update_eval_every} must be ≥ 1")
    count = -(-cal.samples // cal.batch_size)
    if comp.update_steps > 0 and count < 2:
        raise ConfigError(
            f"compress.update={update} holds out calibration batches, but calibration.samples="
            f"{cal.samples} with calibration.batch_size={cal.batch_size} makes {count}; make at least 2 "
            "(raise calibration.samples or lower calibration.batch_size)"
        )


def block_update(comp: CompressConfig) -> BlockUpdate | None:
    """The configured block-wise reconstruction, or None."""
    if comp.update is None:
        return None
    return BlockUpdate(steps=comp.update_steps, lr=comp.update_lr, holdout=comp.update_holdout,
                       eval_every=comp.update_eval_every, kind=comp.update.value)


def check_sensitivity(comp: CompressConfig, task: Task) -> None:
    """compress.sensitivity_samples and _seq_len: positive, and seq_len for language models only."""
    for key, value in (("sensitivity_samples", comp.sensitivity_samples),
                       ("sensitivity_seq_len", comp.sensitivity_seq_len)):
        if value is not None and value < 1:
            raise ConfigError(f"compress.{key}={value} must be ≥ 1, or null for all")
    if comp.sensitivity_seq_len is not None and not task.calibrates_by_block:
        raise ConfigError(
            f"compress.sensitivity_seq_len={comp.sensitivity_seq_len} cuts language-model sequences, but this "
            "model's calibration samples are not sequences; use compress.sensitivity_samples"
        )


def check_method(comp: CompressConfig, cal: CalibrationConfig, flow: str, plan: list) -> None:
    """The method against the mode, the symmetric form and its own options."""
    method = comp.method.value
    if needs_calibration(comp, "compress"):
        check_calibration(cal)
    if not data_aware(comp):
        if cal.sequential:
            log.warning("calibration.sequential=true has no effect with compress.method=%s (a plain method)", method)
        return
    if flow == "scratch":
        raise ConfigError(
            f"compress.method={method} is data-aware: it factorizes a trained model, but mode=scratch trains "
            f"factors from random init; use mode=compress, or a plain method ({PLAIN_METHOD_NAMES})"
        )
    square = [name for name, _, _, form in plan if form == SYMMETRIC]
    if square:
        raise ConfigError(
            f"compress.method={method} has no symmetric form, but regularizer.symmetric=true ties {square[0]}"
            f"{' and others' if len(square) > 1 else ''}; use regularizer.symmetric=false, or a plain method ({PLAIN_METHOD_NAMES})"
        )
    if comp.method == CompressMethod.fwsvd and cal.fisher is False:
        raise ConfigError("compress.method=fwsvd weights by the Fisher: calibration.fisher=false is not allowed (use null or true)")
    if comp.damp < 0:
        raise ConfigError(f"compress.damp={comp.damp} must be ≥ 0")
    if comp.asvd_alpha < 0:
        raise ConfigError(f"compress.asvd_alpha={comp.asvd_alpha} must be ≥ 0")


# ------------------------------------------------------------------ the stage


def compress(task: Task, model: nn.Module, config: Config, targets: list[str], symmetric: bool,
             batches: list | None, cache_dir: Path | None) -> tuple[CompressionReport, dict]:
    """Factorize the targets in place; returns the report and the record for results.json.

    Plain methods factorize the weights alone. Data-aware ones calibrate on ``batches``: a language
    model one decoder block at a time (dense, or sequential: each block sees the compressed blocks
    before it), the MLP all at once or stage by stage. A ratio is shared out as per-layer ranks
    first, from the dense model's weights, spectra or measured sensitivity; with a data-aware
    method, the spectrum and sensitivity allocations read every target's statistics at once.
    """
    comp, cal = config.compress, config.calibration
    full = comp.allow_full_rank
    method = factorizer(comp)
    shapes = target_shapes(model, targets)
    calibrated, by_ratio = data_aware(comp), allocated(comp)
    fisher = wants_fisher(comp, cal)
    update = block_update(comp)
    store = statistics_store(task, model, config, shapes, batches, cache_dir) if calibrated else None
    stats = None
    if calibrated and by_ratio and task.calibrates_by_block:
        stats = dense_block_statistics(model, list(shapes), batches, task.calibration_loss, fisher=fisher,
                                       store=store)
    elif calibrated and (by_ratio or not (cal.sequential or task.calibrates_by_block)):
        stats = collect_statistics(model, list(shapes), batches, task.calibration_loss, fisher=fisher)
    ranks = allocate(task, model, config, shapes, method, stats, batches, cache_dir)
    if not calibrated:
        report = compress_model(model, targets, ranks, symmetric=symmetric, method=method, allow_full_rank=full)
    elif cal.sequential or stats is None or update is not None:
        stats = None  # the allocation's all-at-once statistics, freed before calibrating again
        if task.calibrates_by_block:
            report = compress_blockwise(
                model, targets, ranks, batches=batches, loss_fn=task.calibration_loss, method=method,
                sequential=cal.sequential, fisher=fisher, allow_full_rank=full, store=store,
                update=update,
            )
        else:
            report = compress_with_calibration(
                model, targets, ranks, batches=batches, loss_fn=task.calibration_loss, method=method,
                sequential=cal.sequential, fisher=fisher, allow_full_rank=full,
            )
    else:
        report = compress_model(model, targets, ranks, method=method, allow_full_rank=full, calibration=stats)
    report.statistics_cached = store is not None and store.reads > 0
    return report, record(config, report, batches, shapes, model)


def statistics_store(task: Task, model: nn.Module, config: Config, shapes: Mapping, batches: list | None,
                     cache_dir: Path | None) -> StatisticsStore | None:
    """Where a language model's dense calibration statistics are kept for the other jobs of a sweep
    (cache.dir/statistics/KEY, keyed by the weights, the targets and the calibration batches), or
    None: cache.statistics=false, no cache, a model that is not calibrated block by block, or a job
    that would neither read nor write dense statistics (sequential calibration with uniform ranks and
    no Fisher), which then skips hashing the weights."""
    if cache_dir is None or not config.cache.statistics or not task.calibrates_by_block or not batches:
        return None
    comp, cal = config.compress, config.calibration
    if cal.sequential and not allocated(comp) and not wants_fisher(comp, cal):
        return None
    dtypes = sorted({str(t.dtype) for t in model.state_dict().values()})
    key = digest(model, batches, [type(task).__name__, list(shapes), dtypes, "statistics-v1"])
    return StatisticsStore(cache_dir / "statistics" / key)


def allocate(task: Task, model: nn.Module, config: Config, shapes: Mapping, method, stats, batches,
             cache_dir: Path | None) -> int | dict:
    """The rank (rank=R), or the per-layer ranks that share out compress.ratio."""
    comp = config.compress
    ratio, allocation = comp.ratio, comp.allocation
    if ratio is None:
        return config.rank
    if allocation == Allocation.uniform:
        ranks = uniform_ranks(shapes, ratio)
    elif allocation == Allocation.loss:
        ranks = loss_allocation(model, shapes, ratio, method=method, calibration=stats)
    elif allocation == Allocation.spectrum:
        ranks = spectrum_allocation(model, shapes, ratio, method=method, calibration=stats,
                                    normalized=comp.spectrum_loss == SpectrumLoss.normalized)
    else:
        measured = sensitivity(task, model, comp, shapes, method, stats, batches, cache_dir)
        ranks = sensitivity_allocation(shapes, measured, ratio)
    log.info(
        "compress.ratio=%g, allocation=%s: ranks %d–%d over %d layers; %.4f of the target weights removed",
        ratio, allocation.value, min(ranks.values()), max(ranks.values()), len(ranks), removed_fraction(shapes, ranks),
    )
    return ranks


def sensitivity(task: Task, model: nn.Module, comp: CompressConfig, shapes: Mapping, method, stats, batches,
                cache_dir: Path | None) -> dict[str, dict[int, float]]:
    """Measured loss increases per layer and rank, cached per model + calibration data + method,
    so that a sweep over ratios measures once."""
    ratios = [float(r) for r in comp.sensitivity_ratios]
    batches = measurement_batches(batches, comp.sensitivity_samples, comp.sensitivity_seq_len)
    path = None
    if cache_dir is not None:
        key = sensitivity_key(model, shapes, batches, comp, ratios)
        path = cache_dir / "sensitivity" / f"{key}.json"
        if path.is_file():
            log.info("sensitivity measurements from cache %s", path)
            return {name: {int(r): d for r, d in per.items()} for name, per in json.loads(path.read_text()).items()}
    measured = measure_sensitivity(model, shapes, batches, task.calibration_loss, method=method,
                                   calibration=stats, ratios=ratios,
                                   blocks=decoder_blocks(model) if task.calibrates_by_block else None)
    if path is not None:
        write_json_atomic(path, measured)
        log.info("sensitivity measurements cached at %s", path)
    return measured


def measurement_batches(batches: list, samples: int | None, seq_len: int | None) -> list:
    """The calibration batches that sensitivity is measured on: the first ``samples`` samples (all: None),
    each language-model sequence cut to its first ``seq_len`` tokens (whole: None).

    Every measurement is a forward pass over these, for each target and candidate ratio, so they
    set the cost of the allocation (the statistics of a data-aware method still use every batch)."""
    kept, left = [], samples
    for batch in batches:
        if left is not None and left <= 0:
            break
        if isinstance(batch, tuple | list):
            batch = tuple(t[:left] for t in batch) if left is not None else batch
            n = len(batch[0])
        else:
            batch = batch[:left, :seq_len] if left is not None else batch[:, :seq_len]
            n = len(batch)
        kept.append(batch)
        left = None if left is None else left - n
    return kept


def sensitivity_key(model: nn.Module, shapes: Mapping, batches: list, comp: CompressConfig,
                    ratios: list[float]) -> str:
    """A hash of what the measurements depend on: the weights, the targets, the calibration
    batches, the method and its options, and the candidate ratios."""
    return digest(model, batches, [list(shapes), comp.method.value, method_options(comp), ratios])


def digest(model: nn.Module, batches: list, extra: list) -> str:
    """A hash of the model's weights (names and bytes), the batches' bytes and ``extra`` (JSON)."""
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    for batch in batches:
        for t in batch if isinstance(batch, tuple | list) else (batch,):
            h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(json.dumps(extra).encode())
    return h.hexdigest()[:20]


def record(config: Config, report: CompressionReport, batches: list | None, shapes: Mapping,
           model: nn.Module) -> dict:
    """What results.json and W&B say about how the model was compressed: method, calibration, budget."""
    comp, cal = config.compress, config.calibration
    out = {"method": comp.method.value, "options": method_options(comp), "calibration": None}
    if batches is not None:
        sequences = not isinstance(batches[0], tuple | list)
        settings = plain(cal)
        out["calibration"] = {
            **{k: settings[k] for k in ("samples", "batch_size", "seed", "split", "sequential")},
            "seq_len": batches[0].shape[1] if sequences else None,  # as resolved (null: the evaluation window)
            "fisher": wants_fisher(comp, cal),
            "tokens": sum(b[0].shape[0] if isinstance(b, tuple | list) else b.numel() for b in batches),
            "by_block": report.memory_estimate is not None,
            "statistics_cached": report.statistics_cached,
            "memory_estimate_mib": None if report.memory_estimate is None else round(report.memory_estimate / 2**20, 1),
        }
    update = block_update(comp)
    out["update"] = None if update is None else {
        "method": comp.update.value, "steps": update.steps, "lr": update.lr, "holdout": update.holdout,
        "eval_every": update.eval_every, "blocks": report.blocks,
    }
    params = param_summary(model)
    out["budget"] = {
        "ratio": comp.ratio,  # requested: the fraction of the target layers' weights removed
        "allocation": comp.allocation.value if comp.ratio is not None else None,
        "spectrum_loss": comp.spectrum_loss.value if comp.ratio is not None and comp.allocation == Allocation.spectrum
        else None,
        "removed_targets": removed_fraction(shapes, report.ranks()),  # achieved, over the targets' weights
        "removed_model": 1 - params.total / params.dense_total,  # achieved, over every parameter of the model
        "ranks": report.ranks(),
    }
    return out

"""Model surgery: find the target layers, check ranks, swap in factorized layers, rebuild saved ones."""

from __future__ import annotations

import fnmatch
import logging
import time
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn

from nnsvd.lowrank.calibration import (
    LayerStats,
    LossFn,
    collect_statistics,
    restrict_groups,
    sequential_stages,
    shared_input_groups,
    stats_nbytes,
)
from nnsvd.lowrank.factorize import Factorizer, factorize_symmetric
from nnsvd.lowrank.layers import (
    LOWRANK,
    SYMMETRIC,
    FactorizedLayer,
    LowRankLinear,
    SymmetricLowRankLinear,
    is_factorizable,
    linear_weight,
)
from nnsvd.lowrank.methods import factorize, method_name, resolve_factorizer
from nnsvd.lowrank.progress import Progress
from nnsvd.lowrank.ranks import RankError, max_useful_rank, validate_rank
from nnsvd.lowrank.report import CompressionReport, LayerReport
from nnsvd.lowrank.weighted import relative_data_error

log = logging.getLogger(__name__)


class TargetError(ValueError):
    """A target pattern that matches no layer, or a symmetric request with no square target."""


def find_targets(model: nn.Module, patterns: Iterable[str]) -> list[str]:
    """Names of factorizable modules matching any glob pattern (e.g. ``transformer.h.*.mlp.c_fc``).

    Every pattern must match at least one Linear/Conv1D module.
    """
    if isinstance(patterns, str):
        patterns = [patterns]
    patterns = list(patterns)
    if not patterns:
        raise TargetError("targets is empty: name at least one layer pattern, e.g. ['l1', 'l2']")
    candidates = [n for n, m in model.named_modules() if n and is_factorizable(m)]
    names: list[str] = []
    for pattern in patterns:
        hits = [n for n in candidates if fnmatch.fnmatchcase(n, pattern)]
        done = [n for n, m in factorized_layers(model) if fnmatch.fnmatchcase(n, pattern)]
        if not hits and done:
            raise TargetError(
                f"target pattern {pattern!r} matches only layers that are already factorized ({', '.join(done[:4])}); "
                "evaluate a compressed model with rank=null"
            )
        if not hits:
            shown = ", ".join(candidates[:8]) + (" …" if len(candidates) > 8 else "")
            raise TargetError(
                f"target pattern {pattern!r} matches no Linear/Conv1D layer; layers are: {shown}"
            )
        names += [n for n in hits if n not in names]
    return names


def plan_compression(
    model: nn.Module,
    targets: Iterable[str],
    rank: int | Mapping[str, int],
    symmetric: bool,
    allow_full_rank: bool,
) -> list[tuple[str, nn.Module, int, str]]:
    """[(name, module, rank, form)] for the targets, validating every rank before any work.

    Raises TargetError for a pattern that matches nothing or symmetric with no square
    target, and RankError for a rank that is not useful for some layer.
    """
    plan, shapes = [], {}
    for name in find_targets(model, targets):
        module = model.get_submodule(name)
        W, _ = linear_weight(module)
        shapes[name] = (W.shape[0], W.shape[1])
        form = SYMMETRIC if symmetric and W.shape[0] == W.shape[1] else LOWRANK
        plan.append((name, module, _match_rank(name, rank), form))
    if isinstance(rank, int) and not isinstance(rank, bool):
        # one rank for every target: name the layer that binds it, once, with the largest rank all accept
        limit = {name: (min(shapes[name]) if allow_full_rank else
                        max_useful_rank(*shapes[name], symmetric=form == SYMMETRIC)) for name, _, _, form in plan}
        binding = min(plan, key=lambda p: limit[p[0]])
        try:
            validate_rank(binding[0], shapes[binding[0]], rank, symmetric=binding[3] == SYMMETRIC,
                          allow_full_rank=allow_full_rank)
        except RankError as exc:
            if rank < 1 or len(plan) == 1:
                raise
            raise RankError(f"{exc}; {limit[binding[0]]} is the largest rank that every one of the {len(plan)} "
                            "targets accepts") from None
    for name, _, r, form in plan:
        validate_rank(name, shapes[name], r, symmetric=form == SYMMETRIC, allow_full_rank=allow_full_rank)
    if symmetric and not any(form == SYMMETRIC for *_, form in plan):
        shapes = ", ".join(f"{n} {tuple(linear_weight(m)[0].shape)}" for n, m, *_ in plan)
        raise TargetError(f"symmetric form needs a square target layer, but none is: {shapes}")
    return plan


def _match_rank(name: str, rank: int | Mapping[str, int]) -> object:
    if not isinstance(rank, Mapping):
        return rank
    for pattern, r in rank.items():
        if fnmatch.fnmatchcase(name, pattern):
            return r
    raise RankError(f"no rank given for layer '{name}': add a pattern matching it to rank")


def _make_layer(form: str, like: nn.Module, rank: int) -> FactorizedLayer:
    """A (randomly initialized) factorized layer of the given form with ``like``'s shape, device,
    dtype and bias. (nn.utils.skip_init would avoid the init, but its first use costs ~1.5 s of
    imports; initializing thin factors costs milliseconds.)"""
    W, bias = linear_weight(like)
    out_f, in_f = W.shape
    kw = {"device": W.device, "dtype": W.dtype, "bias": bias is not None}
    if form == SYMMETRIC:
        cls, args = SymmetricLowRankLinear, (in_f, rank)
    elif form == LOWRANK:
        cls, args = LowRankLinear, (in_f, out_f, rank)
    else:
        raise ValueError(f"unknown form {form!r}; allowed: {LOWRANK}, {SYMMETRIC}")
    return cls(*args, **kw)


def _count_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def compress_model(
    model: nn.Module,
    targets: Iterable[str],
    rank: int | Mapping[str, int],
    *,
    symmetric: bool = False,
    method: str | Factorizer = "auto",
    allow_full_rank: bool = False,
    calibration: Mapping[str, object] | None = None,
) -> CompressionReport:
    """Replace, in place, every target layer by rank-r factors of its weight.

    targets: glob patterns over module names (``l1``, ``transformer.h.*.attn.c_attn``).
    rank: one rank for all, or {pattern: rank}. symmetric: square targets get the tied PSD
    form B·Bᵀ, the others the plain form. method: a name of ``FACTORIZERS`` or a Factorizer
    (e.g. ``resolve_factorizer("whiten", damp=0.1)``); ``calibration[name]`` is passed to it
    as ``calibration=``. When that is a LayerStats, the report also records the calibration
    tokens, the damping and the relative data error ‖(W − Ŵ)·Xᵀ‖_F / ‖W·Xᵀ‖_F.
    allow_full_rank: admit r = min(m, n) (tests and analysis only).
    """
    plan = plan_compression(model, targets, rank, symmetric, allow_full_rank)
    factorizer = resolve_factorizer(method)
    name_of_method = method_name(method)
    report = CompressionReport()
    progress = Progress("factorizing", len(plan), "layers", log)
    while plan:  # popped: each replaced layer is freed at once, not when the last one is done
        name, module, r, form = plan.pop(0)
        start = time.perf_counter()
        W, bias = linear_weight(module)
        out_f, in_f = W.shape
        stats = calibration.get(name) if calibration is not None else None
        row = LayerReport(name=name, shape=(out_f, in_f), rank=r, form=form, params_before=_count_params(module),
                          params_after=0, method=name_of_method)
        W_norm = float(torch.linalg.vector_norm(W, dtype=torch.float64))
        # The new layer is made after the factorization: its factors never sit beside that working set.
        if form == SYMMETRIC:
            B, _ = factorize_symmetric(W, r)
            new = _make_layer(form, module, r)
            new.B.copy_(B)
            fro_error = float(torch.linalg.matrix_norm(W.double() - new.dense_weight().double()))
            row.method = "eigh-psd"
        else:
            f = factorize(W, r, factorizer, **({} if stats is None else {"calibration": stats}))
            new = _make_layer(form, module, r)
            new.A.copy_(f.A)
            new.B.copy_(f.B)
            fro_error = f.fro_error
            if not f.weighted and f.singular_values is not None and f.singular_values.numel() > r:
                row.sigma_r1 = float(f.singular_values[r])
            row.damping, row.rel_data_error = f.damping, f.data_error
            for note in f.notes:
                log.warning("layer '%s': %s", name, note)
        if isinstance(stats, LayerStats):
            row.calib_tokens = stats.tokens
            if row.rel_data_error is None:
                row.rel_data_error = relative_data_error(W.double(), new.dense_weight().double(), stats.gram)
        if bias is not None:
            new.bias.copy_(bias)
        row.params_after = _count_params(new)
        model.set_submodule(name, new)
        row.rel_fro_error = fro_error / W_norm if W_norm > 0 else 0.0
        row.time_s = time.perf_counter() - start
        report.layers.append(row)
        progress.update()
    progress.finish()
    return report


def compress_with_calibration(
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
) -> CompressionReport:
    """Calibrate on ``batches``, then compress with a data-aware method (see compress_model).

    All at once (default): one calibration pass collects every target's statistics from the
    dense model. ``sequential=True``: the targets are taken in stages (the MLP's l1 then l2; a
    transformer block by block), and each stage is calibrated on the model whose earlier
    stages are already compressed, so its inputs are those it will really see (GPTQ's
    compensating order). The float64 statistics of one stage are freed before the next.
    Targets that read the same tensor share one Gram (found on the first batch). Each pass
    runs the whole model; ``compress_blockwise`` does the same work one decoder block at a time.
    """
    batches = list(batches)
    plan = plan_compression(model, targets, rank, symmetric=False, allow_full_rank=allow_full_rank)
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    names = sorted((name for name, *_ in plan), key=order.__getitem__)  # stages follow the forward order
    del plan  # it holds the dense layers, which must go as they are replaced
    stages = sequential_stages(names) if sequential else [names]
    was_training = model.training
    model.eval()
    groups = shared_input_groups(model, names, lambda: loss_fn(model, batches[0])) if batches else None
    model.train(was_training)
    stage_groups = [None if groups is None else restrict_groups(groups, stage) for stage in stages]
    largest = max(stats_nbytes(model, stage, fisher=fisher, groups=g) for stage, g in zip(stages, stage_groups))
    log.info(
        "calibration: %d batches, %d target layers in %d stage(s); statistics take %.1f MB (float64)%s",
        len(batches), len(names), len(stages), largest / 2**20, " per stage" if sequential else "",
    )
    report = CompressionReport()
    for stage, stage_group in zip(stages, stage_groups):
        stats = collect_statistics(model, stage, batches, loss_fn, fisher=fisher, groups=stage_group)
        report.layers += compress_model(
            model, stage, rank, method=method, allow_full_rank=allow_full_rank, calibration=stats
        ).layers
        del stats
    return report


def lowrank_from_scratch(
    model: nn.Module,
    targets: Iterable[str],
    rank: int | Mapping[str, int],
    *,
    symmetric: bool = False,
    allow_full_rank: bool = False,
) -> CompressionReport:
    """Replace target layers by randomly initialized factorized layers (for training from scratch)."""
    plan = plan_compression(model, targets, rank, symmetric, allow_full_rank)
    report = CompressionReport()
    while plan:  # popped: each replaced layer is freed at once
        name, module, r, form = plan.pop(0)
        new = _make_layer(form, module, r)
        model.set_submodule(name, new)
        shape = (new.out_features, new.in_features)
        report.layers.append(
            LayerReport(name, shape, r, form, _count_params(module), _count_params(new), method="random")
        )
    return report


def factorized_layers(model: nn.Module) -> list[tuple[str, FactorizedLayer]]:
    return [
        (n, m) for n, m in model.named_modules() if isinstance(m, LowRankLinear | SymmetricLowRankLinear)
    ]


def layer_records(model: nn.Module) -> list[dict]:
    """The factorized layers as {"name", "shape": [out, in], "rank", "form"}: what rebuild_structure reads."""
    return [
        {
            "name": name,
            "shape": [layer.out_features, layer.in_features],
            "rank": layer.rank,
            "form": SYMMETRIC if isinstance(layer, SymmetricLowRankLinear) else LOWRANK,
        }
        for name, layer in factorized_layers(model)
    ]


def rebuild_structure(model: nn.Module, layers: Sequence[Mapping]) -> None:
    """Swap in empty factorized layers described by ``{"name", "shape", "rank", "form"}`` records.

    Used to restore a compressed model's structure before loading its state dict.
    """
    for spec in layers:
        name, (out_f, in_f), r, form = spec["name"], spec["shape"], int(spec["rank"]), spec["form"]
        old = model.get_submodule(name)
        shape = tuple(linear_weight(old)[0].shape)
        if shape != (out_f, in_f):
            raise ValueError(
                f"layer '{name}' is {shape[0]}×{shape[1]} in this model but {out_f}×{in_f} in the checkpoint"
            )
        model.set_submodule(name, _make_layer(form, old, r))

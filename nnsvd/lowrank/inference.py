"""Inference speed of factorized layers: keep a layer dense where its two thin matmuls are not faster.

A factorized layer reads r·(in + out) weights instead of in·out, but runs two matmuls instead of one.
In memory-bound decoding (a few tokens per step) its time is about bytes / bandwidth + a fixed cost per
call, so a layer whose rank saves few bytes can be slower than the dense product it stands for.
``keep_dense_where_slower`` times both forms of every distinct (shape, rank) at the given number of
tokens on this machine and puts the dense product A·B back where the factors are not faster. The
function the model computes is the same up to float rounding (A·B is formed once); the memory saved by
those layers is given up, which the caller reports.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch import Tensor, nn

from nnsvd.lowrank.layers import FactorizedLayer, LowRankLinear, SymmetricLowRankLinear


def dense_from_factors(layer: FactorizedLayer) -> nn.Linear:
    """An nn.Linear whose weight is the layer's product A·B (or B·Bᵀ), with the same bias, dtype and device."""
    weight = layer.dense_weight().detach()
    dense = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None,
                      device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        dense.weight.copy_(weight)
        if layer.bias is not None:
            dense.bias.copy_(layer.bias)
    return dense


def _best_time(fn: Callable[[], Tensor], repeats: int) -> float:
    """The best of ``repeats`` timings of ``fn`` (one warm-up call first): the least disturbed by other work."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def time_layer(layer: FactorizedLayer, tokens: int, repeats: int = 30) -> tuple[float, float]:
    """(dense seconds, factorized seconds) of one forward on ``tokens`` rows, best of ``repeats``."""
    dense = dense_from_factors(layer)
    x = torch.randn(tokens, layer.in_features, dtype=dense.weight.dtype, device=dense.weight.device)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def timed(module: nn.Module) -> Callable[[], Tensor]:
        def run() -> Tensor:
            out = module(x)
            sync()
            return out
        return run

    with torch.inference_mode():
        return _best_time(timed(dense), repeats), _best_time(timed(layer), repeats)


Timer = Callable[[FactorizedLayer, int, int], tuple[float, float]]


def keep_dense_where_slower(model: nn.Module, tokens: int, repeats: int = 30, timer: Timer = time_layer) -> dict[str, dict]:
    """Replace every factorized layer whose forward on ``tokens`` rows is not faster than its dense
    product's by that product (an nn.Linear). Layers of one (in, out, rank, form) are timed once,
    by ``timer`` (``time_layer``: best of ``repeats`` on this machine, with torch's current threads).

    Returns {name: {"dense_us", "factorized_us"}} of the layers put back dense."""
    timings: dict[tuple, tuple[float, float]] = {}
    kept: dict[str, dict] = {}
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, LowRankLinear | SymmetricLowRankLinear):
            continue
        key = (type(layer), layer.in_features, layer.out_features, layer.rank, layer.bias is not None)
        if key not in timings:
            timings[key] = timer(layer, tokens, repeats)
        dense_s, factorized_s = timings[key]
        if factorized_s >= dense_s:
            model.set_submodule(name, dense_from_factors(layer))
            kept[name] = {"dense_us": round(dense_s * 1e6, 2), "factorized_us": round(factorized_s * 1e6, 2)}
    return kept

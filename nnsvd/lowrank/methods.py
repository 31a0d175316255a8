"""The factorization methods by name, and ``factorize``: one method applied to one weight.

Plain methods see only W; data-aware ones also take the layer's calibration statistics
(``calibration=``) and their own options (ASVD's α, whitening's damping).
"""

from __future__ import annotations

import functools

import torch
from torch import Tensor

from nnsvd.lowrank.factorize import (
    Factorizer,
    Factors,
    svd_auto,
    svd_full,
    svd_gram,
    svd_randomized,
    work_device,
)
from nnsvd.lowrank.weighted import (
    asvd,
    asvd_weights,
    fwsvd,
    fwsvd_weights,
    weighted_matrix,
    whiten,
    whiten_weights,
)

PLAIN_METHODS: dict[str, Factorizer] = {
    "auto": svd_auto,
    "svd": svd_full,
    "gram": svd_gram,
    "randomized": svd_randomized,
}
DATA_AWARE_METHODS: dict[str, Factorizer] = {"asvd": asvd, "whiten": whiten, "fwsvd": fwsvd}
FACTORIZERS: dict[str, Factorizer] = {**PLAIN_METHODS, **DATA_AWARE_METHODS}

WEIGHTINGS = {"asvd": asvd_weights, "whiten": whiten_weights, "fwsvd": fwsvd_weights}
"""The weights L, R of each data-aware method (``weights(W, calibration, **options)``)."""

METHOD_OPTIONS: dict[str, tuple[str, ...]] = {"asvd": ("alpha",), "whiten": ("damp",)}
"""The keyword options each method takes besides W, rank and calibration."""


def resolve_factorizer(method: str | Factorizer, **options) -> Factorizer:
    """The factorizer for a method name (with its options bound), or ``method`` itself when callable."""
    if callable(method):
        return functools.partial(method, **options) if options else method
    if method not in FACTORIZERS:
        raise ValueError(f"method={method!r} is unknown; allowed: {', '.join(FACTORIZERS)}")
    unknown = sorted(set(options) - set(METHOD_OPTIONS.get(method, ())))
    if unknown:
        raise ValueError(f"method={method!r} takes no option {', '.join(unknown)}")
    fn = FACTORIZERS[method]
    return functools.partial(fn, **options) if options else fn


def method_name(method: str | Factorizer) -> str:
    """A method's name for reports: the registry name, or the function's own name."""
    if isinstance(method, str):
        return method
    fn = method.func if isinstance(method, functools.partial) else method
    return getattr(fn, "__name__", "custom")


def is_data_aware(method: str | Factorizer) -> bool:
    """Whether the method needs calibration statistics."""
    return method_name(method) in DATA_AWARE_METHODS


def factorize(W: Tensor, rank: int, method: str | Factorizer = "auto", **context) -> Factors:
    """Rank-r factors of an out×in weight: computed in float64, cast back to W's dtype.

    ``fro_error`` (‖W − A·B‖_F) is filled in by measuring when the method did not know it.
    """
    W64 = W.detach().to(work_device(W), torch.float64)
    f = resolve_factorizer(method)(W64, rank, **context)
    if f.fro_error is None:
        f.fro_error = float(torch.linalg.matrix_norm(W64 - f.A @ f.B))
    f.A, f.B = f.A.to(W.device, W.dtype), f.B.to(W.device, W.dtype)
    return f


def singular_values(M: Tensor) -> Tensor:
    """σ_1 ≥ σ_2 ≥ … of M in float64: eigenvalues of the smaller Gram from min(m, n) ≥ 256 on, as svd_gram."""
    M = M.detach().to(work_device(M), torch.float64)
    if min(M.shape) < 256:
        return torch.linalg.svdvals(M)
    gram = M.T @ M if M.shape[0] >= M.shape[1] else M @ M.T
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0).sqrt()


def spectrum(W: Tensor, method: str | Factorizer = "auto", calibration=None, **options) -> Tensor:
    """The spectrum whose tail a method truncates: σ(W) for plain methods, σ(L·W·R) for data-aware ones.

    Σ_{i>r} σ_i² is then the method's own error at rank r (Frobenius, or weighted), which is
    what the spectrum allocation weighs across layers.
    """
    name = method_name(method)
    if isinstance(method, functools.partial):
        options = {**method.keywords, **options}
    W64 = W.detach().to(work_device(W), torch.float64)
    if name not in WEIGHTINGS:
        return singular_values(W64)
    return singular_values(weighted_matrix(W64, WEIGHTINGS[name](W64, calibration, **options)))

"""Truncated SVD of one weight matrix: rank-r thin factors W ≈ A·B, computed in float64.

The plain routines minimize ‖W − A·B‖_F (Eckart–Young). The data-aware ones, which weight
that error by calibration statistics, are in ``nnsvd.lowrank.weighted``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass
class Factors:
    """A ≈ out×r and B ≈ r×in with W ≈ A·B, plus the singular values the method knows.

    ``singular_values`` holds σ_1 ≥ σ_2 ≥ … of W: the full spectrum for exact methods,
    the sketch's leading estimates for the randomized one, None when unknown.
    ``fro_error`` is ‖W − A·B‖_F when the method knows it exactly (the Eckart–Young tail
    √(Σ_{i>r} σ_i²) for exact truncated SVD); otherwise the engine measures the residual.
    Data-aware methods truncate a weighted matrix L·W·R instead: ``weighted`` is then True
    and ``singular_values`` is the spectrum of L·W·R (its tail is the weighted error).
    """

    A: Tensor
    B: Tensor
    singular_values: Tensor | None = None
    fro_error: float | None = None
    weighted: bool = False  # singular_values are those of the weighted matrix L·W·R, not of W
    data_error: float | None = None  # ‖(W − A·B)·Xᵀ‖_F / ‖W·Xᵀ‖_F on calibration data, when known exactly
    damping: float | None = None  # λ added to the input Gram (whitening)
    notes: list[str] = field(default_factory=list)  # what the method had to adjust, for the log


Factorizer = Callable[..., Factors]
"""A factorization method: ``method(W, rank, **context) -> Factors`` with W out×in in float64.

Data-aware methods receive their calibration statistics as the ``calibration`` keyword.
"""


def _split_sqrt(U: Tensor, S: Tensor, V: Tensor) -> Factors:
    """A = U·√Σ, B = √Σ·Vᵀ."""
    root = S.sqrt()
    return Factors(U * root, root[:, None] * V.T)


def _transposed(f: Factors) -> Factors:
    """Factors of Wᵀ turned into factors of W: (A·B)ᵀ = Bᵀ·Aᵀ."""
    return Factors(f.B.T, f.A.T, f.singular_values, f.fro_error)


def _tail(S: Tensor, rank: int) -> float:
    """√(Σ_{i>r} σ_i²): the Eckart–Young Frobenius error of the best rank-r approximation."""
    return float(S[rank:].square().sum().sqrt())


def svd_full(W: Tensor, rank: int) -> Factors:
    """Exact truncated SVD through torch.linalg.svd (computed on the tall orientation)."""
    if W.shape[0] < W.shape[1]:
        return _transposed(svd_full(W.T, rank))
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    f = _split_sqrt(U[:, :rank], S[:rank], Vh[:rank].T)
    f.singular_values, f.fro_error = S, _tail(S, rank)
    return f


def svd_gram(W: Tensor, rank: int) -> Factors:
    """Exact truncated SVD through the eigendecomposition of the smaller Gram matrix.

    For W: m×n with n ≤ m, WᵀW = V·Σ²·Vᵀ; U_r·Σ_r = W·V_r, so A = W·V_r·Σ_r^(-1/2) and
    B = Σ_r^(1/2)·V_rᵀ. A·B = W·V_r·V_rᵀ is the orthogonal projection of W's rows onto the
    top-r right singular subspace, which is the Eckart–Young optimum. In float64 the
    squared conditioning only blurs singular values below ~1e-8·σ_1, whose directions
    contribute nothing measurable to the truncation.
    """
    if W.shape[0] < W.shape[1]:
        return _transposed(svd_gram(W.T, rank))
    evals, evecs = torch.linalg.eigh(W.T @ W)
    S = evals.flip(0).clamp_min(0).sqrt()
    V = evecs[:, -rank:].flip(1) if rank > 0 else evecs[:, :0]
    root = S[:rank].sqrt()
    inv_root = torch.where(root > 0, 1.0 / root, torch.zeros_like(root))
    return Factors((W @ V) * inv_root, root[:, None] * V.T, S, _tail(S, rank))


@contextlib.contextmanager
def _seeded_generator(device: torch.device, seed: int):
    """Seed the one generator that draws on ``device`` for the block, then put its state back.

    torch.manual_seed would also reseed every CUDA device (or queue that reseed until CUDA starts),
    and torch.random.fork_rng's device handling differs between torch releases; saving and
    restoring the one state by hand does neither.
    """
    if device.type == "cpu":
        state = torch.get_rng_state()
        torch.random.default_generator.manual_seed(seed)
        try:
            yield
        finally:
            torch.set_rng_state(state)
        return
    mod = torch.get_device_module(device.type)
    index = device.index if device.index is not None else mod.current_device()
    state = mod.get_rng_state(index)
    with mod.device(index):
        mod.manual_seed(seed)
    try:
        yield
    finally:
        mod.set_rng_state(state, index)


def svd_randomized(W: Tensor, rank: int, oversample: int | None = None, niter: int = 4) -> Factors:
    """Randomized truncated SVD (torch.svd_lowrank) with oversampling p = max(r, 10).

    With p = r and 4 power iterations the Frobenius error stays within 0.35% of the
    optimum even on flat (random-init) spectra; see docs/performance.md, "Which SVD routine".
    The sketch is seeded locally so the result is deterministic and global RNG untouched.
    """
    p = max(rank, 10) if oversample is None else oversample
    q = min(rank + p, min(W.shape))
    with _seeded_generator(W.device, 0):
        U, S, V = torch.svd_lowrank(W, q=q, niter=niter)
    f = _split_sqrt(U[:, :rank], S[:rank], V[:, :rank])
    f.singular_values = S
    return f


def svd_exact(W: Tensor, rank: int) -> Factors:
    """Exact truncated SVD by the faster exact route: the Gram eigendecomposition from
    min(m, n) ≥ 256 on (4–9× faster there), full SVD below (a millisecond or less)."""
    return svd_gram(W, rank) if min(W.shape) >= 256 else svd_full(W, rank)


def svd_auto(W: Tensor, rank: int) -> Factors:
    """Pick the fastest routine that meets the accuracy bar (rule measured in docs/performance.md).

    - r ≤ min(m, n)/16: randomized (≥4× faster than exact there, ≤0.35% excess error);
    - min(m, n) ≥ 256: exact via the Gram eigendecomposition (4–9× faster than svd_full);
    - otherwise: svd_full, which is a millisecond or less at that size.
    """
    if rank * 16 <= min(W.shape):
        return svd_randomized(W, rank)
    return svd_exact(W, rank)


def work_device(t: Tensor) -> torch.device:
    """Where float64 factorization of ``t`` runs: its own device, but the CPU for MPS (no float64)."""
    return torch.device("cpu") if t.device.type == "mps" else t.device


def factorize_symmetric(W: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """B: n×r with B·Bᵀ the best rank-r PSD approximation of the symmetric part of W.

    S = (W + Wᵀ)/2 = Q·Λ·Qᵀ; keep the r largest eigenvalues clipped at 0 and set
    B = Q_r·diag(√λ_r). Returns (B in W's dtype, eigenvalues of S in descending order).
    """
    W64 = W.detach().to(work_device(W), torch.float64)
    evals, evecs = torch.linalg.eigh((W64 + W64.T) / 2)
    evals, evecs = evals.flip(0), evecs.flip(1)
    B = evecs[:, :rank] * evals[:rank].clamp_min(0).sqrt()
    return B.to(W.device, W.dtype), evals



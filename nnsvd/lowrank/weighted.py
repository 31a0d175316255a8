"""Data-aware factorization: truncated SVD under a weighted norm, from calibration statistics.

What matters for a compressed layer is its error on the inputs it really sees,
‖(W − Ŵ)·Xᵀ‖_F, not ‖W − Ŵ‖_F. The three methods of the literature are cases of one weighted
problem: with L weighting the output rows and R the input columns,

    Ŵ = L⁻¹ · trunc_r(L·W·R) · R⁻¹,

which minimizes ‖L·(W − Ŵ)·R‖_F over rank-r Ŵ (Eckart–Young applied to L·W·R; L and R are
invertible). Plain SVD is L = R = I.

- ``asvd`` (Yuan et al. 2023): R = diag(s), s_j = (mean_t |x_tj|)^α;
- ``whiten`` (SVD-LLM, Wang et al. 2025): R = C with C·Cᵀ = XᵀX + λI (Cholesky): then
  ‖(W − Ŵ)·C‖²_F = ‖(W − Ŵ)·Xᵀ‖²_F + λ‖W − Ŵ‖²_F, the data error itself when λ = 0;
- ``fwsvd`` (Hsu et al. 2022): L = diag(√I_i), I_i = Σ_j Fisher_ij, the importance of output row i.

Each returns the usual thin factors A = L⁻¹·U_r·√Σ_r (out×r) and B = √Σ_r·V_rᵀ·R⁻¹ (r×in),
so the layers, counting, saving and reloading are those of plain SVD. Plain PyTorch.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from nnsvd.lowrank.calibration import LayerStats
from nnsvd.lowrank.factorize import Factors, svd_exact

EPS = 1e-6
"""Floor of a diagonal weight, relative to its mean, so that L and R stay invertible."""

DAMPING_RAISES = 3
"""How many times whitening raises λ tenfold when the Cholesky factorization fails."""


class CalibrationError(ValueError):
    """Calibration statistics that a data-aware method cannot use (missing, all zero, not factorizable)."""


@dataclass
class Weights:
    """The weights of one layer's weighted problem: L = diag(left) and R (diagonal or triangular)."""

    left: Tensor | None = None  # out
    right: Tensor | None = None  # in, or in×in lower-triangular
    damping: float | None = None  # λ added to XᵀX (whitening), in XᵀX's units
    damping_per_token: float = 0.0  # the same λ for the per-token Gram XᵀX/N that R factors
    notes: list[str] = field(default_factory=list)


def weighted_matrix(W: Tensor, weights: Weights) -> Tensor:
    """L·W·R: the matrix whose truncation the weighted methods take."""
    M = W if weights.left is None else weights.left[:, None] * W
    if weights.right is not None:
        M = M * weights.right if weights.right.dim() == 1 else M @ weights.right
    return M


def weighted_truncation(
    W: Tensor, rank: int, *, left: Tensor | None = None, right: Tensor | None = None
) -> Factors:
    """Ŵ = L⁻¹·trunc_r(L·W·R)·R⁻¹ as thin factors A = L⁻¹·U_r·√Σ_r, B = √Σ_r·V_rᵀ·R⁻¹.

    left: the diagonal of L (out), or None for I. right: the diagonal of R (in), a
    lower-triangular R (in×in), or None for I. R⁻¹ is applied by a triangular solve,
    never an explicit inverse. The SVD of L·W·R is exact; the returned singular_values are
    its spectrum, so Σ_{i>r} σ_i² is the minimized weighted error ‖L·(W − Ŵ)·R‖²_F.
    """
    f = svd_exact(weighted_matrix(W, Weights(left, right)), rank)
    A, B = f.A, f.B
    if left is not None:
        A = A / left[:, None]
    if right is not None:
        B = B / right if right.dim() == 1 else torch.linalg.solve_triangular(right, B, upper=False, left=False)
    return Factors(A, B, singular_values=f.singular_values, weighted=True)


def _unit_mean(weights: Tensor) -> Tensor:
    """weights / mean + EPS: positive, scale-free. Ŵ ignores the scale of a diagonal weight;
    the scale only balances A against B, and mean 1 keeps them balanced as in plain SVD."""
    mean = weights.mean()
    if not torch.isfinite(mean) or mean <= 0:
        raise CalibrationError("the calibration statistics are all zero (or not finite): nothing to weight by")
    return weights / mean + EPS


def asvd_weights(W: Tensor, calibration: LayerStats, alpha: float = 0.5) -> Weights:
    """ASVD: R = diag(s), s_j = (mean_t |x_tj|)^α + ε (α = compress.asvd_alpha; α = 0 is plain SVD)."""
    return Weights(right=_unit_mean(calibration.mean_abs.to(W) ** alpha))


def fwsvd_weights(W: Tensor, calibration: LayerStats) -> Weights:
    """FWSVD: L = diag(√I_i) + ε, I_i = Σ_j Fisher_ij (uniform Fisher is plain SVD)."""
    if calibration.fisher is None:
        raise CalibrationError("fwsvd needs Fisher statistics: collect them with calibration.fisher=true")
    return Weights(left=_unit_mean(calibration.fisher.to(W).sqrt()))


def asvd(W: Tensor, rank: int, *, calibration: LayerStats, alpha: float = 0.5) -> Factors:
    """ASVD's factorization: the weighted truncation with asvd_weights."""
    w = asvd_weights(W, calibration, alpha)
    return weighted_truncation(W, rank, right=w.right)


def fwsvd(W: Tensor, rank: int, *, calibration: LayerStats) -> Factors:
    """FWSVD's factorization: the weighted truncation with fwsvd_weights."""
    w = fwsvd_weights(W, calibration)
    return weighted_truncation(W, rank, left=w.left)


def damped_cholesky(gram: Tensor, damp: float, tokens: int = 1) -> tuple[Tensor, float, list[str]]:
    """(C, λ, notes): lower-triangular C with C·Cᵀ = G/N + λI, λ = damp·mean(diag G/N), N = tokens.

    When the factorization fails (G singular at λ = 0, or not numerically positive definite),
    λ is raised tenfold, at most DAMPING_RAISES times (from λ = 0 the first raise is to
    1e-6·mean(diag G/N)); each raise is noted (compress_model logs the notes with the layer's
    name). Still failing raises CalibrationError:
    never NaN, never a silent fallback to another method.
    Memory: one in×in matrix (G/N + λI, freed once factorized) besides G and C.
    """
    scale = float((gram.diagonal() / tokens).mean())
    if not scale > 0:
        raise CalibrationError("the layer's calibration inputs are all zero: whitening has nothing to work with")
    lam = damp * scale
    notes: list[str] = []
    for attempt in range(DAMPING_RAISES + 1):
        damped = gram / tokens
        damped.diagonal().add_(lam)  # + λI in place: no in×in identity
        C, info = torch.linalg.cholesky_ex(damped)
        del damped
        if int(info) == 0 and bool(torch.isfinite(C).all()):
            return C, lam, notes
        if attempt == DAMPING_RAISES:
            break
        raised = max(10 * lam, 1e-6 * scale)
        notes.append(
            f"Cholesky of XᵀX + λI failed at λ = {lam / scale:.3g}·mean(diag XᵀX); raised λ to {raised / scale:.3g}·mean(diag)"
        )
        lam = raised
    raise CalibrationError(
        f"Cholesky of the input Gram failed even at λ={lam:.3g} ({DAMPING_RAISES} tenfold raises); "
        "raise the damping (compress.damp)"
    )


def whiten_weights(W: Tensor, calibration: LayerStats, damp: float = 0.01) -> Weights:
    """SVD-LLM whitening: R = C, C·Cᵀ = XᵀX + λI, λ = damp·mean(diag XᵀX) (damp = compress.damp).

    The Gram is used per token (XᵀX/N), which changes nothing in Ŵ and keeps A and B balanced.
    """
    tokens = max(calibration.tokens, 1)
    C, lam, notes = damped_cholesky(calibration.gram.to(W), damp, tokens)  # λ per token
    return Weights(right=C, damping=lam * tokens, damping_per_token=lam, notes=notes)


def whiten(W: Tensor, rank: int, *, calibration: LayerStats, damp: float = 0.01) -> Factors:
    """Whitening's factorization: the weighted truncation with whiten_weights.

    With λ = 0 this minimizes the data error ‖(W − Ŵ)·Xᵀ‖_F exactly; the minimum is the tail
    √(Σ_{i>r} σ_i(W·C)²). The relative data error follows from the spectrum without another
    pass over G: ‖ΔXᵀ‖² = ‖ΔC‖² − λ‖Δ‖² = tail² − λ‖Δ‖², and ‖WXᵀ‖² = ‖WC‖² − λ‖W‖²
    (per token, as C is).
    """
    w = whiten_weights(W, calibration, damp)
    lam = w.damping_per_token
    f = weighted_truncation(W, rank, right=w.right)
    S = f.singular_values
    f.fro_error = float(torch.linalg.matrix_norm(W - f.A @ f.B))
    err2 = float(S[rank:].square().sum()) - lam * f.fro_error**2
    total2 = float(S.square().sum()) - lam * float(W.square().sum())
    f.data_error = (max(err2, 0.0) / total2) ** 0.5 if total2 > 0 else 0.0
    f.damping, f.notes = w.damping, w.notes
    return f


def relative_data_error(W: Tensor, W_hat: Tensor, gram: Tensor) -> float:
    """‖(W − Ŵ)·Xᵀ‖_F / ‖W·Xᵀ‖_F from the Gram G = XᵀX alone: ‖M·Xᵀ‖²_F = tr(M·G·Mᵀ)."""
    G = gram.to(W)
    D = W - W_hat
    den = float(((W @ G) * W).sum())
    return (max(float(((D @ G) * D).sum()), 0.0) / den) ** 0.5 if den > 0 else 0.0

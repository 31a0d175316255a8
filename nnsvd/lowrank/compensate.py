"""Closed-form error compensation of a factorized layer: alternating least squares on A and B (after AdaSVD).

A compressed model feeds the layer W (out×in) with X̃, the compressed stream's inputs, where the
dense model fed it X (tokens × in). With the factors W ≈ M = A·B (A: out×r, B: r×in) the update
minimizes the layer's output error against the dense stream, with a small ridge λ:

    f(A, B) = ‖X·Wᵀ − X̃·(AB)ᵀ‖²_F + λ‖AB‖²_F
            = tr(W·G·Wᵀ) − 2·tr(W·C·Mᵀ) + tr(M·(G̃ + λI)·Mᵀ),   G = XᵀX, C = XᵀX̃, G̃ = X̃ᵀX̃.

Each half-step is the exact minimizer over one factor with the other fixed (normal equations), so f
never increases:

    A ← W·C·Bᵀ · (B·(G̃ + λI)·Bᵀ)⁻¹                     (r×r system)
    B ← (AᵀA)⁻¹ · Aᵀ·W·C · (G̃ + λI)⁻¹                  (r×r and in×in systems)

With X̃ = X and A·B a whitened truncation (SVD-LLM) the start is already the rank-r optimum, so the
update changes nothing: its gain comes only from the compressed stream's inputs differing from the
dense ones. The statistics are sums over tokens, so they are collected batch by batch in float64.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class PairedGrams:
    """Σ over tokens of XᵀX (dense), XᵀX̃ (cross) and X̃ᵀX̃ (compressed), each in×in, float64."""

    dense: Tensor
    cross: Tensor
    compressed: Tensor

    @classmethod
    def zeros(cls, features: int, device: torch.device | str = "cpu") -> PairedGrams:
        def z() -> Tensor:
            return torch.zeros(features, features, dtype=torch.float64, device=device)

        return cls(z(), z(), z())

    def add(self, x: Tensor, x_tilde: Tensor) -> None:
        """Accumulate one batch: x and x_tilde are the same tokens' inputs (…×in) on the two streams.
        Each batch's products in its dtype (≥ float32), the sums in float64, as the calibration Grams."""
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.reshape(-1, x.shape[-1]).to(self.dense.device, dtype)
        xt = x_tilde.reshape(-1, x_tilde.shape[-1]).to(self.dense.device, dtype)
        self.dense.add_(x.T @ x)
        self.cross.add_(x.T @ xt)
        self.compressed.add_(xt.T @ xt)


def ridge(grams: PairedGrams, scale: float) -> float:
    """λ = scale · tr(G̃)/in: a ridge relative to the mean input energy per feature."""
    return scale * float(grams.compressed.diagonal().mean().clamp_min(1e-300))


def objective(weight: Tensor, product: Tensor, grams: PairedGrams, lam: float = 0.0) -> float:
    """f = tr(W·G·Wᵀ) − 2·tr(W·C·Mᵀ) + tr(M·(G̃ + λI)·Mᵀ) for M = ``product`` (see the module docstring)."""
    w, m = weight.double(), product.double()
    value = ((w @ grams.dense) * w).sum() - 2 * ((w @ grams.cross) * m).sum() + ((m @ grams.compressed) * m).sum()
    return float(value + lam * m.square().sum())


def _cholesky(matrix: Tensor) -> Tensor:
    """The lower Cholesky factor of a symmetric positive (semi)definite matrix, with a growing jitter if needed."""
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype, device=matrix.device)
    scale = float(matrix.diagonal().abs().mean().clamp_min(1e-300))
    for jitter in (0.0, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4):
        factor, info = torch.linalg.cholesky_ex(matrix + jitter * scale * eye)
        if int(info) == 0:
            return factor
    raise torch.linalg.LinAlgError("the matrix is not positive semidefinite, even with a jitter of 1e-4 of its scale")


def _spd_solve(matrix: Tensor, rhs: Tensor) -> Tensor:
    """matrix⁻¹·rhs for a symmetric positive (semi)definite matrix, through its Cholesky factor."""
    return torch.cholesky_solve(rhs, _cholesky(matrix))


def step_a(weight: Tensor, b: Tensor, grams: PairedGrams, lam: float) -> Tensor:
    """argmin over A of f with B fixed: A = W·C·Bᵀ·(B·(G̃ + λI)·Bᵀ)⁻¹."""
    return _Problem(weight, grams, lam).step_a(b)


def step_b(weight: Tensor, a: Tensor, grams: PairedGrams, lam: float) -> Tensor:
    """argmin over B of f with A fixed: B = (AᵀA)⁻¹·Aᵀ·W·C·(G̃ + λI)⁻¹."""
    problem = _Problem(weight, grams, lam)
    return problem.step_b(a, _cholesky(problem.ridged))


@dataclass
class Compensation:
    """The factors after the update and how it went (relative output errors, without ridge)."""

    a: Tensor
    b: Tensor
    best_step: int
    train_start: float
    train_best: float
    holdout_start: float | None
    holdout_best: float | None


class _Problem:
    """One layer's objective on one set of statistics, with what every round reuses computed once:
    W·C, the energy tr(W·G·Wᵀ), and for the training set the Cholesky factor of G̃ + λI. For M = A·B,

        f = tr(W·G·Wᵀ) − 2·⟨Aᵀ·W·C, B⟩ + ⟨AᵀA, B·G̃·Bᵀ⟩      (no out×in product is formed)."""

    def __init__(self, weight: Tensor, grams: PairedGrams, lam: float = 0.0) -> None:
        self.grams = grams
        self.wc = weight @ grams.cross
        self.energy = float(((weight @ grams.dense) * weight).sum())
        eye = torch.eye(weight.shape[1], dtype=torch.float64, device=weight.device)
        self.ridged = grams.compressed + lam * eye

    def relative(self, a: Tensor, b: Tensor) -> float:
        """The output error of A·B relative to the dense output energy (without ridge)."""
        value = self.energy - 2 * float(((a.T @ self.wc) * b).sum()) + float(((a.T @ a) * (b @ self.grams.compressed @ b.T)).sum())
        return value / max(self.energy, 1e-300)

    def step_a(self, b: Tensor) -> Tensor:
        """A = W·C·Bᵀ·(B·(G̃ + λI)·Bᵀ)⁻¹."""
        return _spd_solve(b @ self.ridged @ b.T, (self.wc @ b.T).T).T

    def step_b(self, a: Tensor, factor: Tensor) -> Tensor:
        """B = (AᵀA)⁻¹·Aᵀ·W·C·(G̃ + λI)⁻¹, with ``factor`` the Cholesky factor of G̃ + λI."""
        left = _spd_solve(a.T @ a, a.T @ self.wc)
        return torch.cholesky_solve(left.T, factor).T


def alternate(
    weight: Tensor, a: Tensor, b: Tensor, train: PairedGrams, held: PairedGrams | None, steps: int,
    ridge_scale: float = 1e-6,
) -> Compensation:
    """``steps`` rounds of (A-step, B-step) from (a, b) on the training statistics; return the round that is
    best on ``held`` (on ``train`` when there is none). Round 0 is the start, so the result is never worse there.
    Computed in float64; the factors come back in a's dtype. Each round is step_a then step_b."""
    w = weight.detach().double()
    a0, b0 = a.detach().double(), b.detach().double()
    fit = _Problem(w, train, ridge(train, ridge_scale))
    score = _Problem(w, held) if held is not None else fit
    factor = _cholesky(fit.ridged)
    best = (score.relative(a0, b0), 0, a0, b0)
    start = best[0]
    cur_a, cur_b = a0, b0
    for step in range(1, steps + 1):
        cur_a = fit.step_a(cur_b)
        cur_b = fit.step_b(cur_a, factor)
        value = score.relative(cur_a, cur_b)
        if value < best[0]:
            best = (value, step, cur_a, cur_b)
    value, step, best_a, best_b = best
    return Compensation(
        a=best_a.to(a.dtype), b=best_b.to(b.dtype), best_step=step, train_start=fit.relative(a0, b0),
        train_best=fit.relative(best_a, best_b), holdout_start=start if held is not None else None,
        holdout_best=value if held is not None else None,
    )

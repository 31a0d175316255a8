"""Penalties on the factors of low-rank layers."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from nnsvd.lowrank import factorized_layers


def orthonormal_penalty(model: nn.Module) -> Tensor:
    """Σ_F ‖FᵀF − I_r‖²_F over every factor F (k×r, columns as factors) of the model.

    Factors are A (out×r) and Bᵀ (in×r) of a LowRankLinear, and the single tied B (n×r)
    of a SymmetricLowRankLinear, which counts once. Only the thin r×r Gram is formed.

    The original formulation was ‖FFᵀ − I_k‖² + ‖FᵀF − I_r‖². Since
    ‖FFᵀ − I_k‖² = ‖FᵀF‖² − 2‖F‖² + k and ‖FᵀF − I_r‖² = ‖FᵀF‖² − 2‖F‖² + r, the two
    terms differ by the constant k − r: the original equals 2·(ours) + (k − r). Ours
    therefore has the same minimizers, half the original's gradient, and reaches 0
    exactly when F has orthonormal columns.
    """
    total: Tensor | None = None
    for _, layer in factorized_layers(model):
        for F in layer.factors():
            gram = F.T @ F
            eye = torch.eye(gram.shape[0], device=gram.device, dtype=gram.dtype)
            term = (gram - eye).square().sum()
            total = term if total is None else total + term
    if total is None:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return total

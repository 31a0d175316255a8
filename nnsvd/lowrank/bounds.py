"""Rigorous output-error bounds for compressed feed-forward networks.

Setting: f(x) = W_L σ(… σ(W_1 x + b_1) …) + b_L with an activation σ that is 1-Lipschitz
and has σ(0) = 0 (ReLU). Compression replaces W_k by Ŵ_k (Ŵ_k = W_k for untouched layers)
and gives f̂. Let g_k be the hybrid network whose layers 1..k are compressed and the rest
dense, so g_0 = f and g_L = f̂. By the triangle inequality

    ‖f(x) − f̂(x)‖ ≤ Σ_k ‖g_{k−1}(x) − g_k(x)‖.

g_{k−1} and g_k share the compressed layers 1..k−1, so both feed layer k the same input
z_k(x) (the compressed network's activation entering layer k). Layer k's outputs differ by
(W_k − Ŵ_k) z_k(x); the dense layers j > k are each ‖W_j‖₂-Lipschitz (σ is 1-Lipschitz), so

    ‖f(x) − f̂(x)‖ ≤ Σ_k (Π_{j>k} ‖W_j‖₂) · ‖W_k − Ŵ_k‖₂ · ‖z_k(x)‖.       (data-dependent)

Data-free variant: since σ(0) = 0, ‖σ(u)‖ ≤ ‖u‖, so ‖z_1‖ = ‖x‖ and
‖z_{k+1}‖ ≤ ‖Ŵ_k‖₂·‖z_k‖ + ‖b_k‖ =: Z_{k+1}; substituting Z_k for ‖z_k(x)‖ gives a bound that
needs only ‖x‖ and the weights.                                                (data-free)

Everything is evaluated in float64 with exact spectral norms, so the bound is rigorous for
the networks' exact arithmetic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from nnsvd.lowrank import LowRankLinear, SymmetricLowRankLinear, linear_weight

Activation = Callable[[Tensor], Tensor]


@dataclass
class BoundResult:
    """Per-input tensors (shape: batch) of the measured error and the two bounds."""

    measured: Tensor  # ‖f(x) − f̂(x)‖₂
    bound: Tensor  # data-dependent bound
    data_free_bound: Tensor

    def summary(self) -> dict[str, float]:
        return {
            f"{key}_{stat}": float(getattr(value, stat)())
            for key, value in (
                ("measured", self.measured),
                ("bound", self.bound),
                ("data_free_bound", self.data_free_bound),
            )
            for stat in ("mean", "max")
        }


def _weights(layers: Sequence[nn.Module]) -> list[tuple[Tensor, Tensor]]:
    out = []
    for layer in layers:
        W, b = linear_weight(layer)
        # A factorized layer's product is formed in float64 from its factors: dense_weight() in
        # the factors' dtype would round it (float32: ~1e-7) and bound a slightly different network.
        if isinstance(layer, LowRankLinear):
            W = layer.A.detach().double() @ layer.B.detach().double()
        elif isinstance(layer, SymmetricLowRankLinear):
            W = layer.B.detach().double() @ layer.B.detach().double().T
        else:
            W = W.detach().double()
        b = torch.zeros(W.shape[0], dtype=W.dtype, device=W.device) if b is None else b.detach().double()
        out.append((W, b))
    return out


def _spectral(W: Tensor) -> float:
    return float(torch.linalg.matrix_norm(W, ord=2))


@torch.no_grad()
def output_error_bound(
    dense: Sequence[nn.Module],
    compressed: Sequence[nn.Module],
    x: Tensor,
    activation: Activation = torch.relu,
) -> BoundResult:
    """Measured ‖f(x) − f̂(x)‖₂ and both bounds for a batch x (N×in) of inputs.

    dense and compressed list the same network's layers in order (Linear, Conv1D or
    factorized); the activation sits between consecutive layers, none after the last.
    """
    if len(dense) != len(compressed):
        raise ValueError(f"dense has {len(dense)} layers but compressed has {len(compressed)}")
    Wd, Wc = _weights(dense), _weights(compressed)
    L = len(Wd)
    dense_norm = [_spectral(W) for W, _ in Wd]
    comp_norm = [_spectral(W) for W, _ in Wc]
    diff_norm = [_spectral(Wd[k][0] - Wc[k][0]) for k in range(L)]
    tail = [1.0] * L  # Π_{j>k} ‖W_j‖₂
    for k in range(L - 2, -1, -1):
        tail[k] = tail[k + 1] * dense_norm[k + 1]

    x = x.detach().double().flatten(1)
    z_dense, z = x, x
    z_bound = x.norm(dim=1)
    bound = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    data_free = torch.zeros_like(bound)
    for k in range(L):
        coeff = tail[k] * diff_norm[k]
        bound += coeff * z.norm(dim=1)
        data_free += coeff * z_bound
        (W, b), (Wh, bh) = Wd[k], Wc[k]
        z_dense, z = z_dense @ W.T + b, z @ Wh.T + bh
        z_bound = comp_norm[k] * z_bound + float(bh.norm())
        if k < L - 1:
            z_dense, z = activation(z_dense), activation(z)
    measured = (z_dense - z).norm(dim=1)
    return BoundResult(measured=measured, bound=bound, data_free_bound=data_free)

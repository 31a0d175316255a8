"""Factorized layers: W = A·B (LowRankLinear) and the tied W = B·Bᵀ (SymmetricLowRankLinear).

Also the dense layers the engine can replace (nn.Linear and transformers' Conv1D) and their
weight in nn.Linear's out×in orientation.
"""

from __future__ import annotations

import math
import sys

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The two forms of a factorized layer, as reports and checkpoints name them.
LOWRANK = "lowrank"  # W = A·B
SYMMETRIC = "symmetric"  # W = B·Bᵀ


class LowRankLinear(nn.Module):
    """y = (x·Bᵀ)·Aᵀ + b with A: out×r and B: r×in; the dense product A·B is never formed."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(out_features, rank, **kw))
        self.B = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Random init whose product A·B has the entry variance of nn.Linear's default.

        nn.Linear draws W ~ U(-1/√in, 1/√in), so Var(W_ij) = 1/(3·in). With independent
        zero-mean entries Var((AB)_ij) = r·Var(A)·Var(B); B ~ N(0, 1/in) keeps x·Bᵀ at the
        scale of x, and A ~ N(0, 1/(3r)) then gives r·(1/(3r))·(1/in) = 1/(3·in).
        """
        nn.init.normal_(self.B, std=1.0 / math.sqrt(self.in_features))
        nn.init.normal_(self.A, std=1.0 / math.sqrt(3 * self.rank))
        _init_bias_like_linear(self.bias, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)

    def dense_weight(self) -> Tensor:
        """The out×in weight A·B this layer represents (for analysis only)."""
        return self.A @ self.B

    def factors(self) -> tuple[Tensor, ...]:
        """The factors as column matrices F (each k×r) for the orthonormal penalty."""
        return (self.A, self.B.T)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"rank={self.rank}, bias={self.bias is not None}"
        )


class SymmetricLowRankLinear(nn.Module):
    """Tied square layer y = x·B·Bᵀ + b, i.e. W = B·Bᵀ with a single factor B: n×r."""

    def __init__(
        self,
        features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.in_features = self.out_features = features
        self.rank = rank
        self.B = nn.Parameter(torch.empty(features, rank, **kw))
        self.bias = nn.Parameter(torch.empty(features, **kw)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """B ~ N(0, (3·n·r)^(-1/2)) so off-diagonal (BBᵀ)_ij has variance r·Var(B)² = 1/(3n)."""
        nn.init.normal_(self.B, std=(3 * self.in_features * self.rank) ** -0.25)
        _init_bias_like_linear(self.bias, self.in_features)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(F.linear(x, self.B.T), self.B, self.bias)

    def dense_weight(self) -> Tensor:
        """The n×n weight B·Bᵀ this layer represents (for analysis only)."""
        return self.B @ self.B.T

    def factors(self) -> tuple[Tensor, ...]:
        return (self.B,)

    def extra_repr(self) -> str:
        return f"features={self.in_features}, rank={self.rank}, bias={self.bias is not None}"


FactorizedLayer = LowRankLinear | SymmetricLowRankLinear


def _init_bias_like_linear(bias: Tensor | None, fan_in: int) -> None:
    if bias is not None:
        bound = 1.0 / math.sqrt(fan_in)
        nn.init.uniform_(bias, -bound, bound)


def is_conv1d(module: nn.Module) -> bool:
    # transformers is heavy to import; a Conv1D instance can only exist once it is loaded.
    if "transformers" not in sys.modules:
        return False
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, Conv1D)


def is_factorizable(module: nn.Module) -> bool:
    """True for the dense layers compress_model can replace: nn.Linear and GPT-2's Conv1D."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> tuple[Tensor, Tensor | None]:
    """(W, b) with W in nn.Linear's out×in orientation, for dense and factorized layers.

    transformers' Conv1D computes x·W + b with W stored in×out, so its weight is transposed.
    """
    if isinstance(module, LowRankLinear | SymmetricLowRankLinear):
        return module.dense_weight(), module.bias
    if isinstance(module, nn.Linear):
        return module.weight, module.bias
    if is_conv1d(module):
        return module.weight.T, module.bias
    raise TypeError(f"{type(module).__name__} is not a Linear, Conv1D or factorized layer")



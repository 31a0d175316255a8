"""Rank rules: which ranks save parameters for a layer, and checking a requested rank."""

from __future__ import annotations


class RankError(ValueError):
    """A rank that is not a positive integer, or that saves no parameters for a layer."""


def max_useful_rank(out_features: int, in_features: int, symmetric: bool = False) -> int:
    """Largest r that saves parameters: r·(m+n) < m·n, or r·n < n² for the tied form."""
    if symmetric:
        return in_features - 1
    mn = out_features * in_features
    return -(-mn // (out_features + in_features)) - 1  # ceil(mn/(m+n)) - 1


def validate_rank(
    name: str,
    shape: tuple[int, int],
    rank: object,
    *,
    symmetric: bool = False,
    allow_full_rank: bool = False,
) -> int:
    """Return rank as int, or raise RankError naming the layer, its shape and the allowed range."""
    out_f, in_f = shape
    form = "symmetric" if symmetric else "low-rank"
    limit = min(shape) if allow_full_rank else max_useful_rank(out_f, in_f, symmetric)
    why = "" if allow_full_rank else " (larger ranks save no parameters)"
    where = f"layer '{name}' of shape {out_f}×{in_f} ({form} form): allowed 1 ≤ rank ≤ {limit}{why}"
    if isinstance(rank, bool) or not isinstance(rank, int):
        raise RankError(f"rank={rank!r} is not an integer for {where}")
    if not 1 <= rank <= limit:
        raise RankError(f"rank={rank} is out of range for {where}")
    return rank



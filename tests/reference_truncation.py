"""Plain-SVD truncation of a GPT-2's blocks, written independently of nnsvd: the reference that tests
check the suite's uniform allocation and plain SVD against.

It imports nothing from nnsvd on purpose. The rank rule and the truncation are written here from their
formulas, so a test that compares the suite with it checks the engine's allocation and factorization,
not a copy of them:

- every block target keeps the fraction 1 − removed of its m·n weights: r = max(1, ⌊m·n·(1 − removed)/(m + n)⌋);
- its weight is replaced by the rank-r truncation U_r·Σ_r·V_rᵀ of its float64 SVD, kept dense.
"""

from __future__ import annotations

import copy

import torch
from transformers import GPT2LMHeadModel

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def truncate_blocks(model: GPT2LMHeadModel, removed: float) -> GPT2LMHeadModel:
    """A copy of the model with every block target's weight replaced by its uniform-rank truncation."""
    z = copy.deepcopy(model)
    for block in z.transformer.h:
        for target in TARGETS:
            layer = block.get_submodule(target)
            W = layer.weight.data.double()
            m, n = W.shape
            r = max(1, int(m * n * (1 - removed) / (m + n)))
            U, S, Vh = torch.linalg.svd(W, full_matrices=False)
            layer.weight.data = ((U[:, :r] * S[:r]) @ Vh[:r]).to(layer.weight.dtype)
    return z

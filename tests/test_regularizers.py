"""Exact-math tests of nnsvd.lowrank.regularizers.orthonormal_penalty."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from nnsvd import LowRankLinear, SymmetricLowRankLinear, orthonormal_penalty

pytestmark = pytest.mark.usefixtures("single_thread")


def gram_term(F: torch.Tensor) -> torch.Tensor:
    """‖FᵀF − I_r‖²_F written out entry by entry."""
    r = F.shape[1]
    total = torch.zeros((), dtype=F.dtype)
    for i in range(r):
        for j in range(r):
            g = (F[:, i] * F[:, j]).sum() - (1.0 if i == j else 0.0)
            total = total + g * g
    return total


def original_penalty(F: torch.Tensor) -> torch.Tensor:
    """The original formulation ‖FFᵀ − I_k‖² + ‖FᵀF − I_r‖²."""
    k, r = F.shape
    eye_k = torch.eye(k, dtype=F.dtype)
    eye_r = torch.eye(r, dtype=F.dtype)
    return (F @ F.T - eye_k).square().sum() + (F.T @ F - eye_r).square().sum()


def orthonormal(k: int, r: int) -> torch.Tensor:
    Q, _ = torch.linalg.qr(torch.randn(k, r, dtype=torch.float64))
    return Q


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        kw = {"dtype": torch.float64}
        self.dense = nn.Linear(5, 7, **kw)  # not factorized: contributes nothing
        self.plain = LowRankLinear(7, 5, 3, **kw)
        self.sym = SymmetricLowRankLinear(6, 2, **kw)


def test_penalty_equals_hand_computed_sum():
    torch.manual_seed(0)
    model = Mixed()
    expected = gram_term(model.plain.A) + gram_term(model.plain.B.T) + gram_term(model.sym.B)
    got = orthonormal_penalty(model)
    assert got.dtype == torch.float64 and got.shape == ()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)
    assert float(got.detach()) > 0.1


def test_penalty_is_zero_for_orthonormal_columns_and_exact_when_scaled():
    torch.manual_seed(0)
    model = Mixed()
    with torch.no_grad():
        model.plain.A.copy_(orthonormal(5, 3))
        model.plain.B.copy_(orthonormal(7, 3).T)
        model.sym.B.copy_(orthonormal(6, 2))
    assert float(orthonormal_penalty(model).detach()) < 1e-24
    with torch.no_grad():
        model.plain.A.mul_(2)  # AᵀA = 4·I_3: three diagonal entries off by 3
    torch.testing.assert_close(orthonormal_penalty(model), torch.tensor(27.0, dtype=torch.float64))
    with torch.no_grad():
        model.plain.A.div_(2)
        model.plain.B.mul_(3)  # BBᵀ = 9·I_3: the Bᵀ factor is penalized, not B
    torch.testing.assert_close(orthonormal_penalty(model), torch.tensor(3 * 64.0, dtype=torch.float64))


def test_symmetric_layer_contributes_one_term():
    torch.manual_seed(0)
    layer = SymmetricLowRankLinear(9, 4, dtype=torch.float64)
    model = nn.Sequential(layer)
    torch.testing.assert_close(orthonormal_penalty(model), gram_term(layer.B), rtol=1e-12, atol=0)


def test_model_without_factorized_layers_has_zero_penalty():
    p = orthonormal_penalty(nn.Sequential(nn.Linear(3, 3)))
    assert p.shape == () and float(p) == 0.0


def test_penalty_trains_the_factors():
    torch.manual_seed(0)
    model = Mixed()
    penalty = orthonormal_penalty(model)
    penalty.backward()
    for p in (model.plain.A, model.plain.B, model.sym.B):
        assert p.grad is not None and float(p.grad.abs().max()) > 0
    assert model.dense.weight.grad is None


@pytest.mark.parametrize(("k", "r"), [(9, 4), (5, 5), (12, 1)])
def test_original_formulation_is_twice_ours_plus_constant(k, r):
    torch.manual_seed(k * 10 + r)
    layer = SymmetricLowRankLinear(k, r, dtype=torch.float64)
    with torch.no_grad():
        layer.B.mul_(3)  # away from orthonormal so the gradients are large
    model = nn.Sequential(layer)

    ours = orthonormal_penalty(model)
    (grad_ours,) = torch.autograd.grad(ours, layer.B)
    orig = original_penalty(layer.B)
    (grad_orig,) = torch.autograd.grad(orig, layer.B)

    assert float(grad_ours.abs().max()) > 1.0
    torch.testing.assert_close(grad_orig, 2 * grad_ours, rtol=0, atol=1e-8)
    torch.testing.assert_close(float((orig - 2 * ours).detach()), float(k - r), rtol=0, atol=1e-8)


def test_original_formulation_relation_for_plain_layers():
    torch.manual_seed(0)
    out_f, in_f, r = 8, 11, 3
    layer = LowRankLinear(in_f, out_f, r, dtype=torch.float64)
    model = nn.Sequential(layer)
    ours = orthonormal_penalty(model)
    orig = original_penalty(layer.A) + original_penalty(layer.B.T)
    g_ours = torch.autograd.grad(ours, [layer.A, layer.B])
    g_orig = torch.autograd.grad(orig, [layer.A, layer.B])
    for a, b in zip(g_orig, g_ours):
        torch.testing.assert_close(a, 2 * b, rtol=0, atol=1e-8)
    torch.testing.assert_close(
        float((orig - 2 * ours).detach()), float((out_f - r) + (in_f - r)), rtol=0, atol=1e-8
    )

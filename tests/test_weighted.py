"""Exact-math tests of the data-aware methods (nnsvd.lowrank.weighted): Ŵ = L⁻¹·trunc_r(L·W·R)·R⁻¹."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from nnsvd.lowrank import (
    CalibrationError,
    InputStats,
    LayerStats,
    asvd,
    compress_model,
    damped_cholesky,
    fwsvd,
    linear_weight,
    relative_data_error,
    resolve_factorizer,
    svd_full,
    weighted_truncation,
    whiten,
)

pytestmark = pytest.mark.usefixtures("single_thread")


def stats_of(X: torch.Tensor, fisher: torch.Tensor | None = None) -> LayerStats:
    """The LayerStats a calibration pass would collect from input rows X (N×in)."""
    X = X.double()
    return LayerStats(InputStats(X.T @ X, X.abs().sum(0), X.shape[0]), fisher)


def correlated_inputs(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) * torch.logspace(0, -2, d, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + 0.3


def fro(M: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(M.detach()))


def product(f) -> torch.Tensor:
    return f.A @ f.B


@pytest.mark.parametrize(("shape", "rank"), [((20, 30), 5), ((48, 16), 7), ((16, 16), 1)])
def test_whiten_without_damping_attains_the_data_optimum(shape, rank):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(*shape, generator=g, dtype=torch.float64)
    X = correlated_inputs(200, shape[1])
    f = whiten(W, rank, calibration=stats_of(X), damp=0.0)
    err = fro((W - product(f)) @ X.T)
    # the predicted minimum: the tail of the spectrum of W·C, C·Cᵀ = XᵀX (per token: scale by √N)
    tail = float(f.singular_values[rank:].square().sum().sqrt()) * X.shape[0] ** 0.5
    assert err == pytest.approx(tail, rel=1e-6)
    # independently: the optimum projects W·Xᵀ onto its top-r left singular space
    Y = W @ X.T
    U = torch.linalg.svd(Y, full_matrices=False).U[:, :rank]
    assert err == pytest.approx(fro(Y - U @ U.T @ Y), rel=1e-6)
    # and the reported relative data error is that error
    assert f.data_error == pytest.approx(err / fro(Y), rel=1e-6)
    assert f.damping == 0.0 and f.notes == [] and f.weighted


@pytest.mark.parametrize("seed", range(5))
def test_whiten_never_has_a_larger_data_error_than_plain_svd(seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(24, 32, generator=g, dtype=torch.float64)
    X = correlated_inputs(100, 32, seed)
    G = X.T @ X
    for rank in (1, 4, 12):
        plain = relative_data_error(W, product(svd_full(W, rank)), G)
        whitened = relative_data_error(W, product(whiten(W, rank, calibration=stats_of(X), damp=0.0)), G)
        assert whitened <= plain + 1e-12
        assert whitened < plain  # correlated inputs: strictly better


def test_whiten_data_error_shortcut_equals_the_gram_computation_with_damping():
    W = torch.randn(30, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    X = correlated_inputs(300, 40)
    for damp in (0.01, 0.3):
        f = whiten(W, 6, calibration=stats_of(X), damp=damp)
        assert f.data_error == pytest.approx(relative_data_error(W, product(f), X.T @ X), rel=1e-9)
        assert f.damping == pytest.approx(damp * float((X.T @ X).diagonal().mean()), rel=1e-12)


def test_asvd_with_alpha_zero_and_fwsvd_with_uniform_fisher_are_plain_svd():
    W = torch.randn(20, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    X = correlated_inputs(50, 30)
    plain = product(svd_full(W, 5))
    assert torch.allclose(product(asvd(W, 5, calibration=stats_of(X), alpha=0.0)), plain, atol=1e-10)
    uniform = stats_of(X, fisher=torch.full((20,), 7.5, dtype=torch.float64))
    assert torch.allclose(product(fwsvd(W, 5, calibration=uniform)), plain, atol=1e-10)


def test_asvd_and_fwsvd_minimize_their_weighted_norms():
    """Each is the Eckart–Young optimum of its weighted matrix: any other rank-r Ŵ does worse there."""
    g = torch.Generator().manual_seed(4)
    W = torch.randn(12, 18, generator=g, dtype=torch.float64)
    X = correlated_inputs(80, 18)
    fisher = torch.rand(12, generator=g, dtype=torch.float64) * 5
    stats = stats_of(X, fisher)
    s = X.abs().mean(0) ** 0.5
    s = s / s.mean() + 1e-6
    rows = fisher.sqrt() / fisher.sqrt().mean() + 1e-6
    for f, weigh in ((asvd(W, 4, calibration=stats), lambda M: M * s), (fwsvd(W, 4, calibration=stats), lambda M: rows[:, None] * M)):
        best = fro(weigh(W - product(f)))
        assert best == pytest.approx(float(f.singular_values[4:].square().sum().sqrt()), rel=1e-9)
        for _ in range(20):
            other = product(svd_full(W + 0.05 * torch.randn(12, 18, generator=g, dtype=torch.float64), 4))
            assert fro(weigh(W - other)) >= best - 1e-12


def test_weighted_truncation_full_rank_round_trip():
    W = torch.randn(10, 14, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    C = torch.linalg.cholesky(correlated_inputs(60, 14).T.__matmul__(correlated_inputs(60, 14)) + torch.eye(14))
    f = weighted_truncation(W, 10, left=torch.rand(10, dtype=torch.float64) + 0.5, right=C)
    assert torch.allclose(product(f), W, atol=1e-9)


def test_rank_deficient_calibration_gives_finite_factors_and_logged_raises(caplog):
    """Dead ReLU units (zero input channels) make XᵀX singular: at damp=0 Cholesky fails, λ is raised."""
    torch.manual_seed(6)
    W = torch.randn(16, 24, dtype=torch.float64)
    X = torch.relu(torch.randn(10, 24, dtype=torch.float64))  # fewer tokens than features
    X[:, :5] = 0.0  # and 5 dead units
    stats = stats_of(X)
    f = whiten(W, 4, calibration=stats, damp=0.0)
    assert torch.isfinite(f.A).all() and torch.isfinite(f.B).all()
    assert len(f.notes) >= 1 and "raised λ" in f.notes[0] and f.damping > 0
    model = nn.Sequential(nn.Linear(24, 16).double())
    model[0].weight.data.copy_(W)
    with caplog.at_level("WARNING"):
        report = compress_model(model, ["0"], 4, method=resolve_factorizer("whiten", damp=0.0),
                                calibration={"0": stats})
    assert any("layer '0': Cholesky of XᵀX + λI failed" in r.getMessage() for r in caplog.records)
    assert report.layers[0].damping > 0 and 0 <= report.layers[0].rel_data_error < 1
    assert torch.isfinite(model[0].A).all() and torch.isfinite(model[0].B).all()
    # asvd and fwsvd stay finite on the same dead channels / dead rows
    assert torch.isfinite(product(asvd(W, 4, calibration=stats))).all()
    dead_rows = stats_of(X, fisher=torch.cat([torch.zeros(4), torch.rand(12)]).double())
    assert torch.isfinite(product(fwsvd(W, 4, calibration=dead_rows))).all()


def test_damped_cholesky_raises_tenfold_three_times_then_gives_up():
    G = torch.tensor([[1.0, 100.0], [100.0, 1.0]], dtype=torch.float64)  # indefinite: eigenvalues 101, -99
    with pytest.raises(CalibrationError, match="3 tenfold raises"):
        damped_cholesky(G, 0.01)
    C, lam, notes = damped_cholesky(G, 1.0)  # λ = 1 and 10 fail (−99 + λ < 0), 100 succeeds
    assert lam == pytest.approx(100.0) and len(notes) == 2
    assert torch.allclose(C @ C.T, G + lam * torch.eye(2, dtype=torch.float64))
    with pytest.raises(CalibrationError, match="all zero"):
        damped_cholesky(torch.zeros(3, 3, dtype=torch.float64), 0.01)


def test_fwsvd_without_fisher_and_all_zero_activations_are_refused():
    W = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(CalibrationError, match="calibration.fisher=true"):
        fwsvd(W, 2, calibration=stats_of(torch.randn(8, 6)))
    with pytest.raises(CalibrationError, match="all zero"):
        asvd(W, 2, calibration=stats_of(torch.zeros(8, 6)))


@pytest.mark.parametrize("method", ["asvd", "whiten", "fwsvd"])
def test_linear_and_conv1d_orientation_give_the_same_factorization(method):
    """Conv1D stores W as in×out; the data-aware methods see it in nn.Linear's out×in orientation."""
    torch.manual_seed(7)
    linear = nn.Linear(12, 20).double()
    conv = Conv1D(20, 12).double()
    conv.weight.data.copy_(linear.weight.data.T)
    conv.bias.data.copy_(linear.bias.data)
    X = correlated_inputs(64, 12)
    stats = stats_of(X, fisher=torch.rand(20, dtype=torch.float64) + 0.1)
    a, b = nn.Sequential(linear), nn.Sequential(conv)
    factorizer = resolve_factorizer(method)
    ra = compress_model(a, ["0"], 3, method=factorizer, calibration={"0": stats})
    rb = compress_model(b, ["0"], 3, method=factorizer, calibration={"0": stats})
    assert torch.allclose(a[0].dense_weight(), b[0].dense_weight(), atol=1e-12)
    assert torch.allclose(a(X), b(X), atol=1e-10)
    assert ra.layers[0].rel_data_error == pytest.approx(rb.layers[0].rel_data_error, rel=1e-9)
    # and the data error is that of the installed layer against the Conv1D's real weight
    W = linear_weight(conv)[0].double()
    assert rb.layers[0].rel_data_error == pytest.approx(
        fro((W - b[0].dense_weight()) @ X.T) / fro(W @ X.T), rel=1e-9)


def test_report_records_method_tokens_damping_and_data_error():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 6))
    dense = copy.deepcopy(model)
    X = torch.randn(40, 10)
    stats = {"0": stats_of(X), "2": stats_of(torch.relu(dense[0](X)).detach())}
    report = compress_model(model, ["0", "2"], 3, method=resolve_factorizer("whiten", damp=0.05), calibration=stats)
    for layer in report.layers:
        assert layer.method == "whiten" and layer.calib_tokens == 40
        assert layer.damping > 0 and 0 < layer.rel_data_error < 1 and layer.sigma_r1 is None
    plain = compress_model(copy.deepcopy(dense), ["0"], 3, method="svd")
    assert plain.layers[0].rel_data_error is None and plain.layers[0].calib_tokens is None


def test_method_options_are_checked():
    with pytest.raises(ValueError, match="takes no option damp"):
        resolve_factorizer("asvd", damp=0.1)
    with pytest.raises(ValueError, match="unknown; allowed: auto, svd, gram, randomized, asvd, whiten, fwsvd"):
        resolve_factorizer("qr")

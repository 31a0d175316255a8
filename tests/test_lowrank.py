"""Exact-math tests of nnsvd.lowrank: layers, truncated SVD, rank rules and model surgery."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode
from transformers.pytorch_utils import Conv1D

from nnsvd import (
    Factors,
    LowRankLinear,
    RankError,
    SymmetricLowRankLinear,
    compress_model,
    factorize,
    factorize_symmetric,
    lowrank_from_scratch,
    max_useful_rank,
    validate_rank,
)
from nnsvd.lowrank import linear_weight, svd_auto, svd_full, svd_gram, svd_randomized

pytestmark = pytest.mark.usefixtures("single_thread")


# ----------------------------------------------------------------------------- helpers


class Wrap(nn.Module):
    """One named layer ('layer') so compress_model has a target name."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x)


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 10)
        self.proj = nn.Linear(10, 12)

    def forward(self, x):
        return self.proj(torch.relu(self.fc(x)))


class Blocks(nn.Module):
    def __init__(self, n: int = 2) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(n))
        self.head = nn.Linear(12, 3)

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return self.head(x)


def fro(M: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm(M.detach().double()))


def tail(W: torch.Tensor, rank: int) -> float:
    """Eckart–Young error √(Σ_{i>r} σ_i²), from the float64 spectrum."""
    S = torch.linalg.svdvals(W.detach().double())
    return float(S[rank:].square().sum().sqrt())


def assert_rel(actual: float, expected: float, tol: float) -> None:
    assert abs(actual - expected) <= tol * abs(expected), (actual, expected, tol)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------- LowRankLinear


def test_lowrank_linear_forward_is_factored_product_plus_bias():
    torch.manual_seed(0)
    layer = LowRankLinear(7, 5, 3)
    x = torch.randn(4, 7)
    A, B, b = layer.A, layer.B, layer.bias
    with torch.no_grad():
        assert torch.equal(layer.dense_weight(), A @ B)
        y = layer(x)
        torch.testing.assert_close(y, x @ (A @ B).T + b, rtol=0, atol=1e-6)
        torch.testing.assert_close(y, F.linear(F.linear(x, B), A, b), rtol=0, atol=1e-7)
        # leading batch dimensions are kept
        x3 = torch.randn(2, 3, 7)
        torch.testing.assert_close(layer(x3), x3 @ (A @ B).T + b, rtol=0, atol=1e-6)
    assert layer.A.shape == (5, 3) and layer.B.shape == (3, 7) and layer.bias.shape == (5,)


def test_lowrank_linear_forward_never_forms_dense_product():
    """No op in forward produces an out×in tensor (the dense A·B), and dense_weight is not called."""
    torch.manual_seed(0)
    out_f, in_f, rank, batch = 5, 7, 2, 3
    layer = LowRankLinear(in_f, out_f, rank)
    x = torch.randn(batch, in_f)

    shapes: list[tuple[int, ...]] = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            result = func(*args, **(kwargs or {}))
            if isinstance(result, torch.Tensor):
                shapes.append(tuple(result.shape))
            return result

    def boom():
        raise AssertionError("forward called dense_weight()")

    layer.dense_weight = boom
    with torch.no_grad(), Record():
        y = layer(x)
    assert (batch, rank) in shapes and (batch, out_f) in shapes
    assert (out_f, in_f) not in shapes
    assert y.shape == (batch, out_f)


def test_lowrank_linear_without_bias():
    torch.manual_seed(0)
    layer = LowRankLinear(6, 4, 2, bias=False)
    assert layer.bias is None
    x = torch.randn(3, 6)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), x @ (layer.A @ layer.B).T, rtol=0, atol=1e-6)


def test_compress_linear_full_rank_reproduces_outputs_and_keeps_bias():
    torch.manual_seed(0)
    dense = nn.Linear(7, 5)
    model = Wrap(copy.deepcopy(dense))
    report = compress_model(model, ["layer"], rank=5, allow_full_rank=True)
    new = model.layer
    assert isinstance(new, LowRankLinear)
    assert (new.out_features, new.in_features, new.rank) == (5, 7, 5)
    assert report.layers[0].shape == (5, 7)
    assert torch.equal(new.bias, dense.bias)
    W, b = linear_weight(new)
    assert W.shape == (5, 7) and b is new.bias
    x = torch.randn(11, 7)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(W, dense.weight, rtol=0, atol=1e-5)


def test_conv1d_orientation_and_full_rank_compression():
    """transformers' Conv1D(nf=out, nx=in) stores W as in×out and computes x·W + b."""
    torch.manual_seed(0)
    in_f, out_f = 7, 5
    conv = Conv1D(nf=out_f, nx=in_f)
    with torch.no_grad():
        conv.bias.normal_()
    assert conv.weight.shape == (in_f, out_f)
    W, b = linear_weight(conv)
    assert W.shape == (out_f, in_f)
    assert torch.equal(W, conv.weight.T) and b is conv.bias
    x = torch.randn(2, 3, in_f)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), x @ conv.weight + conv.bias, rtol=0, atol=1e-6)
        torch.testing.assert_close(conv(x), F.linear(x, W, b), rtol=0, atol=1e-6)

    model = Wrap(copy.deepcopy(conv))
    report = compress_model(model, ["layer"], rank=min(in_f, out_f), allow_full_rank=True)
    new = model.layer
    assert isinstance(new, LowRankLinear)
    assert (new.out_features, new.in_features) == (out_f, in_f)
    assert report.layers[0].shape == (out_f, in_f)
    assert report.layers[0].params_before == in_f * out_f + out_f
    assert torch.equal(new.bias, conv.bias)
    with torch.no_grad():
        torch.testing.assert_close(model(x), conv(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(linear_weight(new)[0], conv.weight.T, rtol=0, atol=1e-5)


def test_conv1d_truncation_is_optimal_in_linear_orientation():
    torch.manual_seed(1)
    conv = Conv1D(nf=9, nx=13)
    with torch.no_grad():
        conv.weight.normal_()
    model = Wrap(copy.deepcopy(conv))
    report = compress_model(model, ["layer"], rank=3, method="svd")
    err = fro(conv.weight.T.double() - model.layer.dense_weight().double())
    assert_rel(err, tail(conv.weight, 3), 1e-6)
    assert_rel(report.layers[0].rel_fro_error, err / fro(conv.weight), 1e-6)


# ----------------------------------------------------------------- SymmetricLowRankLinear


def test_symmetric_layer_dense_weight_and_forward():
    torch.manual_seed(0)
    layer = SymmetricLowRankLinear(6, 3)
    assert layer.B.shape == (6, 3) and layer.in_features == layer.out_features == 6
    x = torch.randn(4, 6)
    with torch.no_grad():
        W = layer.dense_weight()
        assert torch.equal(W, layer.B @ layer.B.T)
        torch.testing.assert_close(W, W.T, rtol=0, atol=0)
        torch.testing.assert_close(layer(x), x @ W.T + layer.bias, rtol=0, atol=1e-6)
    no_bias = SymmetricLowRankLinear(6, 3, bias=False)
    assert no_bias.bias is None
    with torch.no_grad():
        torch.testing.assert_close(no_bias(x), x @ no_bias.dense_weight().T, rtol=0, atol=1e-6)


def _psd_truncation(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """V_r diag(max(λ_r, 0)) V_rᵀ of the symmetric part, and all eigenvalues in descending order."""
    W64 = W.double()
    lam, Q = torch.linalg.eigh((W64 + W64.T) / 2)
    lam, Q = lam.flip(0), Q.flip(1)
    return Q[:, :rank] @ torch.diag(lam[:rank].clamp_min(0)) @ Q[:, :rank].T, lam


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_factorize_symmetric_is_best_psd_approximation(dtype):
    torch.manual_seed(0)
    n = 12
    W = torch.randn(n, n, dtype=dtype)
    S = (W.double() + W.double().T) / 2
    for rank in (1, 3, 6, 11, 12):
        B, evals = factorize_symmetric(W, rank)
        assert B.dtype == dtype and B.shape == (n, rank)
        expected, lam = _psd_truncation(W, rank)
        torch.testing.assert_close(evals, lam, rtol=0, atol=1e-12)
        assert torch.all(evals[:-1] >= evals[1:])
        BBt = B.double() @ B.double().T
        tol = 1e-5 if dtype == torch.float32 else 1e-12
        torch.testing.assert_close(BBt, expected, rtol=0, atol=tol * float(lam.abs().max()))
        # the PSD-projection Eckart–Young error over kept-negative and dropped eigenvalues
        kept, dropped = lam[:rank], lam[rank:]
        err = math.sqrt(float(kept.clamp_max(0).square().sum() + dropped.square().sum()))
        assert_rel(fro(S - BBt), err, 1e-5 if dtype == torch.float32 else 1e-10)


def test_factorize_symmetric_clips_negative_eigenvalues_to_zero_columns():
    torch.manual_seed(0)
    n = 6
    Q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    lam = torch.tensor([5.0, 3.0, 1.0, -0.5, -2.0, -4.0], dtype=torch.float64)
    S = Q @ torch.diag(lam) @ Q.T
    K = torch.randn(n, n, dtype=torch.float64)
    W = S + (K - K.T)  # the antisymmetric part must be ignored
    B, evals = factorize_symmetric(W, 5)
    torch.testing.assert_close(evals, lam, rtol=0, atol=1e-12)
    assert torch.all(B[:, 3:] == 0)
    col_norms = B[:, :3].norm(dim=0)
    torch.testing.assert_close(col_norms, lam[:3].sqrt(), rtol=1e-12, atol=0)
    torch.testing.assert_close(B @ B.T, Q[:, :3] @ torch.diag(lam[:3]) @ Q[:, :3].T, rtol=0, atol=1e-12)
    assert_rel(fro(S - B @ B.T), math.sqrt(0.5**2 + 2.0**2 + 4.0**2), 1e-12)


def test_symmetric_needs_a_square_target():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(7, 5), nn.ReLU(), nn.Linear(5, 3))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="square"):
        compress_model(model, ["0", "2"], rank=1, symmetric=True)
    assert isinstance(model[0], nn.Linear) and isinstance(model[2], nn.Linear)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])
    with pytest.raises(ValueError, match="square"):
        lowrank_from_scratch(model, ["0"], rank=1, symmetric=True)


def test_symmetric_mixed_targets_forms_and_errors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 6))
    dense = copy.deepcopy(model)
    report = compress_model(model, ["0", "2"], rank=3, symmetric=True, method="svd")
    assert report.forms() == {"0": "symmetric", "2": "lowrank"}
    assert isinstance(model[0], SymmetricLowRankLinear) and isinstance(model[2], LowRankLinear)
    assert report.ranks() == {"0": 3, "2": 3}
    sym, plain = report.layers
    W0 = dense[0].weight.double()
    expected, _ = _psd_truncation(W0, 3)
    torch.testing.assert_close(model[0].dense_weight().double(), expected, rtol=0, atol=1e-5)
    assert_rel(sym.rel_fro_error, fro(W0 - model[0].dense_weight()) / fro(W0), 1e-6)
    assert sym.params_after == 10 * 3 + 10 == n_params(model[0])
    W2 = dense[2].weight.detach()
    assert_rel(plain.rel_fro_error, fro(W2.double() - model[2].dense_weight()) / fro(W2), 1e-6)
    assert_rel(plain.sigma_r1, float(torch.linalg.svdvals(W2.double())[3]), 1e-6)


# ------------------------------------------------------------------------ truncated SVD

SHAPES = [(50, 80), (120, 40), (64, 64), (300, 300)]
RANKS = {
    (50, 80): [1, 4, 17, 33],
    (120, 40): [1, 3, 10, 29],
    (64, 64): [1, 5, 20, 31],
    (300, 300): [1, 19, 60, 149],
}
EXACT = {"svd": svd_full, "gram": svd_gram, "auto": svd_auto}


def _exact_ranks(method: str, shape: tuple[int, int]) -> list[int]:
    """svd_auto is exact only where it does not dispatch to the randomized sketch (r·16 > min(m, n))."""
    ranks = RANKS[shape]
    if method == "auto":
        ranks = [r for r in ranks if 16 * r > min(shape)]
    assert ranks
    return ranks


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("method", list(EXACT))
def test_exact_truncated_svd_attains_eckart_young(method, shape):
    torch.manual_seed(1000 * shape[0] + shape[1])
    W = torch.randn(*shape)
    W64 = W.double()
    S = torch.linalg.svdvals(W64)
    for rank in _exact_ranks(method, shape):
        optimum = float(S[rank:].square().sum().sqrt())
        f = factorize(W, rank, method)
        assert f.A.dtype == torch.float32 and f.B.dtype == torch.float32
        assert f.A.shape == (shape[0], rank) and f.B.shape == (rank, shape[1])
        A, B = f.A.double(), f.B.double()
        assert_rel(fro(W64 - A @ B), optimum, 1e-6)
        assert_rel(f.fro_error, optimum, 1e-6)
        # Σ is split as √Σ into both factors
        diag = torch.diag(S[:rank])
        tol = 1e-5 * float(S[0])
        torch.testing.assert_close(A.T @ A, diag, rtol=1e-5, atol=tol)
        torch.testing.assert_close(B @ B.T, diag, rtol=1e-5, atol=tol)
        torch.testing.assert_close(f.singular_values[: min(shape)], S, rtol=1e-6, atol=1e-8 * float(S[0]))
        # the routine itself, on the float64 weight
        g = EXACT[method](W64, rank)
        assert g.A.dtype == torch.float64
        assert_rel(fro(W64 - g.A @ g.B), optimum, 1e-10)


@pytest.mark.parametrize("method", ["svd", "gram", "auto", "randomized"])
def test_factors_keep_the_weight_dtype(method):
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        W = torch.randn(40, 24, dtype=dtype)
        f = factorize(W, 5, method)
        assert f.A.dtype == dtype and f.B.dtype == dtype
        assert f.A.device == W.device
        assert f.A.shape == (40, 5) and f.B.shape == (5, 24)
    # and the installed layer's parameters too
    model = Wrap(nn.Linear(24, 40, dtype=torch.float64))
    compress_model(model, ["layer"], rank=5, method=method)
    assert model.layer.A.dtype == torch.float64 and model.layer.bias.dtype == torch.float64


def test_exact_methods_at_rank_one_and_low_rank_weights():
    """A weight of exact rank k is recovered exactly at r = k; the error is σ-tail at r < k."""
    torch.manual_seed(0)
    U = torch.randn(30, 4, dtype=torch.float64)
    V = torch.randn(4, 20, dtype=torch.float64)
    W = U @ V
    for method in ("svd", "gram"):
        f = factorize(W, 4, method)
        assert fro(W - f.A @ f.B) <= 1e-10 * fro(W)
        f1 = factorize(W, 1, method)
        assert_rel(fro(W - f1.A @ f1.B), tail(W, 1), 1e-10)


def test_auto_dispatch_rule():
    torch.manual_seed(0)
    small_rank = torch.randn(64, 96, dtype=torch.float64)  # 4·16 ≤ 64: randomized
    for got, want in (
        (svd_auto(small_rank, 4), svd_randomized(small_rank, 4)),
        (svd_auto(small_rank, 5), svd_full(small_rank, 5)),
    ):
        assert torch.equal(got.A, want.A) and torch.equal(got.B, want.B)
    big = torch.randn(300, 260, dtype=torch.float64)  # min ≥ 256 and r·16 > 260: Gram route
    got, want = svd_auto(big, 20), svd_gram(big, 20)
    assert torch.equal(got.A, want.A) and torch.equal(got.B, want.B)


@pytest.mark.parametrize(("shape", "rank"), [((768, 300), 16), ((400, 400), 20), ((300, 768), 16)])
def test_randomized_is_within_one_percent_of_optimum_on_flat_spectra(shape, rank):
    torch.manual_seed(0)
    W = torch.randn(*shape)  # Gaussian: a flat (worst-case) spectrum
    optimum = tail(W, rank)
    f = factorize(W, rank, "randomized")
    err = fro(W.double() - f.A.double() @ f.B.double())
    assert optimum * (1 - 1e-9) <= err <= 1.01 * optimum
    assert_rel(f.fro_error, err, 1e-6)  # the engine measures what the sketch cannot know


def test_randomized_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    W = torch.randn(200, 90, dtype=torch.float64)
    state = torch.get_rng_state()
    f1 = svd_randomized(W, 8)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(999)  # a different global state must not change the result
    f2 = svd_randomized(W, 8)
    assert torch.equal(f1.A, f2.A) and torch.equal(f1.B, f2.B)
    state = torch.get_rng_state()
    g1, g2 = factorize(W.float(), 8, "randomized"), factorize(W.float(), 8, "randomized")
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(g1.A, g2.A) and torch.equal(g1.B, g2.B)


def test_randomized_does_not_reseed_cuda(monkeypatch):
    """torch.manual_seed also reseeds every CUDA device (queued until CUDA starts, when CUDA is not
    yet initialized), and fork_rng(devices=[]) would not undo that: the sketch must not call it."""
    calls = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", lambda seed: calls.append(("all", seed)))
    monkeypatch.setattr(torch.cuda, "manual_seed", lambda seed: calls.append(("one", seed)))
    torch.manual_seed(0)
    calls.clear()
    svd_randomized(torch.randn(50, 40, dtype=torch.float64), 3)
    assert calls == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_randomized_leaves_cuda_rng_alone():
    torch.manual_seed(5)
    W = torch.randn(120, 80, dtype=torch.float64)
    state = torch.cuda.get_rng_state()
    svd_randomized(W, 4)
    f1 = svd_randomized(W.cuda(), 4)
    assert torch.equal(torch.cuda.get_rng_state(), state)
    f2 = svd_randomized(W.cuda(), 4)
    assert torch.equal(f1.A, f2.A)


@pytest.mark.parametrize("method", ["svd", "gram", "auto", "randomized"])
def test_report_errors_are_measured_errors_of_installed_layers(method):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(), nn.Linear(30, 50))
    dense = copy.deepcopy(model)
    report = compress_model(model, ["*"], rank={"0": 6, "2": 2, "4": 9}, method=method)
    assert [layer.name for layer in report.layers] == ["0", "2", "4"]
    for layer in report.layers:
        W = dense.get_submodule(layer.name).weight.detach().double()
        W_hat = model.get_submodule(layer.name).dense_weight().double()
        assert_rel(layer.rel_fro_error, fro(W - W_hat) / fro(W), 1e-6)
        if method != "randomized":
            assert_rel(layer.rel_fro_error, tail(W, layer.rank) / fro(W), 1e-6)
            assert_rel(layer.sigma_r1, float(torch.linalg.svdvals(W)[layer.rank]), 1e-6)
        assert layer.method == method


def test_report_error_of_symmetric_form_is_measured():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(24, 24), nn.ReLU(), nn.Linear(24, 24))
    dense = copy.deepcopy(model)
    report = compress_model(model, ["0", "2"], rank={"0": 5, "2": 20}, symmetric=True)
    assert report.forms() == {"0": "symmetric", "2": "symmetric"}
    for layer in report.layers:
        W = dense.get_submodule(layer.name).weight.detach().double()
        W_hat = model.get_submodule(layer.name).dense_weight().double()
        assert_rel(layer.rel_fro_error, fro(W - W_hat) / fro(W), 1e-6)
        assert layer.rel_fro_error > 0.5  # a random weight is far from symmetric PSD


def test_custom_factorizer_receives_float64_weight_and_calibration():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(9, 6), nn.ReLU(), nn.Linear(6, 4))
    dense = copy.deepcopy(model)
    calls = []

    def my_factorizer(W, rank, **context):
        calls.append((W.clone(), rank, context))
        A = torch.ones(W.shape[0], rank, dtype=W.dtype)
        B = torch.full((rank, W.shape[1]), 0.5, dtype=W.dtype)
        return Factors(A, B)

    marker = object()
    report = compress_model(model, ["0", "2"], rank=2, method=my_factorizer, calibration={"0": marker})
    assert len(calls) == 2
    (W0, r0, ctx0), (W2, r2, ctx2) = calls
    assert W0.dtype == torch.float64 and W0.shape == (6, 9) and r0 == 2
    torch.testing.assert_close(W0, dense[0].weight.double(), rtol=0, atol=0)
    assert ctx0 == {"calibration": marker}
    assert ctx2 == {} and r2 == 2 and W2.shape == (4, 6)
    assert torch.equal(model[0].dense_weight(), torch.ones(6, 9))
    assert torch.equal(model[0].bias, dense[0].bias)
    assert report.layers[0].method == "my_factorizer"
    W = dense[0].weight.double()
    assert_rel(report.layers[0].rel_fro_error, fro(W - 1.0) / fro(W), 1e-6)
    assert report.layers[0].sigma_r1 is None


def test_unknown_method_is_rejected():
    model = Wrap(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="qr"):
        compress_model(model, ["layer"], rank=2, method="qr")
    assert isinstance(model.layer, nn.Linear)


# ---------------------------------------------------------------------------- rank rules


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((64, 64), 31), ((3072, 768), 614), ((768, 3072), 614), ((2304, 768), 575), ((768, 768), 383)],
)
def test_max_useful_rank_values(shape, expected):
    assert max_useful_rank(*shape) == expected


def test_max_useful_rank_symmetric():
    assert max_useful_rank(64, 64, symmetric=True) == 63
    n, r = 64, 63
    assert r * n < n * n and not (r + 1) * n < n * n


def test_max_useful_rank_is_the_largest_saving_rank():
    rng = random.Random(0)
    shapes = [(rng.randint(1, 600), rng.randint(1, 600)) for _ in range(500)]
    shapes += [(m, n) for m in range(1, 25) for n in range(1, 25)]
    for m, n in shapes:
        r = max_useful_rank(m, n)
        assert r >= 0
        assert r * (m + n) < m * n, (m, n, r)
        assert not (r + 1) * (m + n) < m * n, (m, n, r)


@pytest.mark.parametrize("rank", [0, -1, 32, 8.0, "8", True])
def test_invalid_ranks_are_rejected_with_a_helpful_message(rank):
    with pytest.raises(RankError) as info:
        validate_rank("blocks.3.fc", (64, 64), rank)
    message = str(info.value)
    assert isinstance(info.value, ValueError)
    assert "'blocks.3.fc'" in message
    assert "64×64" in message
    assert f"rank={rank!r}" in message
    assert "31" in message


def test_valid_ranks_and_full_rank_switch():
    assert validate_rank("l", (64, 64), 1) == 1
    assert validate_rank("l", (64, 64), 31) == 31
    assert validate_rank("l", (64, 64), 63, symmetric=True) == 63
    with pytest.raises(RankError, match="63"):
        validate_rank("l", (64, 64), 64, symmetric=True)
    for shape in ((64, 64), (40, 64), (64, 40)):
        full = min(shape)
        assert validate_rank("l", shape, full, allow_full_rank=True) == full
        with pytest.raises(RankError, match=str(full)):
            validate_rank("l", shape, full + 1, allow_full_rank=True)
        with pytest.raises(RankError):
            validate_rank("l", shape, full)
        with pytest.raises(RankError):
            validate_rank("l", shape, 0, allow_full_rank=True)


def test_ranks_are_validated_before_any_layer_is_modified():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("l1", nn.Linear(16, 16))
    model.add_module("l2", nn.Linear(16, 16))
    before = copy.deepcopy(model.state_dict())
    for bad in ({"l1": 4, "l2": 100}, {"l1": 4}, {"l1": 4, "l2": 2.5}):
        with pytest.raises(RankError) as info:
            compress_model(model, ["l1", "l2"], rank=bad)
        assert "l2" in str(info.value)
        assert isinstance(model.l1, nn.Linear) and isinstance(model.l2, nn.Linear)
        with pytest.raises(RankError):
            lowrank_from_scratch(model, ["l1", "l2"], rank=bad)
        assert isinstance(model.l1, nn.Linear)
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key])


# ------------------------------------------------------------------------ compress_model


def test_glob_targets_replace_in_place():
    torch.manual_seed(0)
    model = Blocks()
    dense = copy.deepcopy(model)
    report = compress_model(model, ["blocks.*.fc"], rank=3)
    assert [layer.name for layer in report.layers] == ["blocks.0.fc", "blocks.1.fc"]
    for block, old in zip(model.blocks, dense.blocks):
        assert isinstance(block.fc, LowRankLinear) and block.fc.rank == 3
        assert isinstance(block.proj, nn.Linear)
        assert torch.equal(block.proj.weight, old.proj.weight)
    assert isinstance(model.head, nn.Linear)
    assert model(torch.randn(2, 12)).shape == (2, 3)


def test_pattern_matching_nothing_is_an_error():
    model = Blocks()
    with pytest.raises(ValueError, match=r"'blocks\.\*\.nope'"):
        compress_model(model, ["blocks.*.fc", "blocks.*.nope"], rank=3)
    assert isinstance(model.blocks[0].fc, nn.Linear)
    with pytest.raises(ValueError, match="empty"):
        compress_model(model, [], rank=3)


def test_report_fields_match_real_parameter_counts():
    torch.manual_seed(0)
    model = Blocks()
    report = compress_model(model, ["blocks.*.*"], rank={"*.fc": 4, "*.proj": 2}, method="svd")
    assert len(report.layers) == 4
    for layer in report.layers:
        module = model.get_submodule(layer.name)
        out_f, in_f = (10, 12) if layer.name.endswith("fc") else (12, 10)
        assert layer.shape == (out_f, in_f)
        assert layer.rank == (4 if layer.name.endswith("fc") else 2) == module.rank
        assert layer.form == "lowrank"
        assert layer.params_before == out_f * in_f + out_f
        assert layer.params_after == layer.rank * (out_f + in_f) + out_f == n_params(module)
        assert 0 < layer.rel_fro_error < 1
        assert layer.sigma_r1 > 0
        assert layer.time_s >= 0
    assert report.params_before == 2 * (130 + 132)
    assert report.params_after == sum(n_params(model.get_submodule(n)) for n in report.ranks())
    assert report.time_s >= 0
    rows = report.to_rows()
    assert rows[0]["shape"] == "10x12" and rows[0]["name"] == "blocks.0.fc"
    assert "blocks.1.proj" in str(report)


def test_full_rank_reproduces_mlp_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 8), nn.ReLU(), nn.Linear(8, 3))
    dense = copy.deepcopy(model)
    report = compress_model(model, ["*"], rank={"0": 6, "2": 8, "4": 3}, allow_full_rank=True)
    assert report.ranks() == {"0": 6, "2": 8, "4": 3}
    assert all(isinstance(model[i], LowRankLinear) for i in (0, 2, 4))
    x = torch.randn(32, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense(x), rtol=0, atol=1e-5)
    for layer in report.layers:
        assert layer.rel_fro_error < 1e-6


def test_rank_dict_first_matching_pattern_wins():
    torch.manual_seed(0)
    model = Blocks(3)
    report = compress_model(model, ["blocks.*.fc"], rank={"blocks.1.*": 2, "blocks.*": 5})
    assert report.ranks() == {"blocks.0.fc": 5, "blocks.1.fc": 2, "blocks.2.fc": 5}
    assert [b.fc.rank for b in model.blocks] == [5, 2, 5]


# ----------------------------------------------------------------------- from-scratch init


def test_lowrank_from_scratch_matches_linear_init_statistics():
    in_f, out_f, rank = 512, 256, 32
    variances, bias_vars = [], []
    for seed in range(4):
        torch.manual_seed(seed)
        model = Wrap(nn.Linear(in_f, out_f))
        report = lowrank_from_scratch(model, ["layer"], rank=rank)
        layer = model.layer
        assert isinstance(layer, LowRankLinear) and layer.rank == rank
        assert report.layers[0].method == "random" and report.layers[0].shape == (out_f, in_f)
        assert report.layers[0].params_after == rank * (in_f + out_f) + out_f
        with torch.no_grad():
            W = layer.dense_weight().double()
            variances.append(float(W.var()))
            bound = 1 / math.sqrt(in_f)
            assert float(layer.bias.abs().max()) <= bound
            bias_vars.append(float(layer.bias.double().var()))
            assert abs(float(W.mean())) < 0.05 * math.sqrt(1 / (3 * in_f))
    target = 1 / (3 * in_f)
    assert abs(sum(variances) / len(variances) - target) <= 0.10 * target
    # U(-1/√in, 1/√in) has variance 1/(3·in) too
    assert abs(sum(bias_vars) / len(bias_vars) - target) <= 0.15 * target


def test_symmetric_from_scratch_matches_linear_init_statistics():
    n, rank = 512, 32
    variances = []
    for seed in range(4):
        torch.manual_seed(seed)
        model = Wrap(nn.Linear(n, n))
        lowrank_from_scratch(model, ["layer"], rank=rank, symmetric=True)
        layer = model.layer
        assert isinstance(layer, SymmetricLowRankLinear) and layer.rank == rank
        with torch.no_grad():
            W = layer.dense_weight().double()
            off = W[~torch.eye(n, dtype=torch.bool)]
            variances.append(float(off.var()))
            assert float(layer.bias.abs().max()) <= 1 / math.sqrt(n)
    target = 1 / (3 * n)
    assert abs(sum(variances) / len(variances) - target) <= 0.10 * target


def test_direct_layer_construction_uses_the_same_init():
    torch.manual_seed(0)
    layer = LowRankLinear(512, 256, 32)
    assert abs(float(layer.B.detach().double().var()) * 512 - 1) < 0.05
    assert abs(float(layer.A.detach().double().var()) * 3 * 32 - 1) < 0.05
    sym = SymmetricLowRankLinear(512, 32)
    assert abs(float(sym.B.detach().double().var()) * math.sqrt(3 * 512 * 32) - 1) < 0.05

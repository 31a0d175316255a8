"""The output-error bounds of nnsvd.lowrank.bounds hold, are tight where they should be, and are not vacuous."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from nnsvd import compress_model, output_error_bound

pytestmark = pytest.mark.usefixtures("single_thread")


LAYERS = (0, 2, 4)
MAX_USEFUL_RANK = {"0": 12, "2": 15, "4": 4}  # max_useful_rank of 32×20, 32×32 and 5×32


@pytest.fixture(scope="module")
def trained() -> tuple[nn.Sequential, torch.Tensor]:
    """20→32→32→5 ReLU MLP trained for 200 Adam steps on a synthetic 5-class task."""
    torch.manual_seed(0)
    X = torch.randn(512, 20)
    y = (X @ torch.randn(20, 5)).argmax(dim=1)
    model = nn.Sequential(nn.Linear(20, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 5))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(200):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    with torch.no_grad():
        accuracy = float((model(X).argmax(dim=1) == y).float().mean())
    assert accuracy > 0.9  # it did learn: the weights are no longer random
    return model, X


def layers_of(model: nn.Module) -> list[nn.Module]:
    return [model[i] for i in LAYERS]


def dense64(layer: nn.Module) -> torch.Tensor:
    """The exact weight of a factorized layer: the product of its factors formed in float64."""
    return layer.A.detach().double() @ layer.B.detach().double()


def inputs(X: torch.Tensor) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {"train": X[:256], "random": 3 * torch.randn(256, 20, generator=g)}


def compressed(model: nn.Module, rank: int, symmetric: bool) -> nn.Module:
    comp = copy.deepcopy(model)
    ranks = {name: min(rank, limit) for name, limit in MAX_USEFUL_RANK.items()}
    if symmetric:
        ranks["2"] = rank
    report = compress_model(comp, ["0", "2", "4"], rank=ranks, symmetric=symmetric)
    assert report.forms()["2"] == ("symmetric" if symmetric else "lowrank")
    return comp


@pytest.mark.parametrize("symmetric", [False, True], ids=["plain", "symmetric"])
@pytest.mark.parametrize("rank", [1, 3, 8, 12])
def test_measured_le_bound_le_data_free(trained, rank, symmetric):
    model, X = trained
    comp = compressed(model, rank, symmetric)
    for name, x in inputs(X).items():
        res = output_error_bound(layers_of(model), layers_of(comp), x)
        assert res.measured.shape == res.bound.shape == res.data_free_bound.shape == (x.shape[0],)
        assert res.bound.dtype == torch.float64
        assert torch.all(res.measured <= res.bound + 1e-9), name
        assert torch.all(res.bound <= res.data_free_bound + 1e-9), name
        # measured is the real networks' output difference
        with torch.no_grad():
            real = (model.double()(x.double()) - comp.double()(x.double())).norm(dim=1)
        model.float()
        torch.testing.assert_close(res.measured, real, rtol=1e-9, atol=1e-10)
        # not vacuous: compression changes the outputs, so there is something to bound
        assert float((res.measured > 1e-6).double().mean()) > 0.9, name
        assert float(res.bound.min()) > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_full_rank_bound_is_zero(trained, dtype):
    """At full rank Ŵ = W up to the factors' rounding: exactly ~0 in float64, ~1e-7 relative in float32."""
    model, X = trained
    model = copy.deepcopy(model).to(dtype)
    comp = copy.deepcopy(model)
    compress_model(comp, ["0", "2", "4"], rank={"0": 20, "2": 32, "4": 5}, allow_full_rank=True)
    for x in inputs(X).values():
        res = output_error_bound(layers_of(model), layers_of(comp), x)
        assert torch.all(res.measured <= res.bound + 1e-9)
        assert torch.all(res.bound <= res.data_free_bound + 1e-9)
        if dtype == torch.float64:
            assert float(res.bound.max()) < 1e-9
            assert float(res.data_free_bound.max()) < 1e-9
        else:
            with torch.no_grad():
                scale = model.double()(x.double()).norm(dim=1)
            assert float(scale.min()) > 1
            assert torch.all(res.bound < 1e-5 * scale)
            assert torch.all(res.data_free_bound < 1e-4 * scale)


def test_identical_networks_give_zero():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 3))
    res = output_error_bound(layers_of_pair(model), layers_of_pair(model), torch.randn(10, 6))
    assert torch.all(res.measured == 0) and torch.all(res.bound == 0) and torch.all(res.data_free_bound == 0)


def layers_of_pair(model: nn.Module) -> list[nn.Module]:
    return [model[0], model[2]]


def test_single_layer_bound_is_attained():
    """With one layer the bound is ‖W − Ŵ‖₂‖x‖, attained at the top right singular vector of W − Ŵ."""
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(10, 8))
    comp = copy.deepcopy(dense)
    compress_model(comp, ["0"], rank=2, method="svd")
    D = dense[0].weight.detach().double() - dense64(comp[0])
    _, S, Vh = torch.linalg.svd(D)
    x = torch.stack([3 * Vh[0], torch.randn(10, dtype=torch.float64)])
    res = output_error_bound([dense[0]], [comp[0]], x)
    torch.testing.assert_close(res.bound, S[0] * x.norm(dim=1), rtol=1e-12, atol=0)
    torch.testing.assert_close(res.data_free_bound, res.bound, rtol=1e-12, atol=0)
    torch.testing.assert_close(res.measured[0], res.bound[0], rtol=1e-9, atol=0)
    assert float(res.measured[1]) < float(res.bound[1])


def test_two_layer_bounds_match_the_formula():
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(9, 7), nn.ReLU(), nn.Linear(7, 6))
    x = torch.randn(16, 9, dtype=torch.float64)
    W1, b1 = dense[0].weight.detach().double(), dense[0].bias.detach().double()
    W2 = dense[2].weight.detach().double()
    spec = lambda M: float(torch.linalg.matrix_norm(M, ord=2))  # noqa: E731

    first = copy.deepcopy(dense)  # only layer 1 compressed: ‖W2‖₂·‖W1 − Ŵ1‖₂·‖x‖
    compress_model(first, ["0"], rank=2, method="svd")
    D1 = W1 - dense64(first[0])
    res = output_error_bound(layers_of_pair(dense), layers_of_pair(first), x)
    expected = spec(W2) * spec(D1) * x.norm(dim=1)
    torch.testing.assert_close(res.bound, expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(res.data_free_bound, expected, rtol=1e-10, atol=0)

    second = copy.deepcopy(dense)  # only layer 2 compressed: ‖W2 − Ŵ2‖₂·‖relu(W1x + b1)‖
    compress_model(second, ["2"], rank=2, method="svd")
    D2 = W2 - dense64(second[2])
    res = output_error_bound(layers_of_pair(dense), layers_of_pair(second), x)
    z2 = torch.relu(x @ W1.T + b1).norm(dim=1)
    torch.testing.assert_close(res.bound, spec(D2) * z2, rtol=1e-10, atol=0)
    data_free = spec(D2) * (spec(W1) * x.norm(dim=1) + float(b1.norm()))
    torch.testing.assert_close(res.data_free_bound, data_free, rtol=1e-10, atol=0)
    assert torch.all(res.measured <= res.bound + 1e-9)

    both = copy.deepcopy(dense)  # dense norm downstream of layer 1, compressed activation into layer 2
    compress_model(both, ["0", "2"], rank=2, method="svd")
    W1h, W2h = dense64(both[0]), dense64(both[2])
    D1, D2 = W1 - W1h, W2 - W2h
    res = output_error_bound(layers_of_pair(dense), layers_of_pair(both), x)
    z2_hat = torch.relu(x @ W1h.T + b1).norm(dim=1)
    expected = spec(W2) * spec(D1) * x.norm(dim=1) + spec(D2) * z2_hat
    torch.testing.assert_close(res.bound, expected, rtol=1e-10, atol=0)
    data_free = spec(W2) * spec(D1) * x.norm(dim=1) + spec(D2) * (
        spec(W1h) * x.norm(dim=1) + float(b1.norm())
    )
    torch.testing.assert_close(res.data_free_bound, data_free, rtol=1e-10, atol=0)
    b2 = dense[2].bias.detach().double()
    f = torch.relu(x @ W1.T + b1) @ W2.T + b2
    f_hat = torch.relu(x @ W1h.T + b1) @ W2h.T + b2
    torch.testing.assert_close(res.measured, (f - f_hat).norm(dim=1), rtol=1e-12, atol=1e-14)
    assert torch.all(res.measured <= res.bound + 1e-9)


def test_layer_count_mismatch_is_an_error():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with pytest.raises(ValueError, match="2 layers"):
        output_error_bound(layers_of_pair(model), [model[0]], torch.randn(3, 4))


def test_summary_reports_means_and_maxima(trained):
    model, X = trained
    comp = compressed(model, 3, symmetric=False)
    res = output_error_bound(layers_of(model), layers_of(comp), X[:64])
    summary = res.summary()
    assert set(summary) == {
        f"{key}_{stat}" for key in ("measured", "bound", "data_free_bound") for stat in ("mean", "max")
    }
    assert summary["bound_max"] == float(res.bound.max())
    assert summary["measured_mean"] == pytest.approx(float(res.measured.mean()))
    assert summary["measured_max"] <= summary["bound_max"] <= summary["data_free_bound_max"] + 1e-9

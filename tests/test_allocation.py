"""Rank allocation under a parameter budget (nnsvd.lowrank.allocation): budgets, greedy optimality, caps."""

from __future__ import annotations

import itertools
import math
import random

import pytest
import torch

from nnsvd.lowrank.allocation import (
    BudgetError,
    Shape,
    budget,
    check_ratio,
    convex_curve,
    greedy_allocation,
    kept,
    removed_fraction,
    tail_losses,
    uniform_ranks,
)

GPT2_SMALL = {
    **{f"h.{i}.attn.c_attn": Shape(2304, 768) for i in range(12)},
    **{f"h.{i}.attn.c_proj": Shape(768, 768) for i in range(12)},
    **{f"h.{i}.mlp.c_fc": Shape(3072, 768) for i in range(12)},
    **{f"h.{i}.mlp.c_proj": Shape(768, 3072) for i in range(12)},
}
MLP = {"l1": Shape(64, 784), "l2": Shape(64, 64)}


def random_spectra(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, s in shapes.items():
        decay = float(torch.rand(1, generator=g)) * 0.2 + 0.01
        sigma = torch.exp(-decay * torch.arange(min(s.out_features, s.in_features), dtype=torch.float64))
        out[name] = sigma * (1 + float(torch.rand(1, generator=g)))
    return out


@pytest.mark.parametrize("shapes", [GPT2_SMALL, MLP], ids=["gpt2-small", "mlp"])
@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6, 0.8])
def test_uniform_meets_the_budget_layer_by_layer(shapes, ratio):
    ranks = uniform_ranks(shapes, ratio)
    assert removed_fraction(shapes, ranks) >= ratio
    for name, s in shapes.items():
        share = s.weights * (1 - ratio)
        assert ranks[name] * s.step <= share < (ranks[name] + 1) * s.step  # within one step of its share
        assert ranks[name] <= s.max_rank
    assert uniform_ranks(MLP, 0.5) == {"l1": math.floor(64 * 784 * 0.5 / 848), "l2": 16}


@pytest.mark.parametrize("shapes", [GPT2_SMALL, MLP], ids=["gpt2-small", "mlp"])
@pytest.mark.parametrize("ratio", [0.2, 0.4, 0.6])
@pytest.mark.parametrize("normalized", [True, False])
def test_spectrum_allocation_meets_the_budget_within_one_step_and_beats_uniform(shapes, ratio, normalized):
    spectra = random_spectra(shapes)
    losses = {name: tail_losses(sigma.tolist(), normalized=normalized) for name, sigma in spectra.items()}
    total = budget(shapes, ratio)
    ranks = greedy_allocation(shapes, losses, total)
    assert kept(shapes, ranks) <= total  # achieved removed ≥ requested
    assert total - kept(shapes, ranks) < max(s.step for s in shapes.values())  # excess < one step of the largest
    assert removed_fraction(shapes, ranks) >= ratio
    assert all(1 <= ranks[n] <= s.max_rank for n, s in shapes.items())
    uni = uniform_ranks(shapes, ratio)
    objective = sum(losses[n][ranks[n]] for n in shapes)
    assert objective <= sum(losses[n][uni[n]] for n in shapes) + 1e-12


def brute_force(shapes, losses, total, caps):
    names = list(shapes)
    best = (math.inf, None)
    for combo in itertools.product(*[range(1, caps[n] + 1) for n in names]):
        ranks = dict(zip(names, combo))
        if kept(shapes, ranks) <= total:
            best = min(best, (sum(losses[n][ranks[n]] for n in names), combo), key=lambda t: t[0])
    return best[0]


@pytest.mark.parametrize("seed", range(40))
def test_greedy_is_optimal_for_the_budget_it_spends(seed):
    rng = random.Random(seed)
    shapes = {f"L{i}": Shape(rng.randint(3, 9), rng.randint(3, 9)) for i in range(rng.randint(2, 4))}
    caps = {n: min(s.max_rank, 4) for n, s in shapes.items()}
    losses = {}
    for n, s in shapes.items():
        sigma = sorted((rng.random() * 3 for _ in range(min(s.out_features, s.in_features))), reverse=True)
        losses[n] = tail_losses(sigma, normalized=rng.random() < 0.5)
    top = sum(caps[n] * s.step for n, s in shapes.items())
    total = rng.randint(sum(s.step for s in shapes.values()), top)
    ranks = greedy_allocation(shapes, losses, total, max_ranks=caps)
    spent = kept(shapes, ranks)
    greedy = sum(losses[n][ranks[n]] for n in shapes)
    assert greedy == pytest.approx(brute_force(shapes, losses, spent, caps), abs=1e-12)
    assert brute_force(shapes, losses, total, caps) <= greedy + 1e-12
    assert spent <= total and (total - spent < max(s.step for s in shapes.values()) or ranks == caps)


def test_a_capped_layer_hands_its_remainder_to_the_others():
    shapes = {"small": Shape(8, 8), "big": Shape(40, 60)}
    # the small layer's spectrum is flat and large: its gain per weight is the best at every rank
    losses = {"small": tail_losses([100.0] * 8, normalized=False), "big": tail_losses([1.0] * 40, normalized=False)}
    ranks = greedy_allocation(shapes, losses, budget(shapes, 0.2))
    assert ranks["small"] == shapes["small"].max_rank == 3  # capped, never dense, never past the cap
    assert kept(shapes, ranks) <= budget(shapes, 0.2) < kept(shapes, {**ranks, "big": ranks["big"] + 1})


def test_budget_errors():
    for bad in (0, 1, 1.5, -0.1, True, "0.2"):
        with pytest.raises(BudgetError, match="allowed 0 < compress.ratio < 1"):
            check_ratio(bad)
    with pytest.raises(BudgetError, match="lower compress.ratio"):
        greedy_allocation(MLP, {n: [0.0] * 70 for n in MLP}, 10)


def test_convex_curve_has_diminishing_returns_and_keeps_the_best_points():
    points = {10: 5.0, 20: 1.0, 30: 1.5, 40: 0.2, 50: 0.1}
    curve = convex_curve(points, range(10, 51))
    values = [curve[r] for r in range(10, 51)]
    gains = [a - b for a, b in zip(values, values[1:])]
    assert all(g >= -1e-12 for g in gains) and all(a >= b - 1e-12 for a, b in zip(gains, gains[1:]))
    assert curve[10] == 5.0 and curve[40] == pytest.approx(0.2) and curve[50] == 0.1
    assert curve[30] <= 1.0  # the noisy bump is under the hull

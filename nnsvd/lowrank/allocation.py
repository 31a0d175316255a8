"""Per-layer ranks under a parameter budget: ``compress.ratio`` and ``compress.allocation``.

The budget. ``ratio`` is the fraction of the target layers' weight parameters **removed**
(SVD-LLM's convention; ASVD's ``param_ratio`` is the fraction kept, 1 − ratio). A layer of
shape m×n keeps r·(m + n) of its m·n weights at rank r; biases are never compressed and are
not counted. The budget is K = (1 − ratio)·Σ_l m_l·n_l kept weights.

The allocations:

- ``uniform``: every layer keeps the fraction 1 − ratio of its own weights,
  r_l = max(1, ⌊m_l·n_l·(1 − ratio)/(m_l + n_l)⌋). Each layer is within one rank step of its
  share, so the achieved fraction removed is ≥ ratio (unless the floor r = 1 binds).
- ``loss_allocation`` (``loss``): SVD-LLM V2's rule: each matrix type keeps its own share, split
  within the type in proportion to 1/log of each layer's truncation loss at the uniform rank.
- ``greedy_allocation``: minimizes Σ_l loss_l(r_l) under the budget for per-layer loss curves
  with diminishing returns (the spectrum rule, with loss_l(r) = Σ_{i>r} σ_i² of the layer's
  plain or weighted spectrum, optionally divided by its total Σ_i σ_i²; and the sensitivity
  rule, with measured loss increases). See its docstring for the proof of optimality.

Plain Python and PyTorch: no Hydra, no W&B.
"""

from __future__ import annotations

import heapq
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from nnsvd.lowrank.factorize import Factorizer
from nnsvd.lowrank.layers import linear_weight
from nnsvd.lowrank.methods import spectrum
from nnsvd.lowrank.ranks import max_useful_rank
from nnsvd.lowrank.surgery import find_targets


class BudgetError(ValueError):
    """A ratio outside (0, 1), or a budget the layers cannot meet."""


@dataclass(frozen=True)
class Shape:
    """A target layer's weight: out×in."""

    out_features: int
    in_features: int

    @property
    def weights(self) -> int:
        return self.out_features * self.in_features

    @property
    def step(self) -> int:
        """Weights kept per unit of rank: m + n."""
        return self.out_features + self.in_features

    @property
    def max_rank(self) -> int:
        return max_useful_rank(self.out_features, self.in_features)


def target_shapes(model: nn.Module, targets: Iterable[str]) -> dict[str, Shape]:
    """{name: Shape} of the layers the target patterns select, in the model's order."""
    names = set(find_targets(model, targets))
    return {
        name: Shape(*linear_weight(module)[0].shape) for name, module in model.named_modules() if name in names
    }


def check_ratio(ratio: float) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < 1:
        raise BudgetError(
            f"compress.ratio={ratio!r} is out of range: allowed 0 < compress.ratio < 1 "
            "(the fraction of the target layers' weights removed)"
        )
    return float(ratio)


def budget(shapes: Mapping[str, Shape], ratio: float) -> int:
    """K = ⌊(1 − ratio)·Σ m·n⌋: the weights the targets may keep."""
    return math.floor((1 - check_ratio(ratio)) * sum(s.weights for s in shapes.values()))


def kept(shapes: Mapping[str, Shape], ranks: Mapping[str, int]) -> int:
    """Σ_l r_l·(m_l + n_l): the weights the targets keep at these ranks."""
    return sum(ranks[name] * shapes[name].step for name in shapes)


def removed_fraction(shapes: Mapping[str, Shape], ranks: Mapping[str, int]) -> float:
    """1 − kept / Σ m·n: the fraction of the targets' weights removed at these ranks."""
    return 1 - kept(shapes, ranks) / sum(s.weights for s in shapes.values())


def uniform_ranks(shapes: Mapping[str, Shape], ratio: float) -> dict[str, int]:
    """r_l = max(1, ⌊m·n·(1 − ratio)/(m + n)⌋): each layer keeps its own share 1 − ratio."""
    keep = 1 - check_ratio(ratio)
    return {name: max(1, math.floor(s.weights * keep / s.step)) for name, s in shapes.items()}


def greedy_allocation(
    shapes: Mapping[str, Shape],
    losses: Mapping[str, Sequence[float]],
    total: int,
    *,
    min_ranks: Mapping[str, int] | None = None,
    max_ranks: Mapping[str, int] | None = None,
) -> dict[str, int]:
    """Ranks minimizing Σ_l losses[l][r_l] subject to Σ_l r_l·(m_l + n_l) ≤ total.

    ``losses[l][r]`` is layer l's loss at rank r (index 0 unused), non-increasing in r with
    diminishing returns: the gain g_l(r) = loss_l(r − 1) − loss_l(r) of the r-th rank is
    non-increasing in r. (A tail Σ_{i>r} σ_i² has g_l(r) = σ_r², which is; a measured curve
    is made so by taking its lower convex hull first.) Ranks run from min_ranks (default 1)
    to max_ranks (default each layer's largest useful rank).

    Greedy: start every layer at its minimum rank; repeatedly take the next rank step with the
    largest gain per weight, g_l(r_l + 1)/(m_l + n_l) (a heap holds each layer's next step),
    and stop at the first step that does not fit the budget. A layer at its maximum rank
    offers no step: its share of the budget goes to the others (the cap is never passed, and
    the layer stays factorized at that rank rather than turning dense).

    Optimality. Because gains per weight fall along each layer, the steps taken are exactly
    those whose gain per weight is ≥ the last one taken, μ. Let G be the greedy ranks, B' ≤
    total the weights they keep, and R any ranks keeping ≤ B' weights. For each layer, every
    step G takes and R does not has gain ≥ μ·(m + n), and every step R takes and G does not
    has gain ≤ μ·(m + n). Summing, loss(R) − loss(G) ≥ μ·(B' − kept(R)) ≥ 0: G is optimal
    among all allocations that keep at most B' weights, and B' falls short of the budget by
    less than one rank step m + n of the largest target (the step that did not fit). With no
    step left (every layer capped) the whole budget may be unspent; a larger budget cannot help.
    """
    ranks = {name: (min_ranks or {}).get(name, 1) for name in shapes}
    caps = {name: (max_ranks or {}).get(name, s.max_rank) for name, s in shapes.items()}
    spent = kept(shapes, ranks)
    if spent > total:
        raise BudgetError(
            f"the budget keeps {total} weights but the smallest allowed ranks already keep {spent}: "
            "lower compress.ratio"
        )
    heap: list[tuple[float, int, str]] = []
    order = {name: i for i, name in enumerate(shapes)}  # ties: the first layer first, deterministically

    def push(name: str) -> None:
        r = ranks[name]
        if r < caps[name]:
            gain = losses[name][r] - losses[name][r + 1]
            heapq.heappush(heap, (-gain / shapes[name].step, order[name], name))

    for name in shapes:
        push(name)
    while heap:
        _, _, name = heap[0]
        cost = shapes[name].step
        if spent + cost > total:
            break
        heapq.heappop(heap)
        ranks[name] += 1
        spent += cost
        push(name)
    return ranks


def tail_losses(singular_values: Sequence[float], *, normalized: bool) -> list[float]:
    """loss[r] = Σ_{i>r} σ_i² for r = 0 … len(σ), optionally divided by the total Σ σ_i²."""
    squares = [float(s) ** 2 for s in singular_values]
    total = sum(squares)
    losses, tail = [], total
    for sq in [0.0, *squares]:
        tail -= sq
        losses.append(max(tail, 0.0))
    if normalized:
        return [x / total if total > 0 else 0.0 for x in losses]
    return losses


def convex_curve(points: Mapping[int, float], ranks: Sequence[int]) -> dict[int, float]:
    """The lower convex hull of measured (rank, loss) points, non-increasing in rank,
    evaluated at every rank in ``ranks`` by linear interpolation (clamped at the ends).

    Measured loss increases are noisy and need not have diminishing returns; their hull does,
    which is what greedy_allocation needs, and it passes through the best of the measurements.
    """
    xs = sorted(points)
    # non-increasing in rank: a larger rank is never worse than a smaller one (running minimum)
    best, ys = math.inf, {}
    for x in xs:
        best = min(best, points[x])
        ys[x] = best
    hull: list[tuple[int, float]] = []
    for x in xs:
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (y2 - y1) * (x - x1) >= (ys[x] - y1) * (x2 - x1):  # hull[-1] above the chord
                hull.pop()
            else:
                break
        hull.append((x, ys[x]))
    curve = {}
    for r in ranks:
        if r <= hull[0][0]:
            curve[r] = hull[0][1]
        elif r >= hull[-1][0]:
            curve[r] = hull[-1][1]
        else:
            i = next(i for i in range(1, len(hull)) if hull[i][0] >= r)
            (x1, y1), (x2, y2) = hull[i - 1], hull[i]
            curve[r] = y1 + (y2 - y1) * (r - x1) / (x2 - x1)
    return curve


def spectrum_allocation(
    model: nn.Module,
    shapes: Mapping[str, Shape],
    ratio: float,
    *,
    method: str | Factorizer = "auto",
    calibration: Mapping[str, object] | None = None,
    normalized: bool = True,
) -> dict[str, int]:
    """The spectrum rule: ranks minimizing Σ_l loss_l(r_l) under the budget, where loss_l(r) is
    the tail Σ_{i>r} σ_i² of the spectrum the method truncates (σ(W) for plain SVD, σ(L·W·R) for a
    data-aware method, so the loss is the method's own error), divided by the layer's total Σ σ_i²
    when ``normalized`` (every layer then weighs the same, whatever its scale)."""
    losses = method_tails(model, shapes, method, calibration, normalized=normalized)
    return greedy_allocation(shapes, losses, budget(shapes, ratio))


def method_tails(
    model: nn.Module, shapes: Mapping[str, Shape], method: str | Factorizer,
    calibration: Mapping[str, object] | None, *, normalized: bool,
) -> dict[str, list[float]]:
    """{layer: tail_losses of the spectrum the method truncates}: one (weighted) SVD per layer."""
    tails = {}
    for name in shapes:
        W, _ = linear_weight(model.get_submodule(name))
        sigma = spectrum(W, method, None if calibration is None else calibration.get(name))
        tails[name] = tail_losses(sigma.tolist(), normalized=normalized)
    return tails


_BLOCK_INDEX = re.compile(r"\.\d+(?=\.|$)")


def matrix_type(name: str) -> str:
    """The layer's matrix type: its name with the block indices starred
    (``model.layers.3.self_attn.q_proj`` → ``model.layers.*.self_attn.q_proj``)."""
    return _BLOCK_INDEX.sub(".*", name)


def loss_allocation(
    model: nn.Module,
    shapes: Mapping[str, Shape],
    ratio: float,
    *,
    method: str | Factorizer = "auto",
    calibration: Mapping[str, object] | None = None,
) -> dict[str, int]:
    """The loss rule of SVD-LLM V2: each matrix type G (all q_proj, all down_proj, …) removes the
    fraction ``ratio`` of its weights, shared out within the type by each layer's theoretical
    truncation loss at the uniform rank, L_l = (Σ_{i>r} σ_i²)^½ of the spectrum the method truncates
    (for whitening σ(W·C) with C·Cᵀ = XᵀX, so L_l = ‖(W − Ŵ)·Xᵀ‖_F on the calibration data):

        R_l = |G| · ratio · (1/log L_l) / Σ_{j∈G} (1/log L_j)

    A layer with a larger loss removes less. The logarithm is the point: it compresses losses that
    span orders of magnitude (a block with a massive activation has a loss 10²–10³ times the others),
    where the exact minimizer of the type's summed loss gives such a block nearly all the rank and
    starves the rest (measured on SmolLM2: far worse than uniform). Where some L_l ≤ e the losses are
    rescaled so that the smallest is e (the formula needs log L > 0; only its units change).

    Ranks are ⌊m·n·(1 − R_l)/(m + n)⌋ within [1, the largest useful rank]; where clamping or rounding
    leaves a type over its own budget, the layer furthest above its share loses a rank until it fits.
    """
    tails = method_tails(model, shapes, method, calibration, normalized=False)
    uniform = uniform_ranks(shapes, ratio)
    types: dict[str, list[str]] = {}
    for name in shapes:
        types.setdefault(matrix_type(name), []).append(name)
    ranks: dict[str, int] = {}
    for names in types.values():
        group = {name: shapes[name] for name in names}
        losses = {name: math.sqrt(max(tails[name][uniform[name]], 0.0)) for name in names}
        floor = min(losses.values())
        if floor <= math.e:
            scale = math.e / floor if floor > 0 else math.inf
            losses = {n: (loss * scale if floor > 0 else math.e + loss) for n, loss in losses.items()}
        inverse = {name: 1.0 / math.log(loss) for name, loss in losses.items()}
        mean = sum(inverse.values()) / len(inverse)
        for name in names:
            s = group[name]
            removed = min(ratio * inverse[name] / mean, 1.0)
            ranks[name] = min(s.max_rank, max(1, math.floor(s.weights * (1 - removed) / s.step)))
        total = math.floor((1 - check_ratio(ratio)) * sum(s.weights for s in group.values()))
        while kept(group, ranks) > total:
            over = [n for n in names if ranks[n] > 1]
            if not over:
                break
            worst = max(over, key=lambda n: ranks[n] * group[n].step / (group[n].weights * (1 - ratio)))
            ranks[worst] -= 1
    if kept(shapes, ranks) > budget(shapes, ratio):
        raise BudgetError(
            f"compress.allocation=loss budgets each matrix type apart, and at compress.ratio={ratio} rank 1 of some "
            "type already keeps more than its share; lower compress.ratio or use compress.allocation=spectrum"
        )
    return {name: ranks[name] for name in shapes}

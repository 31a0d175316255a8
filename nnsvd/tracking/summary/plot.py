"""summary.png: the main metric against rank or compress.ratio, one line per method and allocation."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from nnsvd.tracking.summary.curves import axes_of, curves, dense_reference, line_label, mean
from nnsvd.tracking.summary.reference import draw_reference
from nnsvd.tracking.summary.rows import METRIC_STYLES, METRICS
from nnsvd.tracking.summary.table import number

LINESTYLES = {"uniform": "-", "spectrum": "--", "sensitivity": ":", "loss": "-."}
RATIO_LABEL = "compress.ratio: fraction of the target layers' weights removed (requested)"


def plot_summary(path: Path, rows: Sequence[dict], *, title: str, reference: Path | None = None) -> None:
    """One panel per model and x axis: the main metric against rank (log2) for jobs sized by rank,
    and against compress.ratio for jobs sized by a ratio; one line per (mode, method, allocation,
    regularizer, alpha).

    On the rank axis the top axis gives the whole model's size relative to dense at each rank.
    The dense model is a horizontal line. Jobs that did not finish ok are left out (the table
    lists them). For the MLP's rank panel, ``reference`` adds the published numbers of the same
    lines, dashed.
    """
    from matplotlib.figure import Figure  # a bare Figure renders with Agg: no pyplot, no global backend

    models = sorted({row["model"] for row in rows if row["status"] == "ok" and row["model"] in METRICS})
    tasks = sorted({name for row in rows for name in (row.get("zero_shot") or {})})
    panels = [(model, axis, task) for model in models for axis in axes_of(rows, model) for task in [None, *tasks]]
    fig = Figure(figsize=(10, 5.5 * max(1, len(panels))), dpi=120, layout="constrained")
    fig.suptitle(title, fontsize="large")
    if not panels:
        ax = fig.subplots()
        message = "no job finished ok: nothing to plot" if not models else "no ok job with a rank or a ratio"
        ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
    else:
        for ax, (model, axis, task) in zip(fig.subplots(len(panels), 1, squeeze=False)[:, 0], panels):
            _plot_panel(ax, rows, model, axis, reference if model == "mlp" and axis == "rank" and task is None else None,
                        task)
    fig.savefig(path)


def _plot_panel(ax, rows: Sequence[dict], model: str, axis: str, reference: Path | None,
                task: str | None = None) -> None:
    """One panel: the main metric, or with ``task`` that eval.tasks accuracy (lm-eval), against the axis."""
    metric = METRICS[model] if task is None else None
    ylabel, yscale, _ = METRIC_STYLES[metric] if task is None else (f"{task} (lm-eval)", "linear", "{:.4f}")
    lines = curves(rows, model, axis, task)
    # one colour per method (and mode, regularizer, alpha), one line style per allocation
    families = list(dict.fromkeys(key[:4] for key in lines))
    colours = {key: f"C{families.index(key[:4]) % 10}" for key in lines}
    for key, points in lines.items():
        xs, values = zip(*points)
        ax.plot(xs, values, marker="o", color=colours[key], linestyle=LINESTYLES.get(key[4], "-"),
                label=line_label(key))

    dense = dense_reference(rows, model, task)
    if dense is not None:
        ax.axhline(dense[0], color="black", linewidth=1.2, label=f"{dense[1]}: {number(dense[0], metric)}")
    published_ranks = draw_reference(ax, reference, colours) if reference is not None else []

    xs = sorted({x for points in lines.values() for x, _ in points})
    if axis == "rank":
        _rank_axes(ax, xs, _sizes_at(rows, model, xs), published_ranks)
        ax.set_xlabel("rank")
    else:
        ax.set_xticks(xs, labels=[f"{x:g}" for x in xs])
        ax.set_xlabel(RATIO_LABEL)
    ax.set_ylabel(f"{ylabel}, model={model}")
    ax.set_yscale(yscale)
    if yscale == "log":
        from matplotlib.ticker import FuncFormatter

        ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.grid(True, which="minor", alpha=0.15)
    ax.grid(True, which="major", alpha=0.4)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small", frameon=False)


def _rank_axes(ax, ranks: Sequence[int], sizes: dict[int, float], published_ranks: Sequence[int]) -> None:
    """Bottom: rank on a log2 scale, ticked at the sweep's ranks (and the published ones that do
    not crowd them, e.g. 31 beside 32). Top: the whole model's size relative to dense."""
    from matplotlib.ticker import NullFormatter, NullLocator

    ticks = list(ranks)
    for rank in published_ranks:
        if all(abs(math.log2(rank / t)) > 0.2 for t in ticks):
            ticks.append(rank)
    ticks.sort()
    ax.set_xscale("log", base=2)
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticks(ticks, labels=[str(r) for r in ticks])
    top = ax.secondary_xaxis("top")
    top.set_xticks(list(ranks), labels=[f"{sizes[r]:.2g}" if r in sizes else "" for r in ranks])
    top.xaxis.set_minor_locator(NullLocator())
    top.xaxis.set_minor_formatter(NullFormatter())
    top.set_xlabel("params / dense params of the whole model (mean over the jobs at that rank)")


def _sizes_at(rows: Sequence[dict], model: str, ranks: Sequence[int]) -> dict[int, float]:
    by_rank = defaultdict(list)
    for row in rows:
        if row["status"] == "ok" and row["model"] == model and row["compression_ratio"] is not None:
            by_rank[row["rank"]].append(row["compression_ratio"])
    return {rank: mean(by_rank[rank]) for rank in ranks if by_rank[rank]}

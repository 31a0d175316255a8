"""The original work's published MNIST numbers, overlaid on the summary plot for comparison.

``nnsvd/reference/seed_mlp_results.csv`` is a copy of them (provenance and their known defect:
dropout left active at evaluation, in ``nnsvd/reference/README.md``).
"""

from __future__ import annotations

import csv
from collections import defaultdict
from pathlib import Path

REFERENCE_CSV = Path(__file__).parents[2] / "reference" / "seed_mlp_results.csv"
REFERENCE_LABEL = "original (published, dropout at eval)"


def read_reference(path: Path) -> tuple[dict[tuple, list[tuple[int, float]]], float | None]:
    """Published numbers as lines keyed like ``curves.line_key`` and the dense accuracy.

    The CSV has columns flow,rank,regularizer,alpha,test_acc; the dense row has no rank.
    """
    lines: dict = defaultdict(list)
    dense = None
    with Path(path).open(newline="") as f:
        for record in csv.DictReader(f):
            value = float(record["test_acc"])
            if not record["rank"]:
                dense = value
                continue
            method = "auto" if record["flow"] == "compress" else ""  # the original compressed by plain SVD
            key = (record["flow"], record["regularizer"], float(record["alpha"] or 0.0), method, "")
            lines[key].append((int(record["rank"]), value))
    return {key: sorted(points) for key, points in lines.items()}, dense


def draw_reference(ax, reference: Path, colours: dict) -> list[int]:
    """The published lines this sweep also ran (like against like), dashed in the same
    colours, and the published dense accuracy; returns the ranks drawn."""
    published, published_dense = read_reference(reference)
    drawn = {key: points for key, points in published.items() if key in colours}
    for key, points in drawn.items():
        ranks, values = zip(*points)
        ax.plot(ranks, values, linestyle="--", marker="x", color=colours[key], alpha=0.8)
    if published_dense is not None:
        ax.axhline(published_dense, color="black", linestyle="--", linewidth=1.0, alpha=0.8)
    if drawn or published_dense is not None:  # one legend entry for all of them
        ax.plot([], [], linestyle="--", marker="x", color="grey", label=REFERENCE_LABEL)
    return sorted({rank for points in drawn.values() for rank, _ in points})

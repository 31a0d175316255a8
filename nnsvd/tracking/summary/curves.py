"""The lines of a summary plot: the main metric against rank, or against compress.ratio.

A sweep that sizes its jobs by ``rank`` is drawn against the rank; one that sizes them by
``compress.ratio`` against the ratio (the fraction of the target layers' weights removed). A
sweep with both kinds of jobs gets one panel of each. One line per mode, method, allocation,
regularizer and alpha.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

AXES = ("rank", "ratio")  # the size a job was given, which a panel's x axis shows


def line_key(row: dict) -> tuple:
    """What one line of the plot holds: (mode, regularizer label, alpha, method, allocation)."""
    return (row["mode"], row["regularizer"], float(row["alpha"] or 0.0), row.get("method") or "",
            row.get("allocation") or "")


def line_label(key: tuple) -> str:
    """mode · method · allocation · regularizer (α), leaving out the defaults."""
    mode, regularizer, alpha, method, allocation = key
    parts = [mode] + ([method] if method not in ("", "auto") else []) + ([allocation] if allocation else [])
    return " · ".join([*parts, regularizer]) + (f" α={alpha:g}" if alpha > 0 else "")


def axes_of(rows: Sequence[dict], model: str) -> list[str]:
    """The x axes one model's ok jobs need: "rank" for jobs sized by rank, "ratio" for jobs sized by a ratio."""
    ok = [row for row in rows if row["status"] == "ok" and row["model"] == model]
    return [axis for axis in AXES if any(row[axis] is not None and row["value"] is not None for row in ok)]


def curves(rows: Sequence[dict], model: str, axis: str = "rank", task: str | None = None) -> dict[tuple, list[tuple[float, float]]]:
    """Main metric (or the eval.tasks accuracy ``task``) against ``axis`` (rank or ratio) for each line of
    one model's ok jobs, x ascending.

    Jobs that differ only in what the line does not show (e.g. the seed) are averaged.
    """
    points: dict = defaultdict(lambda: defaultdict(list))
    for row in rows:
        value = row["value"] if task is None else (row.get("zero_shot") or {}).get(task)
        if row["status"] == "ok" and row["model"] == model and row[axis] is not None and value is not None:
            points[line_key(row)][row[axis]].append(value)
    return {
        key: [(x, mean(values)) for x, values in sorted(by_x.items())]
        for key, by_x in sorted(points.items())
    }


def dense_reference(rows: Sequence[dict], model: str, task: str | None = None) -> tuple[float, str] | None:
    """The dense model's metric (or ``task`` accuracy): from dense-mode jobs, else as measured by compress jobs."""
    ok = [row for row in rows if row["status"] == "ok" and row["model"] == model]

    def final(row):
        return row["value"] if task is None else (row.get("zero_shot") or {}).get(task)

    def measured_dense(row):
        return row["dense_value"] if task is None else (row.get("dense_zero_shot") or {}).get(task)

    dense = [final(row) for row in ok if row["mode"] == "dense" and final(row) is not None]
    if dense:
        return mean(dense), "dense (this sweep)"
    measured = [measured_dense(row) for row in ok if measured_dense(row) is not None]
    if measured:
        return mean(measured), "dense (measured by compress jobs)"
    return None


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)

"""A sweep summary as tables: summary.csv (every column) and summary.md (what a reader scans)."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

from nnsvd.tracking.summary.rows import COLUMNS, METRIC_STYLES, shorten, status_counts


def write_csv(path: Path, rows: Sequence[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows([{k: json.dumps(v) if isinstance(v, dict) else v for k, v in row.items()} for row in rows])


def zero_shot_names(rows: Sequence[dict]) -> list[str]:
    """The eval.tasks accuracies any row has ("arc_easy_acc", …), sorted."""
    return sorted({name for row in rows for name in (row.get("zero_shot") or {})})


def markdown_table(rows: Sequence[dict], *, title: str) -> str:
    """A Markdown page: a heading, the job counts and one table row per job.

    "ratio" is compress.ratio as requested and "removed" the fraction of the target layers'
    weights removed as achieved (both: the fraction removed); "size" is the whole model's
    parameters over the dense model's.
    """
    metrics = sorted({row["metric"] for row in rows if row["metric"]})
    metric = metrics[0] if len(metrics) == 1 else "main metric"
    tasks = zero_shot_names(rows)
    header = ["job", "status", "model", "mode", "rank", "method", "allocation", "ratio", "removed", "regularizer",
              "alpha", metric, "dense", "before fine-tuning", "params", "size", "time (s)", *tasks, "error"]
    lines = [
        f"# {title}",
        "",
        f"{len(rows)} jobs: {status_counts(rows)}.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for row in rows:
        cells = [
            row["job"],
            row["status"] if row["status"] == "ok" else f"**{row['status']}**",
            row["model"],
            row["mode"],
            row["rank"],
            row.get("method") or "",
            row.get("allocation") or "",
            _fraction(row.get("ratio"), "{:g}"),
            _fraction(row.get("removed"), "{:.3f}"),
            row["regularizer"],
            f"{row['alpha']:g}" if row["alpha"] else "",
            number(row["value"], row["metric"]),
            number(row["dense_value"], row["metric"]),
            number(row["compressed_value"], row["metric"]),
            f"{row['params']:,}" if row["params"] is not None else "",
            _fraction(row["compression_ratio"], "{:.3f}"),
            f"{row['time_s']:.1f}" if row["time_s"] is not None else "",
            *(_fraction((row.get("zero_shot") or {}).get(name), "{:.4f}") for name in tasks),
            shorten(row["error"]),
        ]
        lines.append("| " + " | ".join("" if c is None else str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _fraction(value: float | None, fmt: str) -> str:
    return "" if value is None else fmt.format(value)


def number(value: float | None, metric: str | None) -> str:
    """A metric value in its style (accuracy to 4 places, perplexity to 2)."""
    if value is None:
        return ""
    return METRIC_STYLES[metric][2].format(value) if metric in METRIC_STYLES else f"{value:.4g}"

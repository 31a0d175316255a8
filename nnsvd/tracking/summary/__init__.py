"""One table and one plot per sweep: every job of a Hydra multirun, ok or not.

- ``rows``: ``collect`` reads the job directories (``.hydra/overrides.yaml``, ``results.json``) into flat rows;
- ``table``: summary.csv and summary.md;
- ``curves`` and ``plot``: summary.png, the main metric against rank or compress.ratio;
- ``reference``: the original work's published MNIST numbers, overlaid for comparison;
- ``dashboard``: a "summary" run in the sweep's W&B group.

``summarize`` does it all; the Hydra callback in ``nnsvd.cluster.callbacks`` and ``scripts/summarize.py`` call it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from nnsvd.tracking import wandb_group
from nnsvd.tracking.summary.curves import axes_of, curves, dense_reference, line_key, line_label
from nnsvd.tracking.summary.dashboard import log_summary_to_wandb
from nnsvd.tracking.summary.plot import plot_summary
from nnsvd.tracking.summary.reference import REFERENCE_CSV, REFERENCE_LABEL, read_reference
from nnsvd.tracking.summary.rows import (
    COLUMNS,
    METRIC_STYLES,
    METRICS,
    collect,
    job_row,
    not_ok,
    shorten,
    status_counts,
)
from nnsvd.tracking.summary.table import markdown_table, write_csv

__all__ = [
    "COLUMNS",
    "METRICS",
    "METRIC_STYLES",
    "REFERENCE_CSV",
    "REFERENCE_LABEL",
    "axes_of",
    "collect",
    "curves",
    "dense_reference",
    "job_row",
    "line_key",
    "line_label",
    "log_summary_to_wandb",
    "markdown_table",
    "not_ok",
    "plot_summary",
    "read_reference",
    "shorten",
    "status_counts",
    "summarize",
    "write_csv",
    "write_summary",
]


def write_summary(sweep_dir: str | Path, rows: Sequence[dict], *, reference: Path | None = None) -> dict[str, Path]:
    """Write summary.csv, summary.md and summary.png into the sweep directory.

    ``reference`` is a CSV of published MLP numbers (see ``REFERENCE_CSV``) drawn dashed
    on the MLP plot.
    """
    sweep_dir = Path(sweep_dir)
    paths = {"csv": sweep_dir / "summary.csv", "md": sweep_dir / "summary.md", "png": sweep_dir / "summary.png"}
    write_csv(paths["csv"], rows)
    paths["md"].write_text(markdown_table(rows, title=f"Sweep summary: {sweep_dir}"))
    short = "/".join(sweep_dir.resolve().parts[-2:])  # Hydra's default sweep dir ends in <date>/<time>
    plot_summary(paths["png"], rows, title=f"{short}: {status_counts(rows)}", reference=reference)
    return paths


def summarize(
    sweep_dir: str | Path,
    *,
    reference: Path | None = None,
    wandb_mode: str = "disabled",
    project: str = "nn-svd",
    entity: str | None = None,
    group: str | None = None,
) -> tuple[list[dict], dict[str, Path]]:
    """Collect a sweep, write its summary files and (unless disabled) log them to W&B.

    The W&B run joins ``group``, by default the sweep's own group (``wandb_group``), which
    is where run_job puts the jobs unless wandb.group was set.
    """
    sweep_dir = Path(sweep_dir)
    rows = collect(sweep_dir)
    paths = write_summary(sweep_dir, rows, reference=reference)
    log_summary_to_wandb(
        rows,
        group=group or wandb_group(sweep_dir),
        project=project,
        entity=entity,
        mode=wandb_mode,
        sweep_dir=sweep_dir,
        png_path=paths["png"],
    )
    return rows, paths

"""What a run prints: progress on stdout, problems on stderr, and one closing line.

The streams are set up by conf/hydra/job_logging/nnsvd.yaml; this module holds the filter it
names and the closing line every run ends with.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from nnsvd.tracking import main_metric_name


class BelowLevel(logging.Filter):
    """Let through only records below ``level``: stdout gets progress, stderr the rest."""

    def __init__(self, level: str | int = logging.WARNING) -> None:
        super().__init__()
        self.level = logging.getLevelName(level) if isinstance(level, str) else level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def shown_path(path: Path, start: Path) -> str:
    """``path`` relative to the start directory when it lies below it (as checkpoint= takes it), else absolute."""
    path = Path(path).resolve()
    try:
        return str(path.relative_to(Path(start).resolve()))
    except ValueError:
        return str(path)


def closing_line(results: Mapping, run_dir: Path, start: Path) -> str:
    """The last line of a run: its status, then the main metric (or the error), then its directory.

    ``ok: test_acc=0.9698 (mlp compress rank 8); run directory outputs/runs/2026-11-27/12-04-13_rank-8``
    """
    where = f"run directory {shown_path(run_dir, start)}"
    if results["status"] != "ok":
        return f"{results['status']}: {results['error']}; {where}"
    metrics = results["metrics"]
    key = main_metric_name(results)
    value = "no metric" if key not in metrics else f"{key}={metrics[key]:.4f}"
    what = " ".join(str(x) for x in (results["model"], results["mode"]) if x)
    if results.get("rank") is not None:
        what += f" rank {results['rank']}"
    budget = (results.get("compress") or {}).get("budget") or {}
    if budget.get("ratio") is not None:
        what += f" ratio {budget['ratio']:g} {budget['allocation']}, {budget['removed_targets']:.3f} removed"
    source = results.get("from_checkpoint")
    if results.get("flow") == "evaluate" and source:
        what += f", evaluated from checkpoint {shown_path(Path(source['path']), start)}"
    return f"ok: {value} ({what}); {where}"

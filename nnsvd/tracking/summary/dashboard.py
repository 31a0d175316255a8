"""The sweep summary on W&B: one "summary" run in the sweep's group."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from nnsvd.tracking.summary.curves import axes_of, curves, line_label
from nnsvd.tracking.summary.rows import COLUMNS, METRICS, not_ok

log = logging.getLogger(__name__)


def log_summary_to_wandb(
    rows: Sequence[dict],
    *,
    group: str,
    project: str,
    entity: str | None,
    mode: str,
    sweep_dir: str | Path,
    png_path: Path | None,
) -> None:
    """One "summary" run in the sweep's W&B group: the rows as a table, the metric against rank
    (and against compress.ratio) as line plots, one line per method and allocation, and the PNG.

    The run finishes with exit code 1 when a job did not finish ok, so the dashboard
    marks the sweep. mode="disabled" does nothing.
    """
    if mode == "disabled":
        return
    import wandb

    failed = not_ok(rows)
    run = wandb.init(
        mode=mode,
        project=project,
        entity=entity,
        group=group,
        name="summary",
        job_type="summary",
        dir=str(sweep_dir),
        config={"sweep_dir": str(Path(sweep_dir).resolve()), "jobs": len(rows)},
        reinit="finish_previous",
        settings=wandb.Settings(quiet=True, console="off"),
    )
    logged = False
    try:
        payload = {
            "summary/jobs": wandb.Table(columns=COLUMNS, data=[[row[c] for c in COLUMNS] for row in rows]),
        }
        for model in sorted({row["model"] for row in rows if row["model"] in METRICS}):
            for axis in axes_of(rows, model):
                lines = curves(rows, model, axis)
                payload[f"summary/{model}_{METRICS[model]}_vs_{axis}"] = wandb.plot.line_series(
                    xs=[[x for x, _ in points] for points in lines.values()],
                    ys=[[value for _, value in points] for points in lines.values()],
                    keys=[line_label(key) for key in lines],
                    title=f"{model}: {METRICS[model]} vs {axis}",
                    xname=axis,
                )
        if png_path is not None and Path(png_path).is_file():
            payload["summary/plot"] = wandb.Image(str(png_path))
        run.log(payload)
        run.summary.update(
            {"jobs": len(rows), "jobs_ok": len(rows) - len(failed), "jobs_failed": len(failed)}
        )
        logged = True
        log.info("W&B %s summary run in group %s (%s)", mode, group, run.dir)
    finally:
        run.finish(exit_code=0 if logged and not failed else 1)

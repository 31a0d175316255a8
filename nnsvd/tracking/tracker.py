"""The Weights & Biases run of a job or a sweep summary, and the group names that tie them together."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

log = logging.getLogger(__name__)

GROUP_LIMIT = 128  # W&B refuses longer group names


def wandb_group(sweep_dir: str | Path) -> str:
    """The W&B group of a multirun: every job (and the summary run) shares the sweep's."""
    path = Path(sweep_dir).resolve()
    parts = path.parts[len(path.anchor and (path.anchor,)):]  # without the root "/"
    return "sweep-" + "_".join(parts[-3:])[-60:]


def run_group(started: datetime, items: Sequence[str]) -> str:
    """The W&B group of a single run, a group of its own: its date and time, then its overrides
    (``run-2026-11-27_12-04-13_rank-8_regularizer-symmetric``), whole items only, ≤ GROUP_LIMIT."""
    group = f"run-{started:%Y-%m-%d_%H-%M-%S}"
    for item in items:
        if len(group) + 1 + len(item) > GROUP_LIMIT:
            break
        group += f"_{item}"
    return group


class Tracker:
    """A thin W&B run wrapper; with mode=disabled every call is a no-op.

    The run is created in ``run_dir`` (offline runs land in ``run_dir/wandb`` and sync
    later with ``wandb sync``). It is always finished, with exit code 1 on failure, so a
    multirun never reuses it.
    """

    def __init__(
        self,
        *,
        mode: str,
        project: str,
        entity: str | None,
        group: str,
        name: str,
        job_type: str,
        tags: Sequence[str],
        config: Mapping,
        run_dir: Path,
    ) -> None:
        self.run = None
        if mode == "disabled":
            return
        import wandb

        self.run = wandb.init(
            mode=mode,
            project=project,
            entity=entity,
            group=group,
            name=name,
            job_type=job_type,
            tags=list(tags),
            config=dict(config),
            dir=str(run_dir),
            reinit="finish_previous",
            settings=wandb.Settings(quiet=True, console="off"),
        )
        log.info("W&B %s run %s in group %s (%s)", mode, name, group, self.run.dir)

    def log(self, metrics: Mapping, step: int | None = None) -> None:
        if self.run is not None:
            self.run.log(dict(metrics), step=step)

    def summary(self, values: Mapping) -> None:
        if self.run is not None:
            for key, value in values.items():
                self.run.summary[key] = value

    def table(self, key: str, rows: Sequence[Mapping]) -> None:
        if self.run is not None and rows:
            import wandb

            columns = list(rows[0].keys())
            data = [[_cell(row.get(c)) for c in columns] for row in rows]
            self.run.log({key: wandb.Table(columns=columns, data=data)})

    def text(self, key: str, text: str) -> None:
        if self.run is not None:
            import wandb

            self.run.log({key: wandb.Html(f"<pre>{text}</pre>")})

    def finish(self, ok: bool) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if ok else 1)
            self.run = None


def _cell(value):
    return value if isinstance(value, int | float | str | bool) or value is None else str(value)


def flatten(d: Mapping, prefix: str = "") -> dict:
    """{"a": {"b": 1}} → {"a/b": 1} for W&B summaries."""
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}/"))
        else:
            out[name] = value
    return out

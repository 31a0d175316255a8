"""Where results go: Weights & Biases runs and the results.json beside each Hydra run."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

from nnsvd.checkpoint import read_json, write_json_atomic

log = logging.getLogger(__name__)

RESULTS = "results.json"


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


def read_results(run_dir: Path) -> dict | None:
    return read_json(Path(run_dir) / RESULTS)


def write_results(run_dir: Path, results: Mapping) -> Path:
    path = Path(run_dir) / RESULTS
    write_json_atomic(path, _finite(results))
    return path


# What results.json written before it named its main metric holds: the first of these in its metrics.
LEGACY_MAIN_METRICS = ("test_acc", "test_ppl")


def main_metric_name(results: Mapping) -> str | None:
    """The name of a run's main metric: results.json's ``main_metric_name`` (the task's), else, for
    an older file, the first of LEGACY_MAIN_METRICS among its metrics."""
    name = results.get("main_metric_name")
    if name:
        return name
    metrics = results.get("metrics") or {}
    return next((key for key in LEGACY_MAIN_METRICS if key in metrics), None)


def main_metric(results: Mapping) -> float | None:
    """The value of a run's main metric, or None."""
    name = main_metric_name(results)
    return None if name is None else (results.get("metrics") or {}).get(name)


def regularizer_label(reg: Mapping) -> str:
    """The regularizer in a word or two: none, symmetric, orthonormal, symmetric+orthonormal."""
    parts = (["symmetric"] if reg["symmetric"] else []) + (["orthonormal"] if reg["alpha"] > 0 else [])
    return "+".join(parts) or "none"


def _finite(value):
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Mapping):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


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

"""Hydra callbacks: the sweep summary written when a multirun ends, and SLURM job states.

Enable it in the config (or on the command line with ``+hydra.callbacks.summary._target_=...``)::

    hydra:
      callbacks:
        summary:
          _target_: nnsvd.cluster.callbacks.SweepSummary
          reference: true   # overlay the published MLP numbers
          wandb: true       # a "summary" W&B run in the sweep's group (wandb.mode decides how)

Hydra calls ``on_multirun_end`` only after every job has returned, and turns any exception
a callback raises into a warning, so nothing raised here can stop or fail the sweep. The
callback therefore records the outcome in ``SweepSummary.failed_jobs`` and run.py asks
``sweep_failed()`` after the sweep to choose its exit status.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from nnsvd.tracking.summary import REFERENCE_CSV, not_ok, shorten, status_counts, summarize

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    """Writes summary.csv/.md/.png into the sweep directory and logs them to W&B."""

    # Jobs of the last sweep that did not finish ok (1 if the summary itself failed); None
    # until a sweep has ended. A class attribute because Hydra builds the callback object
    # itself and run.py never sees it.
    failed_jobs: int | None = None

    def __init__(self, reference: bool = False, wandb: bool = True) -> None:
        self.reference = REFERENCE_CSV if reference else None
        self.use_wandb = wandb

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            if not sweep_dir.is_absolute():
                sweep_dir = Path(str(config.hydra.runtime.cwd)) / sweep_dir
            w = wandb_settings(config)
            rows, paths = summarize(
                sweep_dir,
                reference=self.reference,
                wandb_mode=w["mode"] if self.use_wandb else "disabled",
                project=w["project"],
                entity=w["entity"],
                group=w["group"],
            )
        except Exception:
            log.exception("sweep summary failed")
            SweepSummary.failed_jobs = 1
            return
        SweepSummary.failed_jobs = len(not_ok(rows))
        report = log.warning if SweepSummary.failed_jobs else log.info
        report(
            "sweep summary: %d jobs, %s; table %s, plot %s",
            len(rows),
            status_counts(rows),
            paths["md"],
            paths["png"],
        )
        for row in not_ok(rows):
            log.warning("  %s: %s %s", row["job"], row["status"], shorten(row["error"], width=300))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        SweepSummary.failed_jobs = None


def wandb_settings(config: DictConfig) -> dict:
    """mode, project, entity and group of config.wandb as plain values (mode is an Enum node there)."""
    node = OmegaConf.select(config, "wandb")
    w = OmegaConf.to_container(node, resolve=True, enum_to_str=True) if node is not None else {}
    return {
        "mode": str(w.get("mode") or "disabled"),
        "project": w.get("project") or "nn-svd",
        "entity": w.get("entity"),
        "group": w.get("group"),
    }


def sweep_failed() -> bool:
    """Whether the last multirun had a job that did not finish ok, or its summary failed."""
    return bool(SweepSummary.failed_jobs)


class SlurmJobStates(Callback):
    """Before a SLURM sweep submits its jobs: on a cluster without accounting, submitit reads the
    job states from squeue instead of failing on sacct at every poll (see ``nnsvd.cluster.squeue``)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        launcher = str(OmegaConf.select(config, "hydra.launcher._target_") or "")
        if launcher.endswith(".SlurmLauncher"):
            from nnsvd.cluster.squeue import use_squeue_without_accounting

            use_squeue_without_accounting()

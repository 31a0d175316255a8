"""CPU threads per job: each job of a sweep gets its share of the machine.

torch starts one BLAS/OpenMP thread per core in every process. Two parallel jobs on 2 cores then
run 4 threads that spin-wait for each other, and a loaded machine slows by far more than 2×.

- A single run, or a sweep of the basic launcher (one job at a time): torch's own choice.
- joblib (``hydra.launcher.n_jobs``) and submitit's local launcher (every job at once): the cores
  divided by the jobs running together, at least 1; ``hydra.launcher.cpus_per_task`` when given.
- SLURM: the job's ``SLURM_CPUS_PER_TASK`` (a local sweep inside a SLURM allocation divides those).
- ``OMP_NUM_THREADS``, set by the user, is kept (joblib's loky workers set their own, which is not).

The launching process counts the sweep's jobs (``SweepThreads.on_multirun_start``) and passes the
count in ``NNSVD_SWEEP_JOBS``, which every launcher's job inherits.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("nnsvd")

SWEEP_JOBS_ENV = "NNSVD_SWEEP_JOBS"
# OMP_NUM_THREADS as the user gave it to the sweep ("" for none): joblib's loky workers set their own
USER_OMP_ENV = "NNSVD_USER_OMP_NUM_THREADS"


def available_cpus() -> int:
    """The cores this process may run on (its affinity mask: a cgroup or taskset narrows it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def sweep_jobs(config: DictConfig) -> int:
    """How many jobs the basic sweeper makes of ``hydra.sweeper.params`` and the command line."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    params = OmegaConf.select(config, "hydra.sweeper.params", default=None) or {}
    arguments = [f"{k}={v}" for k, v in params.items()]
    arguments += list(OmegaConf.select(config, "hydra.overrides.task", default=None) or [])
    try:
        parsed = OverridesParser.create().parse_overrides(arguments)
        return sum(len(batch) for batch in BasicSweeper.split_arguments(parsed, None))
    except Exception as exc:  # another sweeper's syntax (interval(), …): count it as one job
        log.debug("could not count the sweep's jobs (%s)", exc)
        return 1


def parallel_jobs(launcher: Any, jobs: int, cpus: int) -> int | None:
    """Jobs of a ``jobs``-job sweep that run at once under ``launcher`` (hydra.launcher); None for
    SLURM, where each job has its own allocation."""
    target = str((launcher or {}).get("_target_", ""))
    if target.endswith("JoblibLauncher"):
        n = int(launcher.get("n_jobs") or 1)
        n = cpus + 1 + n if n < 0 else n  # joblib: -1 = every core, -2 = all but one, …
        return max(1, min(n, jobs))
    if target.endswith("submitit_launcher.LocalLauncher"):
        return max(1, jobs)
    if target.endswith("SlurmLauncher"):
        return None
    return 1


def job_threads(launcher: Any, multirun: bool, environ: dict | None = None,
                cpus: int | None = None) -> tuple[int | None, str]:
    """(threads for this job, why); None keeps torch's own choice (a job that runs alone, or
    OMP_NUM_THREADS set by the user)."""
    environ = os.environ if environ is None else environ
    user_omp = environ[USER_OMP_ENV] if USER_OMP_ENV in environ else environ.get("OMP_NUM_THREADS", "")
    if user_omp:  # an integer, or OpenMP's per-level list ("4,2"), which torch reads itself
        return (int(user_omp) if user_omp.strip().isdigit() else None), f"OMP_NUM_THREADS={user_omp}"
    slurm = environ.get("SLURM_CPUS_PER_TASK")
    if cpus is None:
        cpus = int(slurm) if slurm else available_cpus()  # inside a SLURM allocation: its CPUs
    if not multirun:
        return None, "a single run"
    per_task = (launcher or {}).get("cpus_per_task")
    if per_task:
        return int(per_task), "hydra.launcher.cpus_per_task"
    parallel = parallel_jobs(launcher, int(environ.get(SWEEP_JOBS_ENV) or 1), cpus)
    if parallel is None:
        return (int(slurm), "SLURM_CPUS_PER_TASK") if slurm else (None, "a SLURM job")
    if parallel == 1:
        return None, "one job at a time"
    return max(1, cpus // parallel), f"{cpus} cores shared by {parallel} jobs at once"


def set_job_threads(launcher: Any, multirun: bool) -> None:
    """Give torch this job's share of the cores (``job_threads``), and say so in the log."""
    import torch

    threads, why = job_threads(launcher, multirun)
    if threads is not None and threads != torch.get_num_threads():
        torch.set_num_threads(threads)
    log.info("CPU threads: %d (%s)", torch.get_num_threads(), why)


class SweepThreads(Callback):
    """Counts a sweep's jobs before its launcher starts them, for ``job_threads``."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        os.environ[SWEEP_JOBS_ENV] = str(sweep_jobs(config))
        os.environ[USER_OMP_ENV] = os.environ.get("OMP_NUM_THREADS", "")

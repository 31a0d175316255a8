"""A sweep job that SLURM stops and starts again: it saves its training state, goes back to the
queue, and its next run continues from that state.

Inside a job that submitit launched on SLURM (``hydra/launcher=slurm``), submitit handles two signals
(``submitit/core/job_environment.py``):

- USR2, which submitit asks SLURM to send ``signal_delay_s`` before the time limit
  (``sbatch --signal=USR2@…``; clusters with ``PreemptParameters=send_user_signal`` also send it on
  preemption). submitit's handler resubmits the same call through the launcher's ``checkpoint``,
  runs ``scontrol requeue`` and exits; a time-out is requeued at most ``max_num_timeout`` times.
- SIGTERM, which SLURM sends when it preempts, requeues (``scontrol requeue``) or cancels a job,
  KillWait seconds before SIGKILL. submitit only logs it. SLURM itself starts a requeued job again.

Either signal stops nn-svd's training at the next epoch (MLP) or step (GPT-2) boundary, and the
job saves its state in ``<job dir>/interrupted/`` (see ``pipeline.train_phase``). Then
``hand_back`` lets submitit requeue it (USR2), or ends the process without a result (SIGTERM), so
that the sweep waits for the requeued run instead of recording an interrupted job. The requeued
run is the same job in the same job directory, with ``SLURM_RESTART_COUNT`` ≥ 1; it continues from
the saved state as if the user had added ``resume=true``.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger("nnsvd")


def in_slurm_job() -> bool:
    """Whether this process is a job that submitit started on SLURM."""
    return os.environ.get("SUBMITIT_EXECUTOR") == "slurm" and "SLURM_JOB_ID" in os.environ


def slurm_job_id() -> str:
    """The job id as submitit and squeue write it: ARRAYID_TASKID for an array task."""
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    return f"{array}_{task}" if array and task else os.environ["SLURM_JOB_ID"]


def restart_count() -> int:
    """How many times SLURM has requeued this job (0 outside a SLURM job of submitit's)."""
    if not in_slurm_job():
        return 0
    try:
        return int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def requeue_signal() -> signal.Signals | None:
    """The signal submitit asks SLURM to send before the time limit (USR2 unless
    SUBMITIT_PREEMPT_SIGNAL says otherwise), in a SLURM job of submitit's; else None."""
    if not in_slurm_job():
        return None
    from submitit import JobEnvironment

    return signal.Signals[f"SIG{JobEnvironment.USR_SIG}"]


def hand_back(received: list[int]) -> None:
    """After training stopped on ``received`` signals and saved its state: give the job back to SLURM.

    On submitit's requeue signal, submitit's own handler (back in place by now) resubmits the job,
    requeues it and exits the process. On SIGTERM, SLURM is ending the job; the process exits
    without a result, as it would have been killed without one, and SLURM starts it again if it
    requeues it. Returns only when submitit declines to requeue (time-outs used up); the job then
    ends as interrupted, and ``resume=true`` continues it.
    """
    usr = requeue_signal()
    if usr is not None and usr in received:
        from submitit.core.utils import UncompletedJobError

        log.warning("%s: the state is saved; submitit requeues job %s unless it has timed out too often",
                    usr.name, slurm_job_id())
        submitit_handler = signal.getsignal(usr)
        if callable(submitit_handler):
            try:
                submitit_handler(usr, None)  # checkpoint, scontrol requeue, sys.exit
            except UncompletedJobError as exc:
                log.error("SLURM job %s is not requeued: %s", slurm_job_id(), exc)
        return
    if signal.SIGTERM in received:
        log.warning("SIGTERM: SLURM is ending job %s (preempted, requeued or cancelled) and its state is saved; "
                    "a requeued run continues from it", slurm_job_id())
        raise SystemExit(143)

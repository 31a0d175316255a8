"""SLURM job states for submitit from squeue, on clusters without accounting.

A sweep's process (the one that ran ``python run.py -m … hydra/launcher=slurm``) learns how its
jobs are doing from submitit, which asks ``sacct``. A cluster without accounting
(``AccountingStorageType=accounting_storage/none``: small clusters, the local one of
``scripts/local_slurm.sh``) answers every such poll with "Slurm accounting storage is disabled" on
stderr, and submitit logs a "Bypassing sacct error" warning for it, twice with Hydra's console: a
flood of three lines per poll. Worse, submitit then never learns that a job ended without a result
(cancelled, killed), and the sweep waits for it forever.

``use_squeue_without_accounting`` checks the cluster once and, when accounting is off, has submitit
read the states from squeue instead, which knows every job slurmctld still holds (finished ones for
MinJobAge seconds). A job squeue no longer lists has ended. Clusters with accounting keep submitit's
sacct polling, and its warnings when sacct fails there.
"""

from __future__ import annotations

import logging
import os
import subprocess

from submitit.slurm.slurm import SlurmInfoWatcher, SlurmJob

log = logging.getLogger(__name__)

ENDED = "ENDED"  # the state of a job that squeue no longer lists: it ended more than MinJobAge ago


def accounting_storage() -> str | None:
    """The cluster's AccountingStorageType (``scontrol show config``), or None if scontrol cannot tell."""
    try:
        out = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.stdout.splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "AccountingStorageType":
            return value.strip()
    return None


class SqueueWatcher(SlurmInfoWatcher):
    """submitit's job-state watcher, reading ``squeue`` where submitit's reads ``sacct``."""

    def _make_command(self) -> list[str] | None:
        if not self._registered - self._finished:
            return None
        # All of this user's jobs, finished ones included: a job that is missing has ended.
        return ["squeue", f"--user={os.getuid()}", "--noheader", "--states=all", "--format=%i|%T|%N"]

    def read_info(self, string: bytes | str) -> dict[str, dict[str, str]]:
        text = string.decode() if isinstance(string, bytes) else string
        info = super().read_info("JobID|State|NodeList\n" + text)
        for job_id in self._registered - self._finished:
            info.setdefault(job_id, {"JobID": job_id, "State": ENDED, "NodeList": ""})
        return info


def use_squeue_without_accounting() -> bool:
    """On a cluster without accounting, make submitit's SLURM jobs poll squeue. Returns whether it did.

    submitit's jobs share one watcher, the class attribute ``SlurmJob.watcher``; it is replaced for
    this process (the sweep's), before the launcher submits any job.
    """
    storage = accounting_storage()
    if storage != "accounting_storage/none":
        return False
    if not isinstance(SlurmJob.watcher, SqueueWatcher):
        SlurmJob.watcher = SqueueWatcher(delay_s=SlurmJob.watcher._delay_s)
    log.info("SLURM accounting is disabled on this cluster (AccountingStorageType=%s): job states come from "
             "squeue instead of sacct", storage)
    return True

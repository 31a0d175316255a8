"""Job states from squeue for submitit, on a SLURM cluster without accounting."""

from __future__ import annotations

from nnsvd.cluster.squeue import ENDED, SqueueWatcher


def _watcher(*job_ids: str) -> SqueueWatcher:
    watcher = SqueueWatcher(delay_s=600)
    for job_id in job_ids:
        watcher.register_job(job_id)
    return watcher


def test_asks_squeue_for_finished_jobs_too():
    command = _watcher("5_0")._make_command()
    assert command[0] == "squeue" and "--states=all" in command and "--format=%i|%T|%N" in command
    assert _watcher()._make_command() is None  # nothing to watch, no call


def test_states_of_array_tasks_and_plain_jobs():
    watcher = _watcher("5_0", "5_1", "5_2", "6")
    watcher._info_dict.update(watcher.read_info("5_[1-2%2]|PENDING|\n5_0|RUNNING|vm\n6|COMPLETED|vm\n"))
    states = {j: watcher.get_state(j, mode="cache") for j in ("5_0", "5_1", "5_2", "6")}
    assert states == {"5_0": "RUNNING", "5_1": "PENDING", "5_2": "PENDING", "6": "COMPLETED"}
    assert not watcher.is_done("5_1", mode="cache") and watcher.is_done("6", mode="cache")


def test_a_job_squeue_no_longer_lists_has_ended():
    """slurmctld forgets a finished job after MinJobAge: the sweep must not wait for it forever."""
    watcher = _watcher("7", "8")
    watcher._info_dict.update(watcher.read_info(b"8|RUNNING|vm\n"))
    assert watcher.get_state("7", mode="cache") == ENDED and watcher.is_done("7", mode="cache")
    assert not watcher.is_done("8", mode="cache")

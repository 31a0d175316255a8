"""A SLURM job of submitit's: how it recognises a requeued run, and how it hands a stopped job back."""

from __future__ import annotations

import logging
import signal

import pytest
from submitit.core.utils import UncompletedJobError

from nnsvd.cluster.requeue import hand_back, in_slurm_job, requeue_signal, restart_count, slurm_job_id


@pytest.fixture
def slurm_job(monkeypatch):
    """The environment of array task 2 of SLURM job 10, requeued once, as submitit starts it."""
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "12", "SLURM_ARRAY_JOB_ID": "10",
                       "SLURM_ARRAY_TASK_ID": "2", "SLURM_RESTART_COUNT": "1"}.items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def usr2_handler():
    """Stands in for submitit's USR2 handler; the previous handler is restored after the test."""
    calls = []
    previous = signal.getsignal(signal.SIGUSR2)
    yield calls
    signal.signal(signal.SIGUSR2, previous)


def test_outside_a_slurm_job_nothing_is_requeued(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "12")  # e.g. a run started by hand inside an allocation
    monkeypatch.setenv("SLURM_RESTART_COUNT", "3")
    assert not in_slurm_job() and restart_count() == 0 and requeue_signal() is None


def test_a_requeued_array_task_knows_its_job_and_restarts(slurm_job):
    assert in_slurm_job()
    assert slurm_job_id() == "10_2"  # as submitit and squeue name it
    assert restart_count() == 1
    assert requeue_signal() == signal.SIGUSR2


def test_sigterm_ends_the_process_without_a_result(slurm_job):
    with pytest.raises(SystemExit):  # not an Exception: submitit writes no result, SLURM reruns the job
        hand_back([signal.SIGTERM])


def test_usr2_runs_submitits_handler_after_the_state_is_saved(slurm_job, usr2_handler):
    def submitit_requeues(signum, frame):
        usr2_handler.append(signum)
        raise SystemExit(-1)  # what submitit does after scontrol requeue

    signal.signal(signal.SIGUSR2, submitit_requeues)
    with pytest.raises(SystemExit):
        hand_back([signal.SIGUSR2])
    assert usr2_handler == [signal.SIGUSR2]


def test_when_submitit_declines_to_requeue_the_job_ends_as_interrupted(slurm_job, usr2_handler, caplog):
    def timed_out_too_often(signum, frame):
        raise UncompletedJobError("Job not requeued because: timed-out too many times.")

    signal.signal(signal.SIGUSR2, timed_out_too_often)
    with caplog.at_level(logging.ERROR, logger="nnsvd"):
        assert hand_back([signal.SIGUSR2]) is None
    assert "SLURM job 10_2 is not requeued: Job not requeued because: timed-out too many times." in caplog.text


@pytest.fixture
def stop_handlers():
    """run_job's SIGTERM/SIGINT handlers, installed for the test and removed after it."""
    from nnsvd.run import pipeline

    restore = pipeline._install_stop_handlers()
    pipeline._phase[0] = "starting"
    yield pipeline
    restore()
    pipeline.STOP.clear()


def _wait_for_the_signal():
    import time

    for _ in range(100):  # the handler runs at the next bytecode; this loop is only where it lands
        time.sleep(0.01)


def test_a_signal_outside_training_stops_at_once_naming_the_phase(stop_handlers):
    import os

    pipeline = stop_handlers
    stopped = pytest.raises(pipeline.Interrupted, match="SIGTERM received while calibrating and compressing: stopped")
    with stopped, pipeline.doing("calibrating and compressing"):
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for_the_signal()
        pytest.fail("the signal did not stop the phase")
    assert pipeline._phase[0] == "starting"  # the phase it was in before


def test_a_signal_during_training_or_saving_waits_for_its_end(stop_handlers):
    import os

    pipeline = stop_handlers
    with pipeline.doing("training (dense)"):
        os.kill(os.getpid(), signal.SIGTERM)
        _wait_for_the_signal()
    assert pipeline.STOP.is_set()  # training sees it at its next epoch or step
    with pipeline.doing("saving the model"):
        _wait_for_the_signal()  # a save is not cut short
    stopped = pytest.raises(pipeline.Interrupted, match="SIGTERM received while evaluating the compressed model")
    with stopped, pipeline.doing("evaluating the compressed model"):  # the next phase does not start
        pytest.fail("the phase ran although a stop was asked for")

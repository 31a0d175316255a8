"""Sweeps on a real single-node SLURM cluster (scripts/local_slurm.sh) through the SLURM preset:
results, summary and W&B runs, a failing job, and jobs that SLURM requeues mid-training."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HANG, REPO, run_cli
from omegaconf import OmegaConf

pytestmark = pytest.mark.slow

# The preset, fitted to the local cluster: partition debug, no GPUs, one CPU per job.
SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=null",
         "hydra.launcher.cpus_per_task=1", "hydra.launcher.mem_gb=2"]


def _jobs(sweep: Path) -> dict[int, dict]:
    """results.json of every job of the sweep, keyed by rank."""
    results = [json.loads(p.read_text()) for p in sweep.glob("*/results.json")]
    return {r["rank"]: r for r in results}


def _slurm(env: dict, *args: str) -> str:
    return subprocess.run(list(args), env={**os.environ, **env}, check=True, capture_output=True, text=True,
                          timeout=60).stdout


def test_sweep_runs_as_slurm_jobs_and_writes_results_summary_and_wandb(slurm_cluster, data_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc, _ = run_cli([*SLURM, "train.epochs=1", "rank=4,8,32", "wandb.mode=offline"], sweep, data_root=data_root,
                      cache=tmp_path / "cache", multirun=True, check=False,
                      env={**slurm_cluster, "WANDB_MODE": None})
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output  # rank 32 failed, so the sweep does
    jobs = _jobs(sweep)
    assert {rank: r["status"] for rank, r in jobs.items()} == {4: "ok", 8: "ok", 32: "failed"}
    assert "allowed 1 ≤ rank ≤ 31" in jobs[32]["error"]
    assert all(r["metrics"]["test_acc"] > 0.1 for r in jobs.values() if r["status"] == "ok")
    # they ran as SLURM jobs: submitit's sbatch scripts, with the preset's settings
    scripts = list((sweep / ".submitit").glob("*/*_submission.sh"))
    assert scripts and "#SBATCH --partition=debug" in scripts[0].read_text()
    for name in ("summary.csv", "summary.md", "summary.png"):
        assert (sweep / name).is_file(), name
    assert "1 failed" in output
    job_runs = [p for r in jobs.values() for p in (Path(r["run_dir"]) / "wandb").glob("offline-run-*")]
    assert len(job_runs) == 3 and len(list((sweep / "wandb").glob("offline-run-*"))) == 1
    # No accounting on this cluster: submitit reads squeue, so sacct's errors do not flood the output.
    assert "job states come from squeue" in output
    assert "Bypassing sacct error" not in output and "accounting storage is disabled" not in output


def _wait_for(predicate, what: str, proc: subprocess.Popen, output: Path, timeout: float = HANG) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the sweep ended (exit {proc.returncode}) before {what}:\n{output.read_text()}")
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _training_job(sweep: Path, rank: int, marker: str) -> str | None:
    """The SLURM job id of the sweep's rank-``rank`` job once its run.log shows ``marker``."""
    for overrides in sweep.glob("*/.hydra/overrides.yaml"):
        job_dir = overrides.parent.parent
        log = job_dir / "run.log"
        if f"rank={rank}" in OmegaConf.load(overrides) and log.exists() and marker in log.read_text():
            return str(OmegaConf.load(job_dir / ".hydra" / "hydra.yaml").hydra.job.id)  # submitit's job id
    return None


def test_preempted_and_timed_out_jobs_are_requeued_and_continue_from_their_state(
        slurm_cluster, data_root, tmp_path):
    """rank 4 is requeued by SLURM (scontrol requeue: SIGTERM, as a preemption); rank 8 gets submitit's
    time-limit signal (USR2), and submitit requeues it. Neither command says resume=true."""
    args = ["mode=scratch", "rank=4,8", "train.epochs=10"]  # the signals land mid-training
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    # timeout_min=10: submitit counts a USR2 this early as a time-out (it requeues up to max_num_timeout=3)
    cmd = [sys.executable, str(REPO / "run.py"), "-m", *args, *SLURM, "hydra.launcher.timeout_min=10",
           f"hydra.sweep.dir={sweep}", f"cache.dir={cache}", "wandb.mode=disabled"]
    env = {**os.environ, **slurm_cluster, "NNSVD_DATA_ROOT": str(data_root), "WANDB_MODE": "disabled"}
    # Each job is stopped as soon as it has trained one epoch: rank 4 by SLURM, rank 8 by the signal.
    stops = {4: ["scontrol", "requeue"], 8: ["scancel", "--signal=USR2"]}

    def stop_the_training_jobs() -> bool:
        for rank in list(stops):
            if (job_id := _training_job(sweep, rank, "scratch epoch=1 ")) is not None:
                _slurm(slurm_cluster, *stops.pop(rank), job_id)
        return not stops

    output = tmp_path / "sweep.out"
    with open(output, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for(stop_the_training_jobs, "both jobs trained an epoch", proc, output)
        proc.wait(timeout=HANG)
    finally:
        if proc.poll() is None:
            proc.kill()
    out = output.read_text()
    assert proc.returncode == 0, out

    # The same sweep, uninterrupted, on this machine; one thread, as the preset gives a 1-CPU job.
    run_cli(args, tmp_path / "straight", data_root=data_root, cache=cache, multirun=True,
            env={"OMP_NUM_THREADS": "1"})
    straight = _jobs(tmp_path / "straight")
    jobs = _jobs(sweep)
    assert sorted(jobs) == sorted(straight)
    for rank, job in jobs.items():
        assert job["status"] == "ok", rank
        assert job["metrics"] == straight[rank]["metrics"], rank
        assert job["history"] == straight[rank]["history"], rank
        log = (Path(job["run_dir"]) / "run.log").read_text()
        assert "SLURM requeued job" in log and "(restart 1)" in log, rank
        done = int(log.split("resuming scratch training after epochs ")[1].split()[0])
        assert 1 <= done < 10, rank
        assert log.count("scratch epoch=1 ") == 1, rank  # continued, never trained from the start again
        assert not (Path(job["run_dir"]) / "interrupted").exists()
    assert "SIGTERM received" in (Path(jobs[4]["run_dir"]) / "run.log").read_text()
    timed_out_log = (Path(jobs[8]["run_dir"]) / "run.log").read_text()
    assert "SIGUSR2 received" in timed_out_log and "Requeued job" in timed_out_log
    assert "(2 remaining timeouts)" in timed_out_log  # submitit counted it against max_num_timeout=3

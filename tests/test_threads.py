"""Each job of a parallel sweep gets its share of the cores (nnsvd.run.threads)."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from nnsvd.run.threads import SWEEP_JOBS_ENV, USER_OMP_ENV, job_threads, parallel_jobs, sweep_jobs

JOBLIB = {"_target_": "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher", "n_jobs": -1}
LOCAL = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.LocalLauncher", "cpus_per_task": None}
SLURM = {"_target_": "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"}
BASIC = {"_target_": "hydra._internal.core_plugins.basic_launcher.BasicLauncher"}


def test_the_sweep_is_counted_from_the_preset_and_the_command_line():
    config = OmegaConf.create({"hydra": {
        "sweeper": {"params": {"+recipe": "svd_uniform,whiten_uniform,asvd_uniform", "compress.ratio": "0.2,0.4"}},
        "overrides": {"task": ["rank=1,2", "seed=3", "train.epochs=range(1,3)"]},
    }})
    assert sweep_jobs(config) == 3 * 2 * 2 * 2
    assert sweep_jobs(OmegaConf.create({"hydra": {"overrides": {"task": ["rank=8"]}}})) == 1
    assert sweep_jobs(OmegaConf.create({"hydra": {"overrides": {"task": ["lr=interval(0.1,1)"]}}})) == 1  # not basic


@pytest.mark.parametrize(("launcher", "jobs", "cpus", "parallel"), [
    (JOBLIB, 6, 16, 6),                   # n_jobs=-1: every core, but only 6 jobs
    (JOBLIB, 40, 16, 16),
    ({**JOBLIB, "n_jobs": 2}, 6, 2, 2),
    ({**JOBLIB, "n_jobs": -2}, 40, 16, 15),  # joblib: all cores but one
    (LOCAL, 3, 2, 3),                     # submitit local starts every job at once
    (BASIC, 6, 2, 1),
    (SLURM, 6, 2, None),
])
def test_jobs_running_at_once(launcher, jobs, cpus, parallel):
    assert parallel_jobs(launcher, jobs, cpus) == parallel


def test_each_job_gets_its_share_of_the_cores():
    env = {SWEEP_JOBS_ENV: "2"}
    assert job_threads({**JOBLIB, "n_jobs": 2}, True, env, cpus=2) == (1, "2 cores shared by 2 jobs at once")
    assert job_threads(JOBLIB, True, {SWEEP_JOBS_ENV: "4"}, cpus=16) == (4, "16 cores shared by 4 jobs at once")
    assert job_threads(LOCAL, True, {SWEEP_JOBS_ENV: "8"}, cpus=2)[0] == 1  # never 0
    assert job_threads({**LOCAL, "cpus_per_task": 3}, True, env, cpus=16) == (3, "hydra.launcher.cpus_per_task")
    assert job_threads(BASIC, True, env, cpus=2) == (None, "one job at a time")
    assert job_threads(JOBLIB, False, env, cpus=2) == (None, "a single run")
    assert job_threads(SLURM, True, {"SLURM_CPUS_PER_TASK": "8"}) == (8, "SLURM_CPUS_PER_TASK")
    assert job_threads({**JOBLIB, "n_jobs": 2}, True, {"SLURM_CPUS_PER_TASK": "8", **env}) == (
        4, "8 cores shared by 2 jobs at once")  # a local sweep inside a SLURM allocation
    # the user's OMP_NUM_THREADS is kept; the one loky sets in its workers is not the user's
    assert job_threads(JOBLIB, True, {"OMP_NUM_THREADS": "3", USER_OMP_ENV: "3", **env}, cpus=2) == (
        3, "OMP_NUM_THREADS=3")
    assert job_threads(JOBLIB, True, {"OMP_NUM_THREADS": "8", USER_OMP_ENV: "", SWEEP_JOBS_ENV: "2"}, cpus=16) == (
        8, "16 cores shared by 2 jobs at once")
    assert job_threads(BASIC, False, {"OMP_NUM_THREADS": "3"}, cpus=2) == (3, "OMP_NUM_THREADS=3")
    assert job_threads(BASIC, False, {"OMP_NUM_THREADS": "4,2"}, cpus=2) == (None, "OMP_NUM_THREADS=4,2")

"""Multirun sweeps through the real `python run.py -m ...`: launchers, summaries, failures, resume."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import HANG, REPO, interrupt_and_resume, run_cli

pytestmark = pytest.mark.slow

QUICK = ["train.epochs=1"]


def _rows(sweep: Path) -> list[dict]:
    with open(sweep / "summary.csv") as f:
        return list(csv.DictReader(f))


def _results(sweep: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))}


def _assert_summary(sweep: Path, jobs: int) -> list[dict]:
    for name in ("summary.csv", "summary.md", "summary.png"):
        assert (sweep / name).is_file(), name
    assert (sweep / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = _rows(sweep)
    assert len(rows) == jobs
    md = (sweep / "summary.md").read_text()
    assert all(row["job"] in md for row in rows)
    return rows


@pytest.mark.parametrize("launcher", ["basic", "joblib"])
def test_two_rank_sweep_writes_summary_and_wandb_group(data_root, tmp_path, launcher):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    extra = ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"] if launcher == "joblib" else []
    proc, _ = run_cli([*QUICK, "rank=2,4", "wandb.mode=offline", *extra], sweep, data_root=data_root,
                      cache=cache, multirun=True, env={"WANDB_MODE": None, "OMP_NUM_THREADS": None})
    rows = _assert_summary(sweep, 2)
    cpus = len(os.sched_getaffinity(0))
    threads = f"CPU threads: {max(1, cpus // 2)} ({cpus} cores shared by 2 jobs at once)" if extra else \
        "(one job at a time)"
    assert all(threads in (sweep / job / "run.log").read_text() for job in ("0_rank-2", "1_rank-4"))
    assert [(r["rank"], r["status"], r["mode"]) for r in rows] == [("2", "ok", "compress"), ("4", "ok", "compress")]
    results = _results(sweep)
    assert sorted(results) == ["0_rank-2", "1_rank-4"]  # readable job dirs: the swept key alone
    for row, r in zip(rows, results.values()):
        assert float(row["value"]) == r["metrics"]["test_acc"]
        assert float(row["dense_value"]) == r["metrics"]["dense_test_acc"]
    # the dense model is trained once, even by two parallel jobs: the other one waits and loads it
    sources = sorted(r["dense_source"].split(":")[0].split(",")[0] for r in results.values())
    assert sources == ["cache", "trained"]
    # every job wrote an offline W&B run, and the sweep one more: the summary run
    job_runs = [p for job in results for p in (sweep / job / "wandb").glob("offline-run-*")]
    summary_runs = list((sweep / "wandb").glob("offline-run-*"))
    assert len(job_runs) == 2 and len(summary_runs) == 1 and any(summary_runs[0].glob("*.wandb"))


def test_submitit_local_runs_the_cluster_code_path(data_root, tmp_path):
    sweep = tmp_path / "sweep"
    run_cli([*QUICK, "rank=2,4", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=60"], sweep,
            data_root=data_root, cache=tmp_path / "cache", multirun=True)
    rows = _assert_summary(sweep, 2)
    assert [r["status"] for r in rows] == ["ok", "ok"]
    assert any((sweep / ".submitit").iterdir())  # submitit's own job folders


def test_failing_job_does_not_stop_the_sweep(data_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc, _ = run_cli([*QUICK, "rank=32,2"], sweep, data_root=data_root, cache=tmp_path / "cache",
                      multirun=True, check=False)
    assert proc.returncode != 0  # once all jobs are done, the sweep says one failed
    results = _results(sweep)
    assert [r["status"] for r in results.values()] == ["failed", "ok"]
    failed = results["0_rank-32"]
    assert "allowed 1 ≤ rank ≤ 31" in failed["error"]
    rows = _assert_summary(sweep, 2)
    assert [r["status"] for r in rows] == ["failed", "ok"] and "31" in rows[0]["error"]


def test_resume_after_kill_recomputes_nothing_that_finished(data_root, tmp_path):
    sweep, cache = tmp_path / "sweep", tmp_path / "cache"
    args = [*QUICK, "rank=1,2,4"]
    cmd = [sys.executable, str(REPO / "run.py"), "-m", *args, f"hydra.sweep.dir={sweep}", f"cache.dir={cache}",
           "wandb.mode=disabled"]
    env = {**os.environ, "NNSVD_DATA_ROOT": str(data_root), "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = sweep / "0_rank-1" / "results.json"
    deadline = time.time() + HANG
    while not first.exists() and time.time() < deadline:
        time.sleep(0.2)
    proc.kill()  # midway: job 0 finished, the others have not
    proc.wait()
    assert json.loads(first.read_text())["status"] == "ok"
    done = {p.parent.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in sweep.glob("*/results.json")}
    assert len(done) < 3

    run_cli([*args, "resume=true"], sweep, data_root=data_root, cache=cache, multirun=True)
    results = _results(sweep)
    assert len(results) == 3 and all(r["status"] == "ok" for r in results.values())
    for name, (mtime, content) in done.items():  # untouched: not recomputed
        path = sweep / name / "results.json"
        assert path.stat().st_mtime_ns == mtime and path.read_bytes() == content
    assert "already finished ok; skipping" in (sweep / "0_rank-1" / "run.log").read_text()
    assert len(_assert_summary(sweep, 3)) == 3


def test_sigterm_saves_state_and_resume_matches_uninterrupted(data_root, tmp_path):
    interrupted, resumed, straight = interrupt_and_resume(
        ["mode=scratch", "rank=4", "train.epochs=4"], tmp_path, "scratch epoch=1",
        data_root=data_root, cache=tmp_path / "cache")
    assert interrupted["status"] == "interrupted" and "resume=true" in interrupted["error"]
    stopped_after = len(interrupted["history"]["scratch"])
    assert 1 <= stopped_after < 4
    log = (tmp_path / "interrupted" / "run.log").read_text()
    assert f"resuming scratch training after epochs {stopped_after}" in log
    assert resumed["status"] == "ok"
    assert resumed["metrics"] == straight["metrics"]
    assert resumed["history"] == straight["history"]

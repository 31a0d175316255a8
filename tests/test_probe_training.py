"""scripts/probe_training.py: run.py's training with plain-SVD truncation measured at every validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import HANG, REPO, require_data, run_cli

pytestmark = pytest.mark.slow

SMALL = ["model=gpt2_bytes", "model.config.n_layer=1", "train.steps=4", "train.eval_every=2",
         "train.warmup_steps=1", "eval.max_tokens=4096"]


def test_probe_rows_match_the_run_and_the_suites_own_uniform_svd(tmp_path):
    data = require_data("wikitext-2-raw").parent
    out, cache = tmp_path / "probe.jsonl", tmp_path / "cache"
    env = {**os.environ, "NNSVD_DATA_ROOT": str(data), "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, str(REPO / "scripts" / "probe_training.py"), "--out", str(out), "--ratios", "0.4,0.6",
           *SMALL, f"hydra.run.dir={tmp_path / 'dense'}", f"cache.dir={cache}", "wandb.mode=disabled"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=HANG)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["step"] for row in rows] == [2, 4]
    assert "| 4 | " in proc.stdout  # the table at the end

    # the last validation is the trained model's: run.py's own val ppl, and it lands in the dense cache
    dense = json.loads((tmp_path / "dense" / "results.json").read_text())
    assert dense["metrics"]["val_ppl"] == rows[-1]["dense"]

    # its truncation is the suite's uniform allocation with plain SVD, on the cached model
    _, svd = run_cli([*SMALL, "compress.ratio=0.6", "compress.allocation=uniform", "compress.method=svd"],
                     tmp_path / "svd", data_root=data, cache=cache)
    assert svd["status"] == "ok"
    assert len([d for d in (cache / "dense").glob("gpt2-*") if d.is_dir()]) == 1  # the probe's model, not retrained
    assert svd["metrics"]["val_ppl"] == rows[-1]["svd_0.6"]
    assert svd["metrics"]["val_ppl"] > rows[-1]["dense"]

    # again on the cached model: nothing to probe, which is an error that says what to do
    again = subprocess.run([*cmd[:3], str(tmp_path / "again.jsonl"), *cmd[4:]], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=HANG)
    assert again.returncode == 1 and not (tmp_path / "again.jsonl").exists()
    assert "probe_training.py: error: no training validation was probed" in again.stderr
    assert "cache.dense=false" in again.stderr

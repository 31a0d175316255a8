"""scripts/compare_at_ranks.py: plain SVD and whitening at the ranks a sweep's jobs recorded."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import HANG, REPO
from reference_truncation import TARGETS, truncate_blocks

from nnsvd.models.gpt2 import load_gpt2
from nnsvd.training.perplexity import evaluate_perplexity


def test_rows_are_the_jobs_ranks_and_plain_svd_equals_an_independent_truncation(tmp_path):
    torch.manual_seed(0)
    config = {"n_layer": 1, "n_embd": 32, "n_head": 2, "n_positions": 128, "vocab_size": 257}
    model = load_gpt2("x", pretrained=False, config=config).eval()
    model.save_pretrained(tmp_path / "dense")
    wiki = tmp_path / "data" / "wikitext-2-raw"
    wiki.mkdir(parents=True)
    text = bytes(range(32, 127)) * 200
    (wiki / "wiki.train.raw").write_bytes(text)
    (wiki / "wiki.test.raw").write_bytes(text[::-1])
    uniform = {0.4: {"attn.c_attn": 14, "attn.c_proj": 9, "mlp.c_fc": 15, "mlp.c_proj": 15}}  # ⌊mn·0.6/(m+n)⌋
    for i, (ratio, allocation) in enumerate([(0.4, "uniform"), (0.8, "uniform")]):
        ranks = {f"transformer.h.0.{t}": uniform.get(ratio, {}).get(t, 2) for t in TARGETS}
        job = tmp_path / "sweep" / f"{i}_job"
        job.mkdir(parents=True)
        results = {"status": "ok", "metrics": {"test_ppl": 1.0},
                   "compress": {"method": "svd", "budget": {"ratio": ratio, "allocation": allocation, "ranks": ranks}}}
        (job / "results.json").write_text(json.dumps(results))
    out = tmp_path / "out.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "compare_at_ranks.py"), str(tmp_path / "sweep"), str(tmp_path / "dense"),
         "--ratios", "0.4", "--data-root", str(tmp_path / "data"), "--tokens", "4096", "--samples", "16",
         "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=HANG,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    jobs = json.loads(out.read_text())["jobs"]
    assert [j["ratio"] for j in jobs] == [0.4]  # the 0.8 job is not asked for
    test = torch.tensor(list(text[::-1][:4096]))
    expected = evaluate_perplexity(truncate_blocks(model, 0.4), test, batch_size=64)["ppl"]
    assert jobs[0]["svd_test_ppl"] == pytest.approx(expected, rel=1e-4)
    assert jobs[0]["whiten_test_ppl"] > 1.0 and jobs[0]["whiten_test_ppl"] != pytest.approx(expected, rel=1e-4)

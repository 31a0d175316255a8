"""Plain SVD against whitening at the same per-layer ranks: the ranks each job of a methods sweep chose.

In ``experiment=gpt2_methods`` each (method, allocation) job chooses its own ranks, so "whiten against
svd under the spectrum rule" compares two allocations as well as two methods. This script reads the
ranks each finished job recorded (``compress.budget.ranks`` in its results.json), compresses the dense
byte-level GPT-2 to exactly those ranks with plain SVD and with whitening, and prints the test
perplexity of both on the first --tokens bytes of WikiText-2's raw test file (the stream of
scripts/ablate_blocks.py, whose dense and plain-SVD figures equal the sweep's).

Whitening is calibrated on --samples blocks of 128 bytes of the raw train file, drawn with --seed: raw
bytes, not the suite's line-by-line stream, so its figures can differ from the sweep's in the third
digit. Each row also shows the job's own test perplexity.

Usage: python scripts/compare_at_ranks.py SWEEP_DIR DENSE_DIR [--ratios 0.4,0.6] [--data-root /path/to/data]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

from ablate_blocks import read_byte_stream
from transformers import GPT2LMHeadModel

from nnsvd import compress_model
from nnsvd.config import CalibrationConfig
from nnsvd.data.calibration import draw_samples
from nnsvd.data.text import pack_blocks
from nnsvd.lowrank import compress_with_calibration, resolve_factorizer
from nnsvd.training.perplexity import evaluate_perplexity, lm_loss


def read_sweep_ranks(sweep_dir: Path, ratios: list[float]) -> list[dict]:
    """(ratio, method, allocation, ranks, the job's test ppl) of every finished budget job at ``ratios``."""
    jobs = []
    for path in sorted(sweep_dir.glob("*/results.json")):
        r = json.loads(path.read_text())
        budget = (r.get("compress") or {}).get("budget")
        if r.get("status") != "ok" or not budget or budget["ratio"] not in ratios:
            continue
        jobs.append(
            {
                "ratio": budget["ratio"],
                "method": r["compress"]["method"],
                "allocation": budget["allocation"],
                "ranks": budget["ranks"],
                "job_test_ppl": r["metrics"]["test_ppl"],
            }
        )
    return sorted(jobs, key=lambda j: (j["ratio"], j["method"], j["allocation"]))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("sweep_dir", type=Path)
    p.add_argument("dense_dir")
    p.add_argument("--ratios", type=lambda text: [float(x) for x in text.split(",")], default=[0.4, 0.6])
    p.add_argument("--data-root", type=Path, default=Path(os.environ.get("NNSVD_DATA_ROOT", "data")))
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--samples", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("outputs/compare_at_ranks.json"))
    a = p.parse_args()

    jobs = read_sweep_ranks(a.sweep_dir, a.ratios)
    if not jobs:
        raise SystemExit(f"no finished compress.ratio job at ratios {a.ratios} under {a.sweep_dir}")
    dense = GPT2LMHeadModel.from_pretrained(a.dense_dir).eval()
    test = read_byte_stream(a.data_root, "test", a.tokens)
    blocks = pack_blocks(read_byte_stream(a.data_root, "train"), 128)
    picked = draw_samples(
        len(blocks), CalibrationConfig(samples=a.samples, seed=a.seed, split="train"), unit="blocks of 128 bytes"
    )
    batches = list(blocks[picked].split(32))

    def ppl(model) -> float:
        return evaluate_perplexity(model, test, batch_size=64)["ppl"]

    print(f"dense test ppl {ppl(dense):.3f}")
    print("| ratio | ranks chosen by | plain SVD at those ranks | whiten at those ranks | the job itself |")
    print("|---:|---|---:|---:|---:|")
    for job in jobs:
        ranks = job["ranks"]
        plain = copy.deepcopy(dense)
        compress_model(plain, list(ranks), rank=ranks, method="svd")
        white = copy.deepcopy(dense)
        compress_with_calibration(
            white, list(ranks), ranks, batches=batches, loss_fn=lm_loss, method=resolve_factorizer("whiten")
        )
        job["svd_test_ppl"], job["whiten_test_ppl"] = ppl(plain), ppl(white)
        print(
            f"| {job['ratio']:g} | {job['method']} + {job['allocation']} | {job['svd_test_ppl']:.3f} "
            f"| {job['whiten_test_ppl']:.3f} | {job['job_test_ppl']:.3f} |",
            flush=True,
        )
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps({"sweep_dir": str(a.sweep_dir), "dense_dir": a.dense_dir, "jobs": jobs}, indent=1)
    )
    print("saved", a.out)


if __name__ == "__main__":
    main()

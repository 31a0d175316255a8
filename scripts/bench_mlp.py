"""Benchmark the MNIST entrypoint end to end, as a user runs it.

    python scripts/bench_mlp.py --data-root /path/to/data [--repeats 3] [--out outputs/bench_mlp.json]

Measures (each a fresh `python run.py ...` process, W&B offline, real MNIST):
  1. the dense run `run.py model=mlp` with 10 epochs and the dense cache off (it trains);
  2. one compress job per rank 1, 2, 4, 8, 16, 31 with the dense model already cached.
Targets on a 2-core CPU: ≤ 6 s for (1), ≤ 3 s per job for (2). Both are measured with W&B offline
(the default), and again with wandb.mode=disabled to show what W&B's start-up costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RANKS = (1, 2, 4, 8, 16, 31)


def timed_run(args: list[str], env: dict, out_dir: Path, wandb: str = "offline") -> tuple[float, dict]:
    cmd = [sys.executable, str(REPO / "run.py"), *args, f"hydra.run.dir={out_dir}", f"wandb.mode={wandb}"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"benchmark run failed: {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return wall, json.loads((out_dir / "results.json").read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=os.environ.get("NNSVD_DATA_ROOT", "data"),
                        help="data.root holding mnist/MNIST/raw (default: $NNSVD_DATA_ROOT or ./data)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(REPO / "outputs" / "bench_mlp.json"))
    a = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_mlp_"))
    env = {**os.environ, "NNSVD_DATA_ROOT": str(Path(a.data_root).resolve()), "NNSVD_CACHE_DIR": str(work / "cache")}
    env.pop("WANDB_MODE", None)

    # Warm-up: decompresses MNIST once and fills the tensor cache, as a user's first run does.
    timed_run(["model=mlp", "train.epochs=1", "cache.dense=false"], env, work / "warmup")

    report = {
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__},
    }
    timed_run(["model=mlp"], env, work / "fill_cache")  # trains once and fills the dense cache
    for wandb in ("offline", "disabled"):
        dense = []
        for i in range(a.repeats):
            wall, r = timed_run(["model=mlp", "cache.dense=false"], env, work / f"dense_{wandb}{i}", wandb)
            dense.append({"wall_s": wall, "train_s": r["timing"]["train_s"], "test_acc": r["metrics"]["test_acc"]})
        compress = []
        for rank in RANKS:
            walls = []
            for i in range(a.repeats):
                wall, r = timed_run(["model=mlp", f"rank={rank}"], env, work / f"r{rank}_{wandb}{i}", wandb)
                assert r["dense_source"].startswith("cache:"), r["dense_source"]
                walls.append(wall)
            compress.append({"rank": rank, "wall_s": statistics.median(walls), "min_s": min(walls),
                             "compress_s": r["timing"]["compress_s"],
                             "compressed_test_acc": r["metrics"]["compressed_test_acc"]})
        dense_median = statistics.median(d["wall_s"] for d in dense)
        worst = max(c["wall_s"] for c in compress)
        report[f"wandb_{wandb}"] = {
            "dense_runs": dense, "dense_wall_s_median": dense_median, "dense_target_met": dense_median <= 6.0,
            "compress_jobs": compress, "compress_wall_s_max": worst, "compress_target_met": worst <= 3.0,
        }
        print(f"\nW&B {wandb}: dense `run.py model=mlp` (10 epochs): median {dense_median:.2f} s over {a.repeats} "
              f"(training {statistics.median(d['train_s'] for d in dense):.2f} s; "
              f"target ≤ 6 s: {'met' if dense_median <= 6.0 else 'NOT met'})")
        print(f"{'rank':>5} {'wall s (median)':>16} {'min s':>7} {'compress s':>11} {'test acc':>9}")
        for c in compress:
            print(f"{c['rank']:>5} {c['wall_s']:>16.2f} {c['min_s']:>7.2f} {c['compress_s']:>11.4f} "
                  f"{c['compressed_test_acc']:>9.4f}")
        print(f"cached compress job: worst median {worst:.2f} s (target ≤ 3 s: {'met' if worst <= 3.0 else 'NOT met'})")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(report, indent=2))
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()

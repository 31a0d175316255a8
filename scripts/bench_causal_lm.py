"""Peak memory of block-by-block whitened compression of a LLaMA-shaped model, against the model's size.

A LLaMA-shaped causal LM (random init, no download) is built in this process; then its 7 targets
per block (q/k/v/o/gate/up/down) are compressed with ``compress.method=whiten`` at the per-layer
ranks that remove ``--remove`` of each layer's weights (the suite's uniform allocation,
``nnsvd.lowrank.allocation.uniform_ranks``: r = max(1, ⌊m·n·(1 − remove)/(m + n)⌋), handed to the
engine as a {layer: rank} mapping), calibrated on ``--samples`` random sequences.

What is measured (one process per path, so that peaks do not mix):

- CPU: the resident set. The peak is read from the kernel's high-water mark (VmHWM), which is reset
  (``/proc/self/clear_refs``) just before compression, so it is the compression's own peak; the
  baseline is the resident set after the imports (Python, torch, transformers), which no
  compression can avoid. ``extra = peak − resident set before compression``, measured after one
  tiny forward pass and float64 eigh/Cholesky, which set up the BLAS/LAPACK buffers every process
  that computes anything has.
- CUDA: torch.cuda.max_memory_allocated, reset before compression.

Target: peak − baseline ≤ 1.5 × the model's size + one block's statistics.

Usage::

    python scripts/bench_causal_lm.py [--hidden 2048 --intermediate 5504 --layers 8 --vocab 32000]
        [--dtype float32] [--samples 32 --seq-len 256 --batch-size 4] [--path blockwise|all-at-once]
        [--device cpu|cuda] [--out outputs/bench_causal_lm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from nnsvd.lowrank import (
    compress_blockwise,
    compress_with_calibration,
    find_targets,
    resolve_factorizer,
    shared_input_groups,
    stats_nbytes,
)
from nnsvd.lowrank.allocation import target_shapes, uniform_ranks
from nnsvd.models.causal_lm import DTYPES, default_targets
from nnsvd.training.perplexity import lm_loss

GIB = 2**30


def read_resident() -> tuple[int, int]:
    """(resident set, its high-water mark) of this process in bytes."""
    status = Path("/proc/self/status").read_text()
    rss, hwm = (int(re.search(rf"{key}:\s+(\d+) kB", status).group(1)) * 1024 for key in ("VmRSS", "VmHWM"))
    return rss, hwm


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux ≥ 4.0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=5504)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dtype", choices=list(DTYPES), default="float32")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--remove", type=float, default=0.2, help="fraction of each target's weights removed")
    p.add_argument("--path", choices=["blockwise", "all-at-once"], default="blockwise")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default="outputs/bench_causal_lm.json")
    a = p.parse_args()
    device = torch.device(a.device)
    cuda = device.type == "cuda"

    baseline, _ = read_resident()
    config = LlamaConfig(
        vocab_size=a.vocab, hidden_size=a.hidden, intermediate_size=a.intermediate, num_hidden_layers=a.layers,
        num_attention_heads=a.heads, num_key_value_heads=a.kv_heads, max_position_embeddings=max(a.seq_len, 2048),
    )
    torch.manual_seed(0)
    t = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[a.dtype]).eval()
    build_s = time.perf_counter() - t
    model_bytes = sum(x.numel() * x.element_size() for x in model.parameters())
    dense_params = sum(x.numel() for x in model.parameters())
    names = find_targets(model, default_targets(model))
    ranks = uniform_ranks(target_shapes(model, names), a.remove)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, a.vocab, (a.samples, a.seq_len), generator=g).to(device)
    batches = list(tokens.split(a.batch_size))
    block = [n for n in names if n.startswith("model.layers.0.")]
    groups = shared_input_groups(model, block, lambda: lm_loss(model, batches[0][:1]))
    block_stats = stats_nbytes(model, block, groups=groups)
    activations = a.samples * a.seq_len * a.hidden * DTYPES[a.dtype].itemsize

    method = resolve_factorizer("whiten")
    compress = compress_blockwise if a.path == "blockwise" else compress_with_calibration
    # One-time costs of the process, not of compression: the BLAS/LAPACK buffers and kernels' caches
    # that the first matrix product, eigendecomposition and Cholesky factorization set up.
    with torch.no_grad():
        lm_loss(model, batches[0][:1, :8])
    eye = torch.eye(64, dtype=torch.float64, device=device)
    torch.linalg.eigh(eye), torch.linalg.cholesky(eye)
    before, _ = read_resident()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
        before_gpu = torch.cuda.memory_allocated(device)
    reset_peak()
    t = time.perf_counter()
    report = compress(model, names, ranks, batches=batches, loss_fn=lm_loss, method=method)
    if cuda:
        torch.cuda.synchronize()
    compress_s = time.perf_counter() - t
    after, peak = read_resident()

    kept = sum(r.params_after for r in report.layers) / sum(r.params_before for r in report.layers)
    out = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
                    "torch": torch.__version__, "device": str(device)
                    + (f" ({torch.cuda.get_device_name(device)})" if cuda else "")},
        "model": {"hidden": a.hidden, "intermediate": a.intermediate, "layers": a.layers, "heads": a.heads,
                  "kv_heads": a.kv_heads, "vocab": a.vocab, "dtype": a.dtype, "params": dense_params,
                  "bytes": model_bytes, "build_s": round(build_s, 2)},
        "calibration": {"samples": a.samples, "seq_len": a.seq_len, "batch_size": a.batch_size,
                        "tokens": a.samples * a.seq_len, "activations_bytes": activations},
        "compression": {"path": a.path, "method": "whiten", "targets": len(names), "remove": a.remove,
                        "target_params_kept": round(kept, 4), "seconds": round(compress_s, 1),
                        "block_statistics_bytes": block_stats, "distinct_inputs_per_block": len(groups),
                        "estimate_bytes": report.memory_estimate},
    }
    if cuda:
        peak_gpu = torch.cuda.max_memory_allocated(device)
        extra = peak_gpu - before_gpu
        out["memory"] = {"kind": "cuda allocated", "model_bytes": model_bytes, "before_bytes": before_gpu,
                         "peak_bytes": peak_gpu, "extra_bytes": extra, "peak_over_model": round(peak_gpu / model_bytes, 3)}
        total = peak_gpu
    else:
        extra = peak - before
        total = peak - baseline
        out["memory"] = {"kind": "resident set", "baseline_bytes": baseline, "before_bytes": before, "peak_bytes": peak,
                         "after_bytes": after, "extra_bytes": extra, "peak_minus_baseline_bytes": total,
                         "peak_minus_baseline_over_model": round(total / model_bytes, 3)}
    limit = 1.5 * model_bytes + block_stats
    out["target"] = {"limit_bytes": int(limit), "met": total <= limit,
                     "rule": "peak − baseline ≤ 1.5 × model + one block's statistics"}

    print(f"model: {out['model']['params'] / 1e6:.0f}M params, {model_bytes / GIB:.2f} GiB ({a.dtype}); "
          f"{len(names)} targets, one block's statistics {block_stats / GIB:.3f} GiB ({len(groups)} distinct inputs), "
          f"activations {activations / GIB:.3f} GiB")
    print(f"{a.path} whiten, remove {a.remove:.0%} per layer: {compress_s:.1f} s; extra peak {extra / GIB:.2f} GiB "
          f"(estimate {(report.memory_estimate or 0) / GIB:.2f} GiB); peak − baseline {total / GIB:.2f} GiB = "
          f"{total / model_bytes:.2f} × model; limit {limit / GIB:.2f} GiB: {'met' if out['target']['met'] else 'NOT met'}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"saved {a.out}")


if __name__ == "__main__":
    main()

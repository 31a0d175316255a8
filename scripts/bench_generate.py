"""Inference speed of a compressed causal LM against its dense model: prefill and decode with ``generate``.

    python scripts/bench_generate.py --data-root /path/to/data            # SmolLM2 from its GGUF file
    python scripts/bench_generate.py --data-root /path/to/data --device cuda --dtype bfloat16

For the dense model and uniform plain-SVD compression at each ``--ratios`` (the fraction of the target
weights removed; the rank, not the method, sets the speed), for each batch size: a prompt of
``--prompt`` tokens from the WikiText-2 test split, greedy ``generate`` of ``--new`` tokens (forced:
no early stop). Prefill tokens/s is batch·prompt over the time of a 1-token generate; decode tokens/s
is batch·(new − 1) over the rest. Each configuration runs in its own process, so its peak memory
(the resident set on CPU, CUDA's max allocated on a GPU) is its own.

The ideal speed-up of memory-bound decoding is the dense model's weight bytes over the compressed
model's (every weight is read once per token); the script prints the measured speed-up beside it and
their quotient (the issue's target: ≥ 0.8 at 0.4 removed). Prints a table and writes the figures to ``--out`` (JSON).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path

GGUF = ("smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def load(args):
    from nnsvd.models import causal_lm, gguf

    root = Path(args.data_root)
    model, tokenizer = causal_lm.load_gguf(gguf.GGUFSource(str(root / GGUF[0]), GGUF[1]), args.dtype,
                                           Path(args.cache_dir))
    return model, tokenizer


def prompt_ids(args, tokenizer, batch: int):
    import torch

    text = (Path(args.data_root) / "wikitext-2-raw" / "wiki.test.raw").read_text()
    ids = tokenizer(text[:200_000]).input_ids
    rows = [ids[i * args.prompt:(i + 1) * args.prompt] for i in range(batch)]
    return torch.tensor(rows)


def measure(args, ratio: float | None, batch: int, queue, keep_dense: bool = False) -> None:
    """One configuration in its own process: put its figures on ``queue``."""
    import torch

    from nnsvd.lowrank import compress_model
    from nnsvd.lowrank.allocation import target_shapes, uniform_ranks
    from nnsvd.lowrank.inference import keep_dense_where_slower
    from nnsvd.models.causal_lm import default_targets

    torch.set_num_threads(args.threads)
    model, tokenizer = load(args)
    if ratio is not None:
        targets = default_targets(model)
        shapes = target_shapes(model, targets)
        compress_model(model, list(shapes), uniform_ranks(shapes, ratio), method="svd")
    device = torch.device(args.device)
    model = model.to(device).eval()
    kept = keep_dense_where_slower(model, tokens=batch) if keep_dense else {}
    ids = prompt_ids(args, tokenizer, batch).to(device)
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())

    def run(new: int) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, min_new_tokens=new,
                                 do_sample=False, pad_token_id=tokenizer.eos_token_id)
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert out.shape[1] == ids.shape[1] + new
        return time.perf_counter() - t

    run(2)  # warm-up: first-call allocations and kernel selection
    prefill = min(run(1) for _ in range(args.repeats))
    total = min(run(args.new) for _ in range(args.repeats))
    decode = max(total - prefill, 1e-9)
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    queue.put({
        "ratio": ratio, "batch": batch, "keep_dense": keep_dense, "kept_dense": kept,
        "weight_bytes": weight_bytes, "peak_bytes": peak,
        "prefill_tok_s": batch * args.prompt / prefill, "decode_tok_s": batch * (args.new - 1) / decode,
        "prefill_s": prefill, "generate_s": total,
    })


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-root", default=os.environ.get("NNSVD_DATA_ROOT", "data"))
    parser.add_argument("--cache-dir", default=os.environ.get("NNSVD_CACHE_DIR", "outputs/cache"))
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2, help="best of N timings")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--keep-dense", action="store_true",
                        help="also measure each ratio with the layers whose factors are not faster at this batch "
                             "put back dense (nnsvd.lowrank.inference.keep_dense_where_slower)")
    parser.add_argument("--out", type=Path, default=Path("outputs/bench_generate.json"))
    args = parser.parse_args(argv)
    if not (Path(args.data_root) / GGUF[0] / GGUF[1]).is_file():
        print(f"bench_generate: {Path(args.data_root) / GGUF[0] / GGUF[1]} not found: pass --data-root", file=sys.stderr)
        return 2
    ctx = mp.get_context("spawn")
    rows = []
    configurations = [(None, False)] + [(r, False) for r in args.ratios]
    configurations += [(r, True) for r in args.ratios] if args.keep_dense else []
    for ratio, keep_dense in configurations:
        for batch in args.batches:
            queue = ctx.Queue()
            proc = ctx.Process(target=measure, args=(args, ratio, batch, queue, keep_dense))
            proc.start()
            row = queue.get()
            proc.join()
            rows.append(row)
            print(f"  measured ratio={ratio} batch={batch}{' keep-dense' if keep_dense else ''}: decode "
                  f"{row['decode_tok_s']:.1f} tok/s, {len(row['kept_dense'])} layers kept dense", flush=True)
    dense = {r["batch"]: r for r in rows if r["ratio"] is None}
    print(f"\n{'removed':>8} {'batch':>5} {'weights MB':>10} {'peak MB':>8} {'prefill tok/s':>13} "
          f"{'decode tok/s':>12} {'decode ×':>8} {'ideal ×':>7} {'of ideal':>8}")
    for r in rows:
        d = dense[r["batch"]]
        r["decode_speedup"] = r["decode_tok_s"] / d["decode_tok_s"]
        r["prefill_speedup"] = r["prefill_tok_s"] / d["prefill_tok_s"]
        r["ideal_speedup"] = d["weight_bytes"] / r["weight_bytes"]
        r["of_ideal"] = r["decode_speedup"] / r["ideal_speedup"] if r["ratio"] is not None else None
        removed = "dense" if r["ratio"] is None else f"{r['ratio']:.0%}" + ("*" if r["keep_dense"] else "")
        of_ideal = "" if r["of_ideal"] is None else f"{r['of_ideal']:.2f}"
        print(f"{removed:>8} {r['batch']:>5} {r['weight_bytes'] / 1e6:>10.1f} {r['peak_bytes'] / 1e6:>8.0f} "
              f"{r['prefill_tok_s']:>13.1f} {r['decode_tok_s']:>12.2f} {r['decode_speedup']:>8.2f} "
              f"{r['ideal_speedup']:>7.2f} {of_ideal:>8}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    import torch

    args.out.write_text(json.dumps({
        "machine": {"platform": platform.platform(), "threads": args.threads, "device": args.device,
                    "dtype": args.dtype, "torch": torch.__version__},
        "settings": {"prompt": args.prompt, "new": args.new, "repeats": args.repeats, "method": "svd, uniform ranks"},
        "rows": rows,
    }, indent=2) + "\n")
    if args.keep_dense:
        print("* the layers whose factors were not faster at that batch kept dense (their count: kept_dense in the JSON)")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark nnsvd's GPT-2 building blocks on a GPT-2-small-shaped model (random init, no download).

(a) compress_model on the 48 Conv1D targets at rank 128 and 256: wall time (first call and
    median of repeats on fresh deep copies), peak extra resident memory, and every layer's
    Frobenius error against the exact truncated-SVD optimum √(Σ_{i>r} σ_i²)/‖W‖_F;
    method="svd" and method="randomized" at rank 128 for comparison.
(b) forward latency, dense versus compressed, on one 1×1024 sequence, at the per-layer ranks
    that remove half of the target parameters: measured speed-up beside the ideal MAC ratio.
(c) perplexity-evaluation throughput (evaluate_perplexity) of the dense model.
(d) data-aware compression: the calibration pass over N×1024 tokens (statistics of all 48
    targets) against plain forward passes over the same tokens; whiten compression of the 48
    targets at rank 128 against plain (auto) compression; the statistics' size and the peak
    memory of calibration + whitening (resident memory on the CPU, allocated memory on CUDA).

Usage: python scripts/bench_gpt2.py [--out outputs/bench_gpt2.json] [--sections a,b,c,d] [--device cuda]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from nnsvd.lowrank import (
    collect_statistics,
    compress_model,
    find_targets,
    linear_weight,
    resolve_factorizer,
    stats_nbytes,
)
from nnsvd.lowrank.allocation import matrix_type, target_shapes, uniform_ranks
from nnsvd.lowrank.counting import count_macs
from nnsvd.models.gpt2 import GPT2_TARGETS
from nnsvd.training.perplexity import evaluate_perplexity, lm_loss

ERROR_TOLERANCE = 1.01  # a layer's error may exceed the Eckart–Young optimum by at most 1%


def build_model() -> GPT2LMHeadModel:
    """GPT-2 small (GPT2Config() defaults, 124M parameters), randomly initialized with seed 0."""
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config()).eval()


# ------------------------------------------------------------------------ (a) compression


def singular_values(model: GPT2LMHeadModel) -> dict[str, torch.Tensor]:
    """σ(W) in float64 of every target layer."""
    return {
        name: torch.linalg.svdvals(linear_weight(model.get_submodule(name))[0].detach().double())
        for name in find_targets(model, GPT2_TARGETS)
    }


def optimal_rel_error(sigma: torch.Tensor, rank: int) -> float:
    """√(Σ_{i>r} σ_i²) / ‖W‖_F: the smallest relative Frobenius error of any rank-r matrix."""
    return float(sigma[rank:].square().sum().sqrt() / sigma.square().sum().sqrt())


def time_compression(model: GPT2LMHeadModel, rank: int, method: str, repeats: int, first: bool) -> dict:
    """Wall and CPU time of compress_model on fresh deep copies; errors checked on the last run.

    CPU time (all threads of this process) barely moves when other processes compete for
    the cores, so it is the check on a wall time that looks inflated.
    """
    times, cpu_times, report = [], [], None
    for _ in range(repeats + int(first)):
        work = copy.deepcopy(model)
        start, cpu_start = time.perf_counter(), time.process_time()
        report = compress_model(work, GPT2_TARGETS, rank=rank, method=method)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        del work
    result = {
        "rank": rank,
        "method": method,
        "layers": len(report.layers),
        "times_s": times,
        "cpu_s": cpu_times,
    }
    if first:
        result["first_s"] = times[0]
        times, cpu_times = times[1:], cpu_times[1:]
    result["median_s"] = statistics.median(times)
    result["min_s"] = min(times)
    result["median_cpu_s"] = statistics.median(cpu_times)
    result["report"] = report
    return result


def check_errors(report, sigmas: dict[str, torch.Tensor]) -> dict:
    """Largest ratio rel_fro_error / optimum over the layers, and whether all are within tolerance."""
    ratios = {
        layer.name: layer.rel_fro_error / optimal_rel_error(sigmas[layer.name], layer.rank)
        for layer in report.layers
    }
    worst = max(ratios, key=ratios.get)
    return {
        "max_error_ratio": ratios[worst],
        "worst_layer": worst,
        "all_within_1pct": all(r <= ERROR_TOLERANCE for r in ratios.values()),
    }


def _read_status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def measure_compression_memory(rank: int, method: str) -> dict:
    """Run in a fresh process: peak resident memory added by compress_model over the built model.

    Writing "5" to /proc/self/clear_refs resets VmHWM (the peak RSS) to the current RSS, so
    VmHWM after compression minus VmRSS before it is the peak extra memory compression used
    (factors, float64 work copies, LAPACK workspace) while the dense layers are still alive.
    """
    model = build_model()
    Path("/proc/self/clear_refs").write_text("5")
    before = _read_status_kb("VmRSS")
    compress_model(model, GPT2_TARGETS, rank=rank, method=method)
    peak = _read_status_kb("VmHWM")
    return {"rss_before_mb": before / 1024, "peak_mb": peak / 1024, "extra_peak_mb": (peak - before) / 1024}


def measure_compression_memory_in_child(rank: int, method: str) -> dict:
    """measure_compression_memory in a fresh process: this one's peak already holds earlier work."""
    out = subprocess.run(
        [sys.executable, __file__, "--child-memory", str(rank), method],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---------------------------------------------------------------------- (b) forward latency


@torch.inference_mode()
def time_forward_passes(
    models: list[GPT2LMHeadModel], input_ids: torch.Tensor, runs: int, warmup: int
) -> list[float]:
    """Median forward time of each model; runs alternate between the models so that load
    from other processes falls on all of them alike."""
    for model in models:
        for _ in range(warmup):
            model(input_ids=input_ids)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(runs):
        for model, model_times in zip(models, times):
            _sync(model.device)
            start = time.perf_counter()
            model(input_ids=input_ids)
            _sync(model.device)
            model_times.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def attention_score_macs(config: GPT2Config, seq_len: int) -> int:
    """MACs per token of Q·Kᵀ and softmax·V if the full seq_len×seq_len scores are computed: 2·T·d per layer."""
    return config.n_layer * 2 * seq_len * config.n_embd


# ----------------------------------------------------------------------------------- main


def bench_compression(model: GPT2LMHeadModel, repeats: int, compare_repeats: int) -> list[dict]:
    print("(a) compress_model on the 48 Conv1D targets")
    print(
        f"{'rank':>5} {'method':>11} {'first s':>8} {'median s':>9} {'min s':>6} {'CPU s':>6} "
        f"{'peak +MB':>9} {'worst err/opt':>14} {'≤1%':>4}"
    )
    sigmas = singular_values(model)
    rows = []
    for rank, method, runs, first in [
        (128, "auto", repeats, True),
        (256, "auto", repeats, True),
        (128, "svd", compare_repeats, False),
        (128, "randomized", compare_repeats, False),
    ]:
        row = time_compression(model, rank, method, runs, first)
        row.update(check_errors(row.pop("report"), sigmas))
        if method == "auto":
            row["memory"] = measure_compression_memory_in_child(rank, method)
        rows.append(row)
        first_s = f"{row['first_s']:.2f}" if "first_s" in row else "-"
        mem = f"{row['memory']['extra_peak_mb']:.0f}" if "memory" in row else "-"
        print(
            f"{rank:>5} {method:>11} {first_s:>8} {row['median_s']:>9.2f} {row['min_s']:>6.2f} "
            f"{row['median_cpu_s']:>6.2f} {mem:>9} {row['max_error_ratio']:>14.5f} "
            f"{'yes' if row['all_within_1pct'] else 'NO':>4}"
        )
    print("  first s: first call in this process; median / min: the repeats after it (svd and")
    print("  randomized: all their runs); CPU s: median process CPU time over the same runs")
    print("  peak +MB: VmHWM − VmRSS around compress_model in a fresh process (dense model ≈ 500 MB)")
    print(
        "  worst err/opt: max over layers of rel_fro_error / (√(Σ_{i>r} σ_i²)/‖W‖_F), σ by float64 svdvals\n"
    )
    return rows


def bench_forward(model: GPT2LMHeadModel, runs: int) -> dict:
    ranks = uniform_ranks(target_shapes(model, GPT2_TARGETS), 0.5)
    compressed = copy.deepcopy(model)
    report = compress_model(compressed, GPT2_TARGETS, rank=ranks)
    ranks = {matrix_type(name): r for name, r in ranks.items()}  # every block has the same shapes: one rank per pattern
    input_ids = torch.randint(
        0, model.config.vocab_size, (1, 1024), generator=torch.Generator().manual_seed(0)
    ).to(model.device)
    dense_s, comp_s = time_forward_passes([model, compressed], input_ids, runs, warmup=2)
    measured = dense_s / comp_s
    ideal = count_macs(model) / count_macs(compressed)
    attn = attention_score_macs(model.config, input_ids.shape[1])
    ideal_with_attention = (count_macs(model) + attn) / (count_macs(compressed) + attn)
    print(f"(b) forward latency, 1×1024 tokens, median of {runs} (dense and compressed runs alternate)")
    print(f"  ranks {ranks}")
    print(f"  target params kept {report.params_after / report.params_before:.3f}")
    print(f"  dense {dense_s * 1e3:.0f} ms, compressed {comp_s * 1e3:.0f} ms")
    print(
        f"  speed-up measured {measured:.3f}× vs ideal (count_macs) {ideal:.3f}× → {measured / ideal:.2f} of ideal"
    )
    print(
        f"  counting the attention scores too (2·T·d MACs per token per layer) the ideal is "
        f"{ideal_with_attention:.3f}× → {measured / ideal_with_attention:.2f} of it\n"
    )
    return {
        "ranks": ranks,
        "target_params_ratio": report.params_after / report.params_before,
        "dense_s": dense_s,
        "compressed_s": comp_s,
        "measured_speedup": measured,
        "ideal_mac_speedup": ideal,
        "measured_over_ideal": measured / ideal,
        "ideal_with_attention_scores": ideal_with_attention,
        "measured_over_ideal_with_attention": measured / ideal_with_attention,
        "runs": runs,
    }


def bench_perplexity(model: GPT2LMHeadModel) -> dict:
    ids = torch.randint(0, model.config.vocab_size, (8192,), generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    result = evaluate_perplexity(model, ids, max_length=1024, stride=1024, batch_size=2)
    seconds = time.perf_counter() - start
    print("(c) evaluate_perplexity, dense, 8192 random tokens, max_length = stride = 1024, batch 2")
    print(
        f"  {seconds:.1f} s → {ids.numel() / seconds:.0f} tokens/s (ppl of the random model {result['ppl']:.0f})"
    )
    return {
        "tokens_in": ids.numel(),
        "tokens_scored": result["tokens"],
        "seconds": seconds,
        "tokens_per_s": ids.numel() / seconds,
        "ppl_random_model": result["ppl"],
        "max_length": 1024,
        "stride": 1024,
        "batch_size": 2,
    }


def calibration_batches(model: GPT2LMHeadModel, sequences: int, batch_size: int) -> list[torch.Tensor]:
    ids = torch.randint(0, model.config.vocab_size, (sequences, 1024), generator=torch.Generator().manual_seed(2))
    return list(ids.to(model.device).split(batch_size))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_calibration_memory(sequences: int, batch_size: int, device: str) -> dict:
    """Run in a fresh process: peak memory of calibration + whiten compression over the built model."""
    dev = torch.device(device)
    model = build_model().to(dev)
    batches = calibration_batches(model, sequences, batch_size)
    names = find_targets(model, GPT2_TARGETS)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")
        before = _read_status_kb("VmRSS") * 1024
    stats = collect_statistics(model, names, batches, lm_loss)
    compress_model(model, GPT2_TARGETS, rank=128, method=resolve_factorizer("whiten"), calibration=stats)
    peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else _read_status_kb("VmHWM") * 1024
    return {"before_mb": before / 2**20, "peak_mb": peak / 2**20, "extra_peak_mb": (peak - before) / 2**20,
            "measure": "cuda max_memory_allocated" if dev.type == "cuda" else "VmHWM − VmRSS"}


def bench_data_aware(model: GPT2LMHeadModel, sequences: int, batch_size: int, repeats: int) -> dict:
    device = model.device
    batches = calibration_batches(model, sequences, batch_size)
    names = find_targets(model, GPT2_TARGETS)
    tokens = sequences * 1024
    nbytes = stats_nbytes(model, names)
    print(f"(d) data-aware compression: calibration on {sequences}×1024 random tokens (batch {batch_size}), {device}")
    print(f"  statistics of the 48 targets (float64 Gram + mean |x|): {nbytes / 2**20:.0f} MB")

    def forward_pass() -> None:
        with torch.no_grad():
            for batch in batches:
                lm_loss(model, batch)

    forward_pass()  # warm-up
    forward_s, calib_s, stats = [], [], None
    for _ in range(repeats):  # alternate, so that load from other processes falls on both alike
        _sync(device)
        start = time.perf_counter()
        forward_pass()
        _sync(device)
        forward_s.append(time.perf_counter() - start)
        del stats
        start = time.perf_counter()
        stats = collect_statistics(model, names, batches, lm_loss)
        _sync(device)
        calib_s.append(time.perf_counter() - start)
    fwd, cal = statistics.median(forward_s), statistics.median(calib_s)
    print(f"  forward passes {fwd:.2f} s, calibration {cal:.2f} s (medians of {repeats}) → {cal / fwd:.2f}× (target ≤ 2.5×)")

    plain_s, whiten_s = [], []
    whiten = resolve_factorizer("whiten")
    for _ in range(repeats):
        for method, times, calibration in (("auto", plain_s, None), (whiten, whiten_s, stats)):
            work = copy.deepcopy(model)
            _sync(device)
            start = time.perf_counter()
            report = compress_model(work, GPT2_TARGETS, rank=128, method=method, calibration=calibration)
            _sync(device)
            times.append(time.perf_counter() - start)
            del work
    plain, white = statistics.median(plain_s), statistics.median(whiten_s)
    worst = max(layer.rel_data_error for layer in report.layers)
    print(f"  compression of 48 targets at rank 128: plain (auto) {plain:.2f} s, whiten {white:.2f} s "
          f"→ {white / plain:.2f}× (target ≤ 2×); worst relative data error {worst:.3f}")
    memory = json.loads(subprocess.run(
        [sys.executable, __file__, "--child-calibration", str(sequences), str(batch_size), str(device)],
        check=True, capture_output=True, text=True,
    ).stdout.strip().splitlines()[-1])
    print(f"  peak extra memory of calibration + whitening ({memory['measure']}): {memory['extra_peak_mb']:.0f} MB "
          f"over the model's {memory['before_mb']:.0f} MB\n")
    return {
        "device": str(device),
        "sequences": sequences,
        "tokens": tokens,
        "batch_size": batch_size,
        "statistics_mb": nbytes / 2**20,
        "forward_s": forward_s,
        "calibration_s": calib_s,
        "calibration_over_forward": cal / fwd,
        "plain_compress_s": plain_s,
        "whiten_compress_s": whiten_s,
        "whiten_over_plain": white / plain,
        "worst_rel_data_error": worst,
        "memory": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="outputs/bench_gpt2.json", help="where to write the JSON results")
    parser.add_argument("--repeats", type=int, default=3, help="method=auto repeats after the first call")
    parser.add_argument("--compare-repeats", type=int, default=2, help="runs of method=svd / randomized")
    parser.add_argument("--runs", type=int, default=10, help="timed forward passes per model")
    parser.add_argument("--sections", default="a,b,c,d", help="which of the sections a, b, c, d to run")
    parser.add_argument("--device", default="cpu", help="device of sections b, c and d (e.g. cuda)")
    parser.add_argument("--calib-seqs", type=int, default=8, help="(d) calibration sequences of 1024 tokens")
    parser.add_argument("--calib-batch", type=int, default=2, help="(d) calibration batch size")
    parser.add_argument("--child-memory", nargs=2, metavar=("RANK", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--child-calibration", nargs=3, metavar=("SEQS", "BATCH", "DEVICE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_memory:
        print(json.dumps(measure_compression_memory(int(args.child_memory[0]), args.child_memory[1])))
        return
    if args.child_calibration:
        seqs, batch, device = args.child_calibration
        print(json.dumps(measure_calibration_memory(int(seqs), int(batch), device)))
        return
    sections = set(args.sections.split(","))

    wall = time.perf_counter()
    env = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "device": args.device,
        "gpu": torch.cuda.get_device_name() if torch.device(args.device).type == "cuda" else None,
        "loadavg_start": os.getloadavg(),
    }
    print(f"GPT-2 small, random init (seed 0); torch {env['torch']}, {env['threads']} CPU threads, {args.device}\n")
    model = build_model()
    results = {"env": env}
    if "a" in sections:
        results["compression"] = bench_compression(model, args.repeats, args.compare_repeats)
    model = model.to(args.device)
    if "b" in sections:
        results["forward"] = bench_forward(model, args.runs)
    if "c" in sections:
        results["perplexity"] = bench_perplexity(model)
    if "d" in sections:
        results["data_aware"] = bench_data_aware(model, args.calib_seqs, args.calib_batch, args.repeats)
    env["loadavg_end"] = os.getloadavg()
    results["total_s"] = time.perf_counter() - wall
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(
        f"\ntotal {results['total_s']:.0f} s; 1-min load average {env['loadavg_start'][0]:.2f} at start, "
        f"{env['loadavg_end'][0]:.2f} at end (2 cores); results written to {out}"
    )


if __name__ == "__main__":
    main()

"""What model=smollm2's sensitivity shortcut costs: its measurement against the full one, on a few layers.

``compress.allocation=sensitivity`` measures the loss increase of every target compressed alone, at
each of ``compress.sensitivity_ratios``. On SmolLM2 that is 210 layers × 4 ratios, so the preset
measures on the first ``compress.sensitivity_seq_len`` tokens of ``compress.sensitivity_samples``
calibration sequences instead of on all of them. This script measures --layers both ways, with the
suite's own task, calibration batches, whitening statistics and ``measure_sensitivity``, and prints
both loss increases per (layer, rank), their rank correlation over all pairs, and the seconds each took.
It saves the figures as JSON (--out).

Usage: NNSVD_DATA_ROOT=/path/to/data python scripts/sensitivity_shortcut.py [--full-samples 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from nnsvd.lowrank import collect_statistics, decoder_blocks
from nnsvd.lowrank.allocation import target_shapes
from nnsvd.lowrank.sensitivity import measure_sensitivity
from nnsvd.run.compression import factorizer, measurement_batches
from nnsvd.run.overrides import register_configs
from nnsvd.run.pipeline import local_paths, make_task

REPO = Path(__file__).resolve().parents[1]
LAYERS = "model.layers.0.self_attn.k_proj,model.layers.14.mlp.down_proj,model.layers.29.self_attn.o_proj"


def ranks_of(values: list[float]) -> list[float]:
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    for position, index in enumerate(order):
        ranks[index] = float(position)
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (no ties expected among measured loss increases)."""
    ra, rb = torch.tensor(ranks_of(a)), torch.tensor(ranks_of(b))
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", default=LAYERS, help="comma-separated target names")
    parser.add_argument("--full-samples", type=int, default=None,
                        help="calibration sequences of the full measurement (default: all of calibration.samples)")
    parser.add_argument("--out", default=str(REPO / "scripts" / "assets" / "sensitivity_shortcut_cpu.json"))
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. cache.dir=/tmp/cache")
    args = parser.parse_args()

    register_configs()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=["model=smollm2", "compress.method=whiten", *args.overrides])
    config = local_paths(OmegaConf.to_object(cfg), Path.cwd())
    torch.set_grad_enabled(False)
    task = make_task(config, torch.device("cpu"), Path.cwd())
    model = task.build()
    task.prepare()
    batches = task.calibration_batches(config.calibration, model)
    layers = args.layers.split(",")
    shapes = target_shapes(model, layers)
    stats = collect_statistics(model, layers, batches, task.calibration_loss)
    comp = config.compress
    settings = {
        "shortcut": measurement_batches(batches, comp.sensitivity_samples, comp.sensitivity_seq_len),
        "full": measurement_batches(batches, args.full_samples, None),
    }
    results = {}
    for label, cut in settings.items():
        start = time.perf_counter()
        measured = measure_sensitivity(model, shapes, cut, task.calibration_loss, method=factorizer(comp),
                                       calibration=stats, ratios=comp.sensitivity_ratios,
                                       blocks=decoder_blocks(model))
        results[label] = {"tokens": sum(b.numel() for b in cut), "seconds": time.perf_counter() - start,
                          "measured": measured}
    pairs = [(name, rank) for name in layers for rank in sorted(results["full"]["measured"][name])]
    short = [results["shortcut"]["measured"][n][r] for n, r in pairs]
    full = [results["full"]["measured"][n][r] for n, r in pairs]
    print(f"{'layer':<36} {'rank':>5} {'shortcut Δloss':>15} {'full Δloss':>11}")
    for (name, rank), s, f in zip(pairs, short, full, strict=True):
        print(f"{name:<36} {rank:>5} {s:>15.4f} {f:>11.4f}")
    rho = spearman(short, full)
    for label, r in results.items():
        print(f"{label}: {r['tokens']} tokens, {r['seconds']:.1f} s for {len(layers)} layers "
              f"({r['seconds'] / len(layers):.1f} s a layer)")
    print(f"Spearman rank correlation over the {len(pairs)} (layer, rank) pairs: {rho:.3f}")
    Path(args.out).write_text(json.dumps({"layers": layers, "spearman": rho, **results}, indent=1) + "\n")
    print(f"saved {args.out}")


if __name__ == "__main__":
    main()

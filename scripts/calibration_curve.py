"""The calibration curve: perplexity and compress time against the amount of calibration data.

Run the sweep, then plot it (SmolLM2, whitening, 8–128 sequences of 1024 tokens, 20% and 40% removed):

    NNSVD_DATA_ROOT=... python run.py -m model=smollm2 compress.method=whiten compress.ratio=0.2,0.4 \\
        calibration.samples=8,16,32,64,128 hydra.sweep.dir=outputs/multirun/calibration_curve
    python scripts/calibration_curve.py outputs/multirun/calibration_curve --out scripts/assets/calibration_curve
    (several sweep directories are merged into one curve; --with OLD.json adds the points of an earlier
    curve, for example a longer setting measured later: a (ratio, sequences) point measured again is replaced)

Reads every job's results.json (jobs that did not finish ok are listed and left out), prints a
Markdown table, and writes OUT.json (the figures) and OUT.png (two panels: test perplexity and
compress-stage seconds against calibration sequences, one line per ratio, the dense model dashed).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path


def collect(sweep: Path) -> tuple[list[dict], list[str], float | None]:
    """(ok points, job directories that did not finish ok, the dense perplexity)."""
    points, failed, dense = [], [], None
    for path in sorted(sweep.glob("*/results.json")):
        r = json.loads(path.read_text())
        if r.get("status") != "ok" or not r.get("compress") or not r["compress"].get("calibration"):
            failed.append(path.parent.name)
            continue
        cal, m = r["compress"]["calibration"], r["metrics"]
        dense = m.get("dense_test_ppl", dense)
        points.append({
            "job": path.parent.name,
            "ratio": r["compress"]["budget"]["ratio"],
            "samples": cal["samples"],
            "tokens": cal["tokens"],
            "test_ppl": m["compressed_test_ppl"],
            "compress_s": r["timing"]["compress_s"],
            "total_s": r["timing"]["total_s"],
            "statistics_cached": cal.get("statistics_cached", False),
        })
    points.sort(key=lambda p: (p["ratio"], p["samples"]))
    return points, failed, dense


def table(points: list[dict], dense: float | None) -> str:
    lines = [f"dense test ppl: {dense:.2f}" if dense else "dense test ppl: not recorded", "",
             "| removed | sequences | tokens | test ppl | × dense | compress s | job s |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for p in points:
        ratio = f"{p['test_ppl'] / dense:.2f}×" if dense else ""
        cached = " (cached statistics)" if p["statistics_cached"] else ""
        lines.append(f"| {p['ratio']:.0%} | {p['samples']} | {p['tokens']:,} | {p['test_ppl']:.2f} | {ratio} | "
                     f"{p['compress_s']:.0f}{cached} | {p['total_s']:.0f} |")
    return "\n".join(lines)


def plot(path: Path, points: list[dict], dense: float | None) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.5), dpi=120, layout="constrained")
    ppl_ax, time_ax = fig.subplots(1, 2)
    by_ratio: dict[float, list[dict]] = defaultdict(list)
    for p in points:
        by_ratio[p["ratio"]].append(p)
    for ratio, pts in sorted(by_ratio.items()):
        xs = [p["samples"] for p in pts]
        ppl_ax.plot(xs, [p["test_ppl"] for p in pts], marker="o", label=f"{ratio:.0%} removed")
        time_ax.plot(xs, [p["compress_s"] for p in pts], marker="o", label=f"{ratio:.0%} removed")
    if dense:
        ppl_ax.axhline(dense, color="grey", linestyle="--", label=f"dense {dense:.2f}")
    for ax in (ppl_ax, time_ax):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("calibration sequences (× calibration.seq_len tokens)")
        ax.grid(True, alpha=0.3)
        ax.legend()
    ppl_ax.set_yscale("log")
    ppl_ax.set_ylabel("WikiText-2 test perplexity")
    time_ax.set_ylabel("compress stage, s (cached statistics are read, not measured)")
    fig.suptitle("Whitening (SVD-LLM): perplexity and time against the calibration data")
    fig.savefig(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path, nargs="+", help="the multirun's hydra.sweep.dir (several: merged)")
    parser.add_argument("--out", type=Path, default=None, help="OUT.json and OUT.png (default: SWEEP_DIR/calibration_curve)")
    parser.add_argument("--with", dest="earlier", type=Path, default=None,
                        help="an earlier curve's OUT.json whose points join these (the sweeps' own win where both have one)")
    args = parser.parse_args(argv)
    points, failed, dense = [], [], None
    if args.earlier is not None:
        if not args.earlier.is_file():
            print(f"calibration_curve: --with {args.earlier} does not exist", file=sys.stderr)
            return 2
        earlier = json.loads(args.earlier.read_text())
        points, dense = earlier["points"], earlier.get("dense_test_ppl")
    for sweep in args.sweep_dir:
        if not sweep.is_dir():
            print(f"calibration_curve: sweep directory {sweep} does not exist", file=sys.stderr)
            return 2
        p, f, d = collect(sweep)
        points, failed, dense = points + p, failed + f, d if d is not None else dense
    merged = {(p["ratio"], p["samples"]): p for p in points}  # later ones (the sweeps') replace earlier ones
    points = sorted(merged.values(), key=lambda p: (p["ratio"], p["samples"]))
    if not points:
        print(f"calibration_curve: no finished compress job with calibration under {args.sweep_dir[0]}", file=sys.stderr)
        return 2
    out = args.out or args.sweep_dir[0] / "calibration_curve"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"dense_test_ppl": dense, "points": points, "not_ok": failed},
                                                   indent=2) + "\n")
    plot(out.with_suffix(".png"), points, dense)
    print(table(points, dense))
    if failed:
        print(f"\nnot ok, left out: {', '.join(failed)}")
    print(f"\nwrote {out.with_suffix('.json')} and {out.with_suffix('.png')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

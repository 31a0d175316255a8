"""Train a GPT-2 through run.py and, at every validation, also measure what plain SVD of its blocks costs.

run.py runs unchanged (its dense cache, run directory and results are the usual ones); this script only
adds a step callback to the training loop (``nnsvd.training.on_step``). At each validation during training
it adds the validation perplexity of the model with every block target truncated by plain SVD to the
uniform rank of each --ratios value (the truncation of scripts/ablate_blocks.py), measured by the loop's
own validation. One JSON line per validation goes to --out, and a table is printed at the end. When
nothing was probed (the dense model came from the cache: add cache.dense=false) it exits 1 with a line
saying so; otherwise with run.py's status.

This is how the byte-level testbed's recipe was chosen (docs/results.md, "GPT-2: the byte-level testbed"):
how much plain SVD costs depends on how long and how the model was trained.

Usage (everything after the script's own options is passed to run.py):

    NNSVD_DATA_ROOT=/path/to/data python scripts/probe_training.py --out outputs/probe.jsonl model=gpt2_bytes
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

# run.py, the suite's entrypoint, and the nnsvd beside it: this checkout's, as for `python run.py`
sys.path.insert(1, str(Path(__file__).resolve().parent.parent))

from ablate_blocks import truncated  # noqa: E402

import run  # noqa: E402
from nnsvd.training import StepRecord, on_step  # noqa: E402


def probe(ratios: list[float], out: Path, rows: list[dict]) -> Callable[[StepRecord], None]:
    """A step callback: at each validation, the truncated models' validation perplexity beside the model's."""

    def measure(record: StepRecord) -> None:
        if "val/ppl" not in record.metrics:
            return
        row = {"step": record.number, "dense": record.metrics["val/ppl"]}
        for ratio in ratios:
            row[f"svd_{ratio:g}"] = record.evaluate(truncated(record.model, ratio))["val/ppl"]
        rows.append(row)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")

    return measure


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=Path("outputs/probe_training.jsonl"))
    p.add_argument(
        "--ratios",
        type=lambda text: [float(x) for x in text.split(",")],
        default=[0.4, 0.6, 0.8],
        help="comma-separated fractions of the block weights removed (default: 0.4,0.6,0.8)",
    )
    args, overrides = p.parse_known_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    prog = Path(sys.argv[0]).name
    rows: list[dict] = []
    with on_step(probe(args.ratios, args.out, rows)):
        status = run.cli(overrides)
    if not rows:  # nothing was measured: that is no success, whatever run.py did
        print(
            f"{prog}: error: no training validation was probed (the dense model came from the "
            "cache, or the run stopped before its first validation); add cache.dense=false to train it again",
            file=sys.stderr,
        )
        sys.exit(status or 1)
    head = "| step | dense val ppl | " + " | ".join(f"plain SVD, {r:g} removed" for r in args.ratios) + " |"
    print(head + "\n|" + "---:|" * (2 + len(args.ratios)))
    for row in rows:
        cells = [
            f"{row[f'svd_{r:g}']:.3f} ({row[f'svd_{r:g}'] / row['dense'] - 1:+.1%})" for r in args.ratios
        ]
        print(f"| {row['step']} | {row['dense']:.3f} | " + " | ".join(cells) + " |")
    sys.exit(status)


if __name__ == "__main__":
    main()

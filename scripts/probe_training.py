"""Train a GPT-2 through run.py and, at every validation, also measure what plain SVD of its blocks costs.

run.py runs unchanged (its dense cache, run directory and results are the usual ones); this script only
wraps the language-model training loop's evaluation. At each validation during training it adds the
validation perplexity of the model with every block target truncated by plain SVD to the uniform
rank of each --ratios value (the truncation of scripts/ablate_blocks.py). One JSON line per
validation goes to --out, and a table is printed at the end. When nothing was probed (the dense model
came from the cache: add cache.dense=false) it exits 1 with a line saying so; otherwise with run.py's status.

This is how the byte-level testbed's recipe was chosen (docs/results.md, "GPT-2: the byte-level testbed"):
how much plain SVD costs depends on how long and how the model was trained.

Usage (everything after the script's own options is passed to run.py):

    NNSVD_DATA_ROOT=/path/to/data python scripts/probe_training.py --out outputs/probe.jsonl model=gpt2_bytes
"""

from __future__ import annotations

import argparse
import json
import runpy
import sys
from pathlib import Path

from ablate_blocks import truncated

import nnsvd.tasks.language_modeling as lm


def probed(train, ratios: list[float], out: Path, rows: list[dict]):
    """train_causal_lm, with its eval_fn extended by the truncated models' validation perplexity."""

    def train_causal_lm(model, train_blocks, **kw):
        eval_fn, every, steps = kw["eval_fn"], kw["eval_every"], kw["steps"]
        done = (kw.get("resume_state") or {}).get("step", 0)  # a resumed run goes on from its saved step
        seen = [done // every if every > 0 else 0]  # validations so far: every eval_every steps, and the last

        def eval_with_truncation(m):
            dense = eval_fn(m)
            seen[0] += 1
            row = {"step": min(seen[0] * every, steps) if every > 0 else steps, "dense": dense}
            for ratio in ratios:
                row[f"svd_{ratio:g}"] = eval_fn(truncated(m, ratio))
            rows.append(row)
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")
            return dense

        kw["eval_fn"] = eval_with_truncation
        return train(model, train_blocks, **kw)

    return train_causal_lm


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
    rows: list[dict] = []
    lm.train_causal_lm = probed(lm.train_causal_lm, args.ratios, args.out, rows)
    run_py = Path(__file__).resolve().parent.parent / "run.py"
    prog = Path(sys.argv[0]).name
    sys.argv = [str(run_py), *overrides]
    status = 0
    try:
        runpy.run_path(str(run_py), run_name="__main__")
    except SystemExit as stop:
        status = stop.code or 0
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

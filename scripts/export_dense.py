"""Export a compressed run directory as a stock, dense transformers folder, for tools that run no custom code.

    python scripts/export_dense.py outputs/runs/2026-12-02/RUN_DIR exported/

Each factorized layer's product A·B goes back into the base architecture's dense layer; the folder
opens with plain ``AutoModelForCausalLM.from_pretrained(OUT)`` (no nn-svd, no trust_remote_code), and
in vLLM or llama.cpp's converters. It keeps the compressed model's quality, not its savings: it has
the dense model's parameter count. Prints the parameter counts and the largest logit difference
against the compressed model on a short prompt.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a compressed run directory (or any folder save_compressed wrote)")
    parser.add_argument("out", type=Path, help="the folder to write (created)")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from nnsvd.errors import CheckpointError
    from nnsvd.models.causal_lm import export_stock, load_compressed

    try:
        compressed, tokenizer = load_compressed(args.run_dir)
    except CheckpointError as e:
        print(f"export_dense: {e}", file=sys.stderr)
        return 2
    export_stock(args.run_dir, args.out)
    stock = AutoModelForCausalLM.from_pretrained(args.out).eval()
    ids = tokenizer("The meaning of low-rank compression is", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (stock(ids).logits - compressed(ids).logits).abs().max().item()
    count = sum(p.numel() for p in compressed.parameters())
    dense = sum(p.numel() for p in stock.parameters())
    print(f"wrote {args.out}: {type(stock).__name__}, {dense:,} parameters (the compressed model has {count:,}); "
          f"largest logit difference on a prompt {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

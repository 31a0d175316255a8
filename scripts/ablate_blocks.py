"""How much of a trained GPT-2's modeling its blocks carry, and how plain SVD of its blocks hurts it.

For the byte-level testbed (conf/model/gpt2_bytes.yaml): loads a dense GPT-2 directory (the dense cache
entry, ``outputs/cache/dense/gpt2-…``), reads the first --tokens bytes of WikiText-2's raw test file as
one byte stream (the stream the suite scores with tokenizer builtin:bytes: the dense and plain-SVD
figures equal those of ``experiment=gpt2_methods``), and prints the test perplexity of:

- the dense model;
- the model with the attention outputs, the MLP outputs, or both zeroed in every block (c_proj weight
  and bias = 0): what the embeddings and the head alone can do;
- the model with every block target truncated by plain SVD to the rank that keeps a fraction of its
  weights (the uniform allocation of compress.ratio).

Usage: python scripts/ablate_blocks.py DENSE_DIR [--data-root /path/to/data] [--tokens 65536] [--out F]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel

from nnsvd import compress_model
from nnsvd.lowrank.allocation import target_shapes, uniform_ranks
from nnsvd.models.gpt2 import GPT2_TARGETS
from nnsvd.training.perplexity import evaluate_perplexity


def read_byte_stream(data_root: str | Path, split: str, tokens: int | None = None) -> torch.Tensor:
    """The first ``tokens`` bytes (all: None) of WikiText-2's raw ``wiki.<split>.raw`` as byte ids."""
    return torch.tensor(
        list((Path(data_root) / "wikitext-2-raw" / f"wiki.{split}.raw").read_bytes()[:tokens])
    )


def zeroed(model: GPT2LMHeadModel, parts: tuple[str, ...]) -> GPT2LMHeadModel:
    """A copy of the model with the output projection (c_proj weight and bias) of ``parts`` zeroed in every block."""
    z = copy.deepcopy(model)
    for block in z.transformer.h:
        for part in parts:
            proj = getattr(block, part).c_proj
            proj.weight.data.zero_()
            proj.bias.data.zero_()
    return z


def truncated(model: GPT2LMHeadModel, removed: float) -> GPT2LMHeadModel:
    """A copy of the model with every block target factorized by plain SVD at the uniform ranks that
    remove the fraction ``removed`` of each one's weights: the suite's compress.allocation=uniform,
    compress.method=svd."""
    z = copy.deepcopy(model)
    ranks = uniform_ranks(target_shapes(z, GPT2_TARGETS), removed)
    compress_model(z, GPT2_TARGETS, rank=ranks, method="svd")
    return z


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("dense_dir")
    p.add_argument("--data-root", default=os.environ.get("NNSVD_DATA_ROOT", "data"))
    p.add_argument("--tokens", type=int, default=65536)
    p.add_argument("--out", default="outputs/ablate_blocks.json")
    a = p.parse_args()
    model = GPT2LMHeadModel.from_pretrained(a.dense_dir).eval()
    ids = read_byte_stream(a.data_root, "test", a.tokens)

    def ppl(m: GPT2LMHeadModel) -> float:
        return evaluate_perplexity(m, ids, batch_size=64)["ppl"]

    out = {"dense": ppl(model)}
    for name, parts in (("zero attention", ("attn",)), ("zero MLP", ("mlp",)), ("zero both", ("attn", "mlp"))):
        out[name] = ppl(zeroed(model, parts))
    for removed in (0.4, 0.6, 0.8, 0.9):
        out[f"plain SVD, {removed:.0%} removed"] = ppl(truncated(model, removed))
    for key, value in out.items():
        print(f"{key:>28}: test ppl {value:9.3f}  ({value / out['dense']:.2f}× dense)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"dense_dir": a.dense_dir, "tokens": len(ids), "ppl": out}, indent=1))
    print("saved", a.out)


if __name__ == "__main__":
    main()

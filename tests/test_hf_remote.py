"""Compressed folders that plain transformers opens (modeling_nnsvd.py + auto_map), without nn-svd, and the
stock dense export, on tiny random models of every supported family."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import HANG, require_data
from safetensors.torch import load_file, save_file
from test_blockwise import CONFIGS, LEAVES, targets
from transformers import AutoModelForCausalLM, GemmaConfig, Qwen3Config

from nnsvd.lowrank import compress_model, lowrank_from_scratch
from nnsvd.models.causal_lm import export_stock, load_compressed
from nnsvd.models.gpt2 import load_tokenizer
from nnsvd.models.hf_checkpoint import save_compressed

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "max_position_embeddings": 64}
FAMILIES = {
    **CONFIGS,
    "qwen3": lambda: Qwen3Config(**SMALL, intermediate_size=48, num_key_value_heads=2, head_dim=8),
    "gemma": lambda: GemmaConfig(**SMALL, intermediate_size=48, num_key_value_heads=1, head_dim=8),
}
LEAVES = {**LEAVES, "qwen3": LEAVES["llama"], "gemma": LEAVES["llama"]}
BLOCKS = {"qwen3": "model.layers", "gemma": "model.layers"}

# Runs in a fresh interpreter in which `import nnsvd` fails (a meta-path finder refuses it, and the
# script proves it), with the Hub off: what a user without nn-svd gets from plain transformers.
ISOLATED = textwrap.dedent('''
    import importlib.abc, json, sys

    class NoNNSVD(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "nnsvd" or name.startswith("nnsvd."):
                raise ImportError("nn-svd is not installed here")
            return None

    sys.meta_path.insert(0, NoNNSVD())
    try:
        import nnsvd  # noqa: F401
        sys.exit("nnsvd imported: the isolation failed")
    except ImportError:
        pass
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for folder, out in zip(sys.argv[1::2], sys.argv[2::2]):
        report = {}
        try:
            AutoModelForCausalLM.from_pretrained(folder)
            report["plain"] = "loaded"
        except Exception as e:  # what a user without trust_remote_code sees
            report["plain"] = f"{type(e).__name__}: {e}"
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
        report["class"] = type(model).__name__
        report["modules"] = sorted({type(m).__name__ for m in model.modules()})
        report["nnsvd_loaded"] = any(k == "nnsvd" or k.startswith("nnsvd.") for k in sys.modules)
        ids = load_file(out + "/ids.safetensors")["ids"]
        with torch.no_grad():
            logits = model(ids).logits
            generated = model.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
        save_file({"logits": logits.contiguous(), "generated": generated.contiguous()}, out + "/theirs.safetensors")
        model.save_pretrained(out + "/resaved")
        AutoTokenizer.from_pretrained(folder).save_pretrained(out + "/resaved")
        json.dump(report, open(out + "/report.json", "w"))
''')


def build(family: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(FAMILIES[family]()).eval()


def family_targets(family: str) -> list[str]:
    if family in BLOCKS:
        return [f"{BLOCKS[family]}.*.{leaf}" for leaf in LEAVES[family]]
    return targets(family)


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(require_data("gpt2-tokenizer")))


def run_isolated(pairs, tmp_path) -> list[tuple[dict, dict]]:
    """Open each (folder, out) in one interpreter that cannot import nnsvd; (report, tensors) per pair."""
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "PYTHONNOUSERSITE": "1",
           # the caller's thread count: float sums split alike, so logits can be compared bit for bit
           "OMP_NUM_THREADS": str(torch.get_num_threads())}
    args = [str(p) for pair in pairs for p in pair]
    proc = subprocess.run([sys.executable, "-c", ISOLATED, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=HANG, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [(json.loads((out / "report.json").read_text()), load_file(out / "theirs.safetensors")) for _, out in pairs]


def save_case(model, tokenizer, root, ids):
    """Save ``model`` under root/compressed with its inputs under root/out; (folder, out)."""
    folder, out = root / "compressed", root / "out"
    save_compressed(model, tokenizer, folder)
    out.mkdir(parents=True)
    save_file({"ids": ids}, out / "ids.safetensors")
    return folder, out


@pytest.fixture(scope="module")
def opened(tokenizer, tmp_path_factory):
    """Every family compressed with non-uniform ranks (and LLaMA in the symmetric form), saved, and opened
    in one isolated interpreter: {case: (folder, out, ids, report, tensors)}."""
    base = tmp_path_factory.mktemp("hf_remote")
    cases = {}
    for family in FAMILIES:
        model = build(family)
        ranks = {pattern: 3 + i % 3 for i, pattern in enumerate(family_targets(family))}  # non-uniform ranks
        compress_model(model, family_targets(family), ranks)
        ids = torch.randint(1, 96, (2, 12), generator=torch.Generator().manual_seed(3))
        cases[family] = (*save_case(model, tokenizer, base / family, ids), ids)
    model = build("llama")
    lowrank_from_scratch(model, ["model.layers.*.self_attn.q_proj", "model.layers.*.self_attn.o_proj"], 4,
                         symmetric=True)
    ids = torch.randint(1, 96, (1, 8), generator=torch.Generator().manual_seed(4))
    cases["symmetric"] = (*save_case(model, tokenizer, base / "symmetric", ids), ids)
    results = run_isolated([(folder, out) for folder, out, _ in cases.values()], base)
    return {case: (*cases[case], *result) for case, result in zip(cases, results)}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_a_compressed_folder_opens_in_plain_transformers_without_nnsvd(family, opened):
    folder, out, ids, report, theirs = opened[family]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "nnsvd" and config["auto_map"]["AutoModelForCausalLM"] == \
        "modeling_nnsvd.NNSVDForCausalLM" and (folder / "modeling_nnsvd.py").is_file()
    assert len({layer["rank"] for layer in config["nnsvd_layers"]}) > 1  # non-uniform ranks
    ours, _ = load_compressed(folder)
    assert report["nnsvd_loaded"] is False
    # without trust_remote_code: an error, never a model with random weights
    assert report["plain"] != "loaded" and "trust_remote_code" in report["plain"], report["plain"]
    assert report["class"] == type(ours).__name__ and "LowRankLinear" in report["modules"]
    with torch.no_grad():
        expected = ours(ids).logits
        generated = ours.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(theirs["logits"], expected)  # the same math: bit for bit
    assert torch.equal(theirs["generated"], generated)
    # what transformers saves opens in the suite again, and is still the compressed model
    again, _ = load_compressed(out / "resaved")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, expected)


def test_the_symmetric_form_opens_too(opened):
    folder, _, ids, report, theirs = opened["symmetric"]
    assert "SymmetricLowRankLinear" in report["modules"]
    ours, _ = load_compressed(folder)
    with torch.no_grad():
        assert torch.equal(theirs["logits"], ours(ids).logits)


def test_a_dense_folder_stays_stock(tokenizer, tmp_path):
    model = build("llama")
    save_compressed(model, tokenizer, tmp_path / "dense", [])
    assert json.loads((tmp_path / "dense" / "config.json").read_text())["model_type"] == "llama"
    assert not (tmp_path / "dense" / "modeling_nnsvd.py").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "dense")  # no remote code needed


@pytest.mark.parametrize("family", ["llama", "gpt2", "opt"])
def test_the_dense_export_is_stock_full_size_and_keeps_the_outputs(family, tokenizer, tmp_path):
    model = build(family)
    dense_count = sum(p.numel() for p in model.parameters())
    compress_model(model, family_targets(family), 4)
    save_compressed(model, tokenizer, tmp_path / "c")
    export_stock(tmp_path / "c", tmp_path / "stock")
    assert json.loads((tmp_path / "stock" / "config.json").read_text())["model_type"] == family
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "stock").eval()  # plain: no remote code
    assert sum(p.numel() for p in stock.parameters()) == dense_count
    ids = torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        a, b = stock(ids).logits, model(ids).logits
    assert (a - b).abs().max() < 1e-4  # one matmul by A·B instead of two: rounding apart

"""GPT-2 building blocks: Conv1D compression, checkpoints, loading errors, the local tokenizer."""

from __future__ import annotations

import json
import math

import huggingface_hub.constants
import pytest
import regex
import torch
from conftest import require_data
from transformers.pytorch_utils import Conv1D

from nnsvd.lowrank import LowRankLinear, RankError, SymmetricLowRankLinear, compress_model, linear_weight
from nnsvd.models.gpt2 import (
    GPT2_TARGETS,
    CheckpointError,
    ModelLoadError,
    layer_records,
    load_compressed,
    load_gpt2,
    load_tokenizer,
    save_compressed,
)

TINY = {"n_layer": 2, "n_embd": 64, "n_head": 2, "n_positions": 128}


@pytest.fixture
def offline(monkeypatch):
    """No Hub requests (huggingface_hub reads HF_HUB_OFFLINE once, at import)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def tiny():
    torch.manual_seed(0)
    return load_gpt2("gpt2", pretrained=False, config=TINY).eval()


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(require_data("gpt2-tokenizer")))


def tokens(n: int = 24, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 50257, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model, x: torch.Tensor) -> torch.Tensor:
    return model(input_ids=x).logits


def test_random_init_follows_the_seed_and_config():
    torch.manual_seed(3)
    a = load_gpt2("ignored", pretrained=False, config=TINY)
    torch.manual_seed(3)
    b = load_gpt2("ignored", pretrained=False, config=TINY)
    assert (a.config.n_layer, a.config.n_embd, a.config.n_head, a.config.n_positions) == (2, 64, 2, 128)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    with pytest.raises(ValueError, match=r"unknown GPT-2 config keys \['n_layers'\]"):
        load_gpt2("gpt2", pretrained=False, config={"n_layers": 2})


def test_dropout_is_configurable_and_off_means_training_is_deterministic_per_input():
    x = torch.randint(0, 1000, (2, 16))
    for pdrop, same in ((0.1, False), (0.0, True)):
        config = {**TINY, "resid_pdrop": pdrop, "embd_pdrop": pdrop, "attn_pdrop": pdrop}
        model = load_gpt2("ignored", pretrained=False, config=config).train()
        assert (model.config.resid_pdrop, model.config.embd_pdrop, model.config.attn_pdrop) == (pdrop,) * 3
        assert torch.equal(logits(model, x), logits(model, x)) is same


def test_targets_are_the_four_conv1d_of_each_block(tiny):
    names = [n for n, m in tiny.named_modules() if isinstance(m, Conv1D)]
    report = compress_model(tiny, GPT2_TARGETS, rank=8)
    assert sorted(report.ranks()) == sorted(names) and len(names) == 8
    assert isinstance(tiny.lm_head, torch.nn.Linear)
    assert tiny.lm_head.weight is tiny.transformer.wte.weight  # the tied head stays dense and tied


def test_full_rank_reproduces_logits(tiny):
    x = tokens()
    before = logits(tiny, x)
    compress_model(tiny, GPT2_TARGETS, rank=64, allow_full_rank=True, method="svd")
    assert all(not isinstance(m, Conv1D) for m in tiny.modules())
    torch.testing.assert_close(logits(tiny, x), before, rtol=1e-4, atol=1e-4)


def test_conv1d_orientation_on_non_square_c_attn(tiny):
    conv = tiny.transformer.h[0].attn.c_attn
    assert isinstance(conv, Conv1D) and tuple(conv.weight.shape) == (64, 192)  # Conv1D stores in×out
    W, b = linear_weight(conv)
    assert tuple(W.shape) == (192, 64) and torch.equal(W, conv.weight.T) and b is conv.bias
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        dense_out = conv(x)
        report = compress_model(tiny, ["transformer.h.0.attn.c_attn"], rank=64, allow_full_rank=True)
        layer = tiny.transformer.h[0].attn.c_attn
        assert isinstance(layer, LowRankLinear)
        assert (layer.out_features, layer.in_features) == (192, 64)
        torch.testing.assert_close(layer(x), dense_out, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(layer.dense_weight(), conv.weight.T, rtol=1e-5, atol=1e-5)
    assert report.layers[0].shape == (192, 64)


def test_report_forms_shapes_and_params(tiny):
    report = compress_model(tiny, GPT2_TARGETS, rank=16, symmetric=True)
    assert len(report.layers) == 8
    expected_shape = {
        "attn.c_attn": (192, 64),
        "attn.c_proj": (64, 64),
        "mlp.c_fc": (256, 64),
        "mlp.c_proj": (64, 256),
    }
    for layer in report.layers:
        kind = layer.name.split(".", 3)[3]
        out_f, in_f = expected_shape[kind]
        assert layer.shape == (out_f, in_f)
        assert layer.params_before == out_f * in_f + out_f
        if kind == "attn.c_proj":
            assert layer.form == "symmetric"
            assert isinstance(tiny.get_submodule(layer.name), SymmetricLowRankLinear)
            assert layer.params_after == 64 * 16 + 64
        else:
            assert layer.form == "lowrank"
            assert layer.params_after == 16 * (out_f + in_f) + out_f
    assert report.params_before == 2 * (12480 + 4160 + 16640 + 16448)
    assert layer_records(tiny) == [
        {"name": r.name, "shape": list(r.shape), "rank": r.rank, "form": r.form}
        for r in sorted(report.layers, key=lambda r: [n for n, _ in tiny.named_modules()].index(r.name))
    ]


def test_rank_too_large_names_the_layer_and_its_limit(tiny):
    ranks = {"transformer.h.*.attn.c_attn": 48, "*": 8}
    with pytest.raises(RankError, match=r"'transformer\.h\.0\.attn\.c_attn' of shape 192×64.*rank ≤ 47"):
        compress_model(tiny, GPT2_TARGETS, rank=ranks)
    assert isinstance(tiny.transformer.h[0].mlp.c_fc, Conv1D)  # nothing was replaced
    compress_model(tiny, GPT2_TARGETS, rank={"transformer.h.*.attn.c_attn": 47, "*": 8})


def test_save_and_load_give_identical_logits(tiny, tokenizer, tmp_path, offline):
    compress_model(tiny, GPT2_TARGETS, rank=12, symmetric=True)
    x = tokens()
    expected = logits(tiny, x)
    save_compressed(tiny, tokenizer, tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"model.safetensors", "config.json", "nnsvd_layers.json", "tokenizer.json"} <= files
    records = json.loads((tmp_path / "ckpt" / "nnsvd_layers.json").read_text())
    assert len(records) == 8 and records[0] == {
        "name": "transformer.h.0.attn.c_attn",
        "shape": [192, 64],
        "rank": 12,
        "form": "lowrank",
    }

    model, tok = load_compressed(tmp_path / "ckpt")
    assert not model.training
    assert model.lm_head.weight is model.transformer.wte.weight
    assert isinstance(model.transformer.h[1].attn.c_proj, SymmetricLowRankLinear)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert torch.equal(logits(model, x), expected)
    text = " = Valkyria Chronicles III = \n"
    assert tok.encode(text) == tokenizer.encode(text) and tok.eos_token_id == 50256


def test_save_checks_given_layer_records(tiny, tokenizer, tmp_path):
    report = compress_model(tiny, GPT2_TARGETS, rank=8)
    rows = [{"name": r.name, "shape": r.shape, "rank": r.rank, "form": r.form} for r in report.layers]
    save_compressed(tiny, tokenizer, tmp_path / "ok", rows)
    rows[0] = {**rows[0], "rank": 9}
    with pytest.raises(ValueError, match="do not describe"):
        save_compressed(tiny, tokenizer, tmp_path / "bad", rows)


def test_generate_on_compressed_model(tiny, tokenizer):
    compress_model(tiny, GPT2_TARGETS, rank=8)
    prompt = torch.tensor([tokenizer.encode(" = Valkyria Chronicles III =")])
    out = tiny.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    assert out.shape == (1, prompt.shape[1] + 6)
    assert torch.equal(out[:, : prompt.shape[1]], prompt)
    # greedy decoding picks the argmax of the compressed model's own next-token logits
    assert out[0, prompt.shape[1]] == logits(tiny, prompt)[0, -1].argmax()


def test_load_compressed_errors(tiny, tokenizer, tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_compressed(tmp_path / "nowhere")
    compress_model(tiny, GPT2_TARGETS, rank=8)
    ckpt = save_compressed(tiny, tokenizer, tmp_path / "ckpt")

    layers_file = ckpt / "nnsvd_layers.json"
    records = json.loads(layers_file.read_text())
    layers_file.write_text(json.dumps([{**records[0], "rank": 9}, *records[1:]]))
    with pytest.raises(CheckpointError, match=r"does not match.*shape mismatches \(2\)") as err:
        load_compressed(ckpt)
    assert "\n" not in str(err.value)

    layers_file.write_text(json.dumps(records[1:]))  # one factorized layer forgotten
    with pytest.raises(CheckpointError, match="missing keys .*unexpected keys .*c_attn"):
        load_compressed(ckpt)

    layers_file.write_text(json.dumps([{**records[0], "shape": [64, 64]}]))
    with pytest.raises(CheckpointError, match="does not fit the model"):
        load_compressed(ckpt)
    layers_file.write_text(json.dumps(records))

    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="unreadable or corrupt"):
        load_compressed(ckpt)
    weights.unlink()
    with pytest.raises(CheckpointError, match="has no model.safetensors"):
        load_compressed(ckpt)


def test_checkpoint_of_another_architecture_is_refused(tokenizer, tmp_path):
    torch.manual_seed(0)
    small = load_gpt2("gpt2", pretrained=False, config={**TINY, "n_layer": 1})
    compress_model(small, GPT2_TARGETS, rank=8)
    ckpt = save_compressed(small, tokenizer, tmp_path / "ckpt")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "n_embd": 32}))
    with pytest.raises(CheckpointError, match="does not fit the model of config.json"):
        load_compressed(ckpt)
    (ckpt / "config.json").write_text(json.dumps({**config, "n_layer": 2}))
    # a two-block model against the weights of one block: block 1's 12 tensors are missing
    with pytest.raises(CheckpointError, match=r"missing keys \(12\): transformer\.h\.1\.") as err:
        load_compressed(ckpt)
    assert "unexpected" not in str(err.value) and "\n" not in str(err.value)
    (ckpt / "config.json").write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(CheckpointError, match="describes a 'llama' model, not GPT-2"):
        load_compressed(ckpt)


@pytest.mark.parametrize("name", ["nnsvd-no-such-model-xyz", "someone/no-such-model"])
def test_unreachable_hub_name_gives_one_line_error(name, offline):
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set and it is not in the local .*model.name_or_path") as err:
        load_gpt2(name)
    assert "\n" not in str(err.value) and name in str(err.value)
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set and it is not in the local") as err:
        load_tokenizer(name)
    assert "\n" not in str(err.value)


def test_missing_or_incomplete_local_dir_gives_one_line_error(tmp_path, offline):
    with pytest.raises(ModelLoadError, match="no such local directory.*model.name_or_path") as err:
        load_gpt2(str(tmp_path / "missing"))
    assert "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="must hold config.json") as err:
        load_gpt2(str(tmp_path))
    assert "\n" not in str(err.value)
    with pytest.raises(ModelLoadError, match="vocab.json"):
        load_tokenizer(str(tmp_path))


def test_pretrained_from_local_directory(tiny, tmp_path, offline):
    tiny.save_pretrained(tmp_path / "gpt2-local")
    model = load_gpt2(str(tmp_path / "gpt2-local"))
    x = tokens()
    torch.testing.assert_close(logits(model.eval(), x), logits(tiny, x))


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (OpenAI's encoder.py)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def reference_bpe(text: str, vocab: dict[str, int], ranks: dict[tuple[str, str], int]) -> list[int]:
    """OpenAI's GPT-2 encoder, written out: regex pre-split, then greedy lowest-rank merges."""
    split = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")
    to_char = _byte_to_unicode()
    ids = []
    for piece in split.findall(text):
        word = [to_char[b] for b in piece.encode("utf-8")]
        while len(word) > 1:
            rank, first, second = min((ranks.get(p, math.inf), *p) for p in zip(word, word[1:]))
            if rank == math.inf:
                break
            merged, i = [], 0
            while i < len(word):
                if word[i : i + 2] == [first, second]:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        ids += [vocab[token] for token in word]
    return ids


def test_local_tokenizer_is_gpt2_bpe(tokenizer):
    folder = require_data("gpt2-tokenizer")
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()[1:]
    ranks = {tuple(line.split()): i for i, line in enumerate(merges)}

    text = " = Valkyria Chronicles III ="
    ids = tokenizer.encode(text)
    assert ids == reference_bpe(text, vocab, ranks) == [796, 569, 18354, 7496, 17740, 6711, 796]
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|endoftext|>" and tokenizer.eos_token_id == 50256
    assert len(tokenizer) == 50257

    wiki = require_data("wikitext-2-raw", "wiki.valid.raw").read_text(encoding="utf-8")[:20000]
    wiki += " naïve café — 1,234.5 km² 日本語 don't\tTAB  double  spaces"
    assert tokenizer.encode(wiki) == reference_bpe(wiki, vocab, ranks)
    assert tokenizer.decode(tokenizer.encode(wiki)) == wiki

"""Any Hugging Face causal LM (nnsvd.models.causal_lm) on tiny random models of every family, offline."""

from __future__ import annotations

import json
import math

import huggingface_hub.constants
import pytest
import torch
from conftest import require_data
from transformers import (
    AutoModelForCausalLM,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PhiConfig,
    Qwen2Config,
    Qwen3Config,
)

from nnsvd.errors import CheckpointError, ConfigError, ModelLoadError
from nnsvd.lowrank import (
    LowRankLinear,
    compress_blockwise,
    compress_model,
    find_targets,
    linear_weight,
    resolve_factorizer,
)
from nnsvd.lowrank.regularizers import orthonormal_penalty
from nnsvd.models.causal_lm import (
    default_targets,
    load_causal_lm,
    load_causal_tokenizer,
    load_compressed,
    save_compressed,
)
from nnsvd.models.gpt2 import GPT2_TARGETS, load_tokenizer
from nnsvd.training.language_modeling import train_causal_lm
from nnsvd.training.perplexity import evaluate_perplexity

pytestmark = pytest.mark.usefixtures("single_thread")

VOCAB = 50257  # the local GPT-2 tokenizer's
SMALL = {"vocab_size": VOCAB, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "max_position_embeddings": 64}
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL, intermediate_size=48, num_key_value_heads=4),
    "mistral": lambda: MistralConfig(**SMALL, intermediate_size=48, num_key_value_heads=2),  # GQA: k/v 16×32
    "qwen2": lambda: Qwen2Config(**SMALL, intermediate_size=48, num_key_value_heads=2, tie_word_embeddings=True),
    "opt": lambda: OPTConfig(**SMALL, ffn_dim=48, word_embed_proj_dim=32),  # tied head
    "gpt_neox": lambda: GPTNeoXConfig(**SMALL, intermediate_size=48),  # untied head
}
FAMILIES = list(CONFIGS)
EXTRA = {
    "qwen3": lambda: Qwen3Config(**SMALL, intermediate_size=48, num_key_value_heads=2, head_dim=8),
    "gemma": lambda: GemmaConfig(**SMALL, intermediate_size=48, num_key_value_heads=1, head_dim=8),
    "gpt2": lambda: GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=VOCAB),
    "phi": lambda: PhiConfig(**SMALL, intermediate_size=48),  # a type without default targets
}
EXPECTED = {  # targets per block, as the issue lists them
    "llama": 7, "mistral": 7, "qwen2": 7, "qwen3": 7, "gemma": 7, "opt": 6, "gpt_neox": 4, "gpt2": 4,
}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(str(require_data("gpt2-tokenizer")))


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, tokenizer):
    """Each family as a local directory written by save_pretrained, with the local GPT-2 tokenizer."""
    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for family, config in {**CONFIGS, **EXTRA}.items():
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config())
        model.save_pretrained(root / family)
        tokenizer.save_pretrained(root / family)
        dirs[family] = root / family
    return dirs


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def tokens(n: int = 12, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, n), generator=torch.Generator().manual_seed(seed))


def lm_loss(model, batch):
    return model(input_ids=batch, labels=batch, use_cache=False).loss


@torch.no_grad()
def logits(model, x):
    return model(input_ids=x).logits


@pytest.mark.parametrize("family", [*FAMILIES, "qwen3", "gemma", "gpt2"])
def test_default_targets_resolve(model_dirs, family, offline):
    model = load_causal_lm(str(model_dirs[family]))
    patterns = default_targets(model)
    names = find_targets(model, patterns)
    assert len(names) == 2 * EXPECTED[family]
    assert not any("embed" in n or "lm_head" in n or "wte" in n for n in names)
    if family == "gpt2":
        assert patterns == GPT2_TARGETS  # GPT-2 is a case of the general model, with its own targets
    if family in ("llama", "mistral", "qwen2", "qwen3", "gemma"):
        assert patterns[0] == "model.layers.*.self_attn.q_proj" and patterns[-1] == "model.layers.*.mlp.down_proj"


def test_unknown_model_type_needs_explicit_targets(model_dirs, offline):
    model = load_causal_lm(str(model_dirs["phi"]))
    with pytest.raises(ConfigError) as err:
        default_targets(model)
    message = str(err.value)
    assert "\n" not in message and "model.targets=null, but model type 'phi' has no default targets" in message
    assert message.endswith(
        "its Linear layers are model.layers.*.self_attn.q_proj, model.layers.*.self_attn.k_proj, "
        "model.layers.*.self_attn.v_proj, model.layers.*.self_attn.dense, model.layers.*.mlp.fc1, "
        "model.layers.*.mlp.fc2, lm_head")
    report = compress_model(model, ["model.layers.*.self_attn.dense", "model.layers.*.mlp.fc?"], 4)
    assert len(report.layers) == 6  # explicit targets work for any type


@pytest.mark.parametrize("family", FAMILIES)
def test_full_rank_round_trip_reproduces_logits(model_dirs, family, offline):
    model = load_causal_lm(str(model_dirs[family])).eval()
    x = tokens()
    before = logits(model, x)
    names = find_targets(model, default_targets(model))
    ranks = {n: min(linear_weight(model.get_submodule(n))[0].shape) for n in names}
    compress_model(model, names, ranks, allow_full_rank=True, method="svd")
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in names)
    torch.testing.assert_close(logits(model, x), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("method", ["auto", "asvd", "whiten", "fwsvd"])
def test_each_method_compresses_every_family(model_dirs, family, method, offline):
    model = load_causal_lm(str(model_dirs[family])).eval()
    targets = default_targets(model)
    x = tokens(seed=3)
    if method == "auto":
        report = compress_model(model, targets, 4)
    else:
        batches = [tokens(16, 3, seed=1), tokens(16, 2, seed=2)]
        report = compress_blockwise(model, targets, 4, batches=batches, loss_fn=lm_loss,
                                    method=resolve_factorizer(method), fisher=method == "fwsvd")
        assert all(layer.calib_tokens == 80 and 0 < layer.rel_data_error < 1 for layer in report.layers)
    assert len(report.layers) == 2 * EXPECTED[family] and {layer.rank for layer in report.layers} == {4}
    assert bool(torch.isfinite(logits(model, x)).all())


@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_reload_give_identical_logits(model_dirs, family, tmp_path, offline):
    model = load_causal_lm(str(model_dirs[family]))
    tokenizer = load_causal_tokenizer(str(model_dirs[family]))
    batches = [tokens(16, 2, seed=1)]
    compress_blockwise(model, default_targets(model), 3, batches=batches, loss_fn=lm_loss,
                       method=resolve_factorizer("whiten"))
    x = tokens(seed=5)
    expected = logits(model.eval(), x)
    save_compressed(model, tokenizer, tmp_path / "ckpt", meta={"model": "causal_lm"})
    again, tok = load_compressed(tmp_path / "ckpt")
    assert not again.training and type(again) is type(model)
    assert torch.equal(logits(again, x), expected)
    tied = again.get_output_embeddings().weight is again.get_input_embeddings().weight
    assert tied == bool(model.config.tie_word_embeddings) == (family in ("qwen2", "opt"))
    assert tok.encode(" = Valkyria Chronicles III =") == [796, 569, 18354, 7496, 17740, 6711, 796]
    records = json.loads((tmp_path / "ckpt" / "nnsvd_layers.json").read_text())
    assert len(records) == 2 * EXPECTED[family] and {r["rank"] for r in records} == {3}


def test_bfloat16_loads_saves_and_reloads_in_bfloat16(model_dirs, tmp_path, offline):
    model = load_causal_lm(str(model_dirs["mistral"]), dtype="bfloat16")
    assert model.dtype == torch.bfloat16 and model.model.rotary_emb.inv_freq.dtype == torch.float32
    batches = [tokens(16, 2, seed=1)]
    report = compress_blockwise(model, default_targets(model), 4, batches=batches, loss_fn=lm_loss,
                                method=resolve_factorizer("whiten"))
    layer = model.model.layers[0].self_attn.k_proj
    assert layer.A.dtype == torch.bfloat16 and 0 < report.layers[0].rel_data_error < 1
    save_compressed(model, load_causal_tokenizer(str(model_dirs["mistral"])), tmp_path / "ckpt")
    again, _ = load_compressed(tmp_path / "ckpt")
    x = tokens()
    assert again.dtype == torch.bfloat16 and torch.equal(logits(again, x), logits(model.eval(), x))


@pytest.mark.parametrize("family", FAMILIES)
def test_perplexity_uses_the_models_context_and_is_finite(model_dirs, family, offline):
    model = load_causal_lm(str(model_dirs[family]))
    compress_model(model, default_targets(model), 4)
    ids = torch.randint(0, VOCAB, (300,), generator=torch.Generator().manual_seed(4))
    out = evaluate_perplexity(model, ids, batch_size=4)
    assert out["tokens"] == 300 - math.ceil(300 / 64)  # windows of max_position_embeddings = 64
    assert math.isfinite(out["ppl"]) and 1 < out["ppl"] < 10 * VOCAB


@pytest.mark.parametrize("family", ["mistral", "opt", "gpt_neox"])  # GQA; tied head; untied head
def test_finetuning_trains_the_factors_with_the_penalty(model_dirs, family, offline):
    model = load_causal_lm(str(model_dirs[family]))
    compress_model(model, default_targets(model), 4)
    first = next(m for m in model.modules() if isinstance(m, LowRankLinear))
    before = first.A.detach().clone()
    out = train_causal_lm(model, torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(0)),
                          steps=2, batch_size=2, lr=1e-3, penalty_fn=orthonormal_penalty, alpha=1e-3)
    assert out["steps"] == 2 and math.isfinite(out["final_loss"])
    assert all(h["train/penalty"] > 0 for h in out["history"])
    assert not torch.equal(first.A, before)


def test_bad_dtype_is_refused_in_one_line(model_dirs, offline):
    with pytest.raises(ConfigError, match=r"^model\.dtype=float64 is not allowed: allowed float32, bfloat16, float16$"):
        load_causal_lm(str(model_dirs["llama"]), dtype="float64")


def test_remote_code_is_never_run_unless_asked(tmp_path, offline):
    """A repository with its own code fails in one line (transformers would otherwise prompt for it)."""
    (tmp_path / "custom").mkdir()
    (tmp_path / "custom" / "config.json").write_text(json.dumps({
        "model_type": "nnsvd_custom", "auto_map": {"AutoConfig": "configuration_x.XConfig",
                                                   "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
    with pytest.raises(ModelLoadError) as err:
        load_causal_lm(str(tmp_path / "custom"))
    assert "\n" not in str(err.value)
    assert "needs the custom code of its repository (trust_remote_code)" in str(err.value)
    assert "set model.trust_remote_code=true" in str(err.value)


def test_missing_or_unknown_model_fails_in_one_line(model_dirs, tmp_path, offline):
    with pytest.raises(ModelLoadError, match="no such local directory"):
        load_causal_lm(str(tmp_path / "missing"))
    with pytest.raises(ModelLoadError, match="HF_HUB_OFFLINE is set and it is not in the local") as err:
        load_causal_lm("nnsvd-nobody/no-such-model")
    assert "\n" not in str(err.value)
    (tmp_path / "odd").mkdir()
    (tmp_path / "odd" / "config.json").write_text('{"model_type": "no_such_type"}')
    with pytest.raises(ModelLoadError, match="of a model type transformers knows") as err:
        load_causal_lm(str(tmp_path / "odd"))
    assert "\n" not in str(err.value)


def test_damaged_checkpoints_fail_in_one_line(model_dirs, tmp_path, offline):
    model = load_causal_lm(str(model_dirs["llama"]))
    compress_model(model, default_targets(model), 4)
    ckpt = save_compressed(model, load_causal_tokenizer(str(model_dirs["llama"])), tmp_path / "ckpt")
    (ckpt / "nnsvd_buffers.safetensors").rename(tmp_path / "buffers")
    with pytest.raises(CheckpointError, match=r"has no nnsvd_buffers\.safetensors.*rotary_emb\.inv_freq"):
        load_compressed(ckpt)
    (tmp_path / "buffers").rename(ckpt / "nnsvd_buffers.safetensors")
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 3}))
    with pytest.raises(CheckpointError, match=r"missing keys \(9\): model\.layers\.2\.") as err:
        load_compressed(ckpt)
    assert "\n" not in str(err.value)
    (ckpt / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "x.Y"}, "model_type": "xyz"}))
    with pytest.raises(CheckpointError, match="with its own code, which nn-svd does not run"):
        load_compressed(ckpt)

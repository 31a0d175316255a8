"""Block-by-block calibrated compression (nnsvd.lowrank.blockwise) on tiny random models of every family."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    Qwen2Config,
)

from nnsvd.lowrank import (
    TargetError,
    capture_block_inputs,
    collect_statistics,
    compress_blockwise,
    compress_with_calibration,
    decoder_blocks,
    resolve_factorizer,
    shared_input_groups,
    stats_nbytes,
)

pytestmark = pytest.mark.usefixtures("single_thread")

SMALL = {"vocab_size": 96, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "max_position_embeddings": 64}
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL, intermediate_size=48, num_key_value_heads=4),
    "mistral": lambda: MistralConfig(**SMALL, intermediate_size=48, num_key_value_heads=2),  # GQA
    "qwen2": lambda: Qwen2Config(**SMALL, intermediate_size=48, num_key_value_heads=2),
    "opt": lambda: OPTConfig(**SMALL, ffn_dim=48, word_embed_proj_dim=32),
    "gpt_neox": lambda: GPTNeoXConfig(**SMALL, intermediate_size=48),
    "gpt2": lambda: GPT2Config(n_layer=2, n_embd=32, n_head=4, n_positions=64, vocab_size=96),
}
BLOCKS = {"llama": "model.layers", "mistral": "model.layers", "qwen2": "model.layers",
          "opt": "model.decoder.layers", "gpt_neox": "gpt_neox.layers", "gpt2": "transformer.h"}
LEAVES = {
    "llama": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
              "mlp.up_proj", "mlp.down_proj"],
    "opt": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"],
    "gpt_neox": ["attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"],
    "gpt2": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
}
LEAVES["mistral"] = LEAVES["qwen2"] = LEAVES["llama"]


def build(family: str):
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(CONFIGS[family]()).eval()


def targets(family: str) -> list[str]:
    return [f"{BLOCKS[family]}.*.{leaf}" for leaf in LEAVES[family]]


def lm_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


@pytest.fixture(scope="module")
def batches():
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 96, (3, 12), generator=g), torch.randint(0, 96, (2, 12), generator=g)]


def factors(model, names):
    return {n: (model.get_submodule(n).A.detach().clone(), model.get_submodule(n).B.detach().clone()) for n in names}


@pytest.mark.parametrize("family", list(CONFIGS))
def test_decoder_blocks_are_found(family):
    assert decoder_blocks(build(family)) == BLOCKS[family]


@pytest.mark.parametrize(("family", "method", "sequential"), [
    *[(f, "whiten", False) for f in CONFIGS],
    *[(f, "whiten", True) for f in CONFIGS],
    ("mistral", "fwsvd", False),
    ("opt", "asvd", True),
])
def test_block_by_block_gives_the_factors_of_the_whole_model_path(family, method, sequential, batches):
    """Dense: the all-at-once path's factors, bit for bit. Sequential: the staged sequential path's."""
    model = build(family)
    twin = copy.deepcopy(model)
    factorizer = resolve_factorizer(method)
    fisher = method == "fwsvd"
    whole = compress_with_calibration(twin, targets(family), 4, batches=batches, loss_fn=lm_loss, method=factorizer,
                                      sequential=sequential, fisher=fisher)
    blocks = compress_blockwise(model, targets(family), 4, batches=batches, loss_fn=lm_loss, method=factorizer,
                                sequential=sequential, fisher=fisher)
    names = [layer.name for layer in whole.layers]
    assert [layer.name for layer in blocks.layers] == names and len(names) == 2 * len(LEAVES[family])
    expected, got = factors(twin, names), factors(model, names)
    for name in names:
        assert torch.equal(got[name][0], expected[name][0]) and torch.equal(got[name][1], expected[name][1]), name
    assert [layer.rel_data_error for layer in blocks.layers] == [layer.rel_data_error for layer in whole.layers]
    assert all(layer.calib_tokens == 5 * 12 for layer in blocks.layers)
    assert model.config.use_cache is True  # switched off while calibrating only


def test_sequential_differs_from_dense_from_the_second_block_on(batches):
    """The sequential path really feeds block 1 the compressed block 0's outputs."""
    dense, seq = build("llama"), build("llama")
    method = resolve_factorizer("whiten")
    a = compress_blockwise(dense, targets("llama"), 2, batches=batches, loss_fn=lm_loss, method=method)
    b = compress_blockwise(seq, targets("llama"), 2, batches=batches, loss_fn=lm_loss, method=method, sequential=True)
    first = [x.name for x in a.layers if ".0." in x.name]
    assert all(torch.equal(dense.get_submodule(n).A, seq.get_submodule(n).A) for n in first)
    assert not torch.equal(dense.model.layers[1].mlp.down_proj.A, seq.model.layers[1].mlp.down_proj.A)
    assert [x.rank for x in b.layers] == [2] * 14


@pytest.mark.parametrize("family", ["llama", "mistral", "opt"])
def test_shared_inputs_share_one_gram(family, batches):
    """q/k/v read one tensor and gate/up another: one Gram each, filled once (not once per layer)."""
    model = build(family)
    block = BLOCKS[family] + ".0"
    names = [f"{block}.{leaf}" for leaf in LEAVES[family]]
    groups = shared_input_groups(model, names, lambda: lm_loss(model, batches[0]))
    attn = [f"{block}.self_attn.{p}_proj" for p in "qkv"]
    expected = {"opt": [attn, [f"{block}.self_attn.out_proj"], [f"{block}.fc1"], [f"{block}.fc2"]]}.get(
        family, [attn, [f"{block}.self_attn.o_proj"], [f"{block}.mlp.gate_proj", f"{block}.mlp.up_proj"],
                 [f"{block}.mlp.down_proj"]])
    assert sorted(map(sorted, groups)) == sorted(map(sorted, expected))

    seen = []
    q = model.get_submodule(attn[0])
    handle = q.register_forward_hook(lambda m, a, o: seen.append(a[0].detach().reshape(-1, 32).double()))
    stats = collect_statistics(model, names, batches, lm_loss)
    handle.remove()
    X = torch.cat(seen[1:])  # seen[0]: the probe pass on the first batch
    assert stats[attn[0]].inputs is stats[attn[1]].inputs is stats[attn[2]].inputs
    assert len({id(s.inputs) for s in stats.values()}) == 4
    assert stats[attn[1]].tokens == 60
    torch.testing.assert_close(stats[attn[2]].gram, X.T @ X, rtol=1e-5, atol=1e-5)  # added once, not three times
    assert stats_nbytes(model, names, groups=groups) < stats_nbytes(model, names)


def test_capture_stops_at_the_first_block_and_keeps_equal_arguments_once(batches):
    model = build("llama")
    called = []
    hook = model.model.layers[1].register_forward_pre_hook(lambda m, a: called.append(1))
    head = model.lm_head.register_forward_pre_hook(lambda m, a: called.append(2))
    same = [batches[0], batches[0].flip(0)]  # two batches of one shape
    inputs = capture_block_inputs(model, model.model.layers[0], same, lm_loss)
    hook.remove()
    head.remove()
    assert called == [] and len(inputs) == 2 and inputs.tokens() == 72
    assert [tuple(h.shape) for h in inputs.hidden] == [(3, 12, 32)] * 2
    cos0, cos1 = inputs.kwargs[0]["position_embeddings"][0], inputs.kwargs[1]["position_embeddings"][0]
    assert cos0 is cos1  # equal rotary embeddings are stored once
    assert inputs.hidden_nbytes() == 2 * 3 * 12 * 32 * 4
    with torch.no_grad():
        torch.testing.assert_close(inputs.hidden[0], model.model.embed_tokens(same[0]))


def test_per_layer_ranks_and_targets_outside_the_blocks(batches):
    model = build("llama")
    method = resolve_factorizer("whiten")
    ranks = {"model.layers.0.mlp.down_proj": 3, "model.layers.1.self_attn.q_proj": 5, "*": 2}
    report = compress_blockwise(model, targets("llama"), ranks, batches=batches, loss_fn=lm_loss, method=method)
    got = report.ranks()
    assert got["model.layers.0.mlp.down_proj"] == 3 and got["model.layers.1.self_attn.q_proj"] == 5
    assert sorted(set(got.values())) == [2, 3, 5] and report.memory_estimate > 0
    with pytest.raises(TargetError, match=r"target 'lm_head' lies outside the decoder blocks \(model\.layers\.N"):
        compress_blockwise(build("llama"), ["lm_head"], 4, batches=batches, loss_fn=lm_loss, method=method)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("sequential", [False, True])
def test_block_by_block_on_cuda_in_bfloat16(batches, sequential):
    """On the GPU in bfloat16: factors on the GPU, with the whole-model path's data error per layer."""
    model = build("mistral").to("cuda", torch.bfloat16)
    twin = copy.deepcopy(model)
    on_gpu = [b.cuda() for b in batches]
    method = resolve_factorizer("whiten")
    whole = compress_with_calibration(twin, targets("mistral"), 4, batches=on_gpu, loss_fn=lm_loss, method=method,
                                      sequential=sequential)
    blocks = compress_blockwise(model, targets("mistral"), 4, batches=on_gpu, loss_fn=lm_loss, method=method,
                                sequential=sequential)
    names = [layer.name for layer in whole.layers]
    assert [layer.name for layer in blocks.layers] == names
    for name in names:
        layer = model.get_submodule(name)
        assert layer.A.device.type == "cuda" and layer.A.dtype == torch.bfloat16
    # the same data error on the same statistics (the factors themselves may differ where σ_r ≈ σ_r+1 and
    # the GPU's reductions differ in the last bit)
    assert [x.rel_data_error for x in blocks.layers] == pytest.approx([x.rel_data_error for x in whole.layers], rel=1e-2)

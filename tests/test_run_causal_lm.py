"""End-to-end `python run.py model=causal_lm ...` for each family, offline: a tiny random model saved in a
local directory with the local GPT-2 tokenizer, on the first lines of the real WikiText-2 files."""

from __future__ import annotations

import json
import os

import pytest
import torch
from conftest import require_data, run_cli
from transformers import (
    AutoModelForCausalLM,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    OPTConfig,
    PhiConfig,
    Qwen2Config,
)

from nnsvd.models.gpt2 import load_tokenizer

pytestmark = pytest.mark.slow

SMALL = {"vocab_size": 50257, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
         "max_position_embeddings": 64}
CONFIGS = {
    "llama": lambda: LlamaConfig(**SMALL, intermediate_size=48, num_key_value_heads=4),
    "mistral": lambda: MistralConfig(**SMALL, intermediate_size=48, num_key_value_heads=2),
    "qwen2": lambda: Qwen2Config(**SMALL, intermediate_size=48, num_key_value_heads=2),
    "opt": lambda: OPTConfig(**SMALL, ffn_dim=48, word_embed_proj_dim=32),
    "gpt_neox": lambda: GPTNeoXConfig(**SMALL, intermediate_size=48),
    "phi": lambda: PhiConfig(**SMALL, intermediate_size=48),
}
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
COMMON = ["model=causal_lm", "data=text_files", "rank=4", "calibration.samples=6", "calibration.batch_size=4",
          "eval.max_length=32", "eval.max_tokens=512", "eval.batch_size=8", "model.sample_tokens=3",
          "finetune.seq_len=32", "finetune.batch_size=2", "finetune.warmup_steps=1"]
# One run per family, each through another path of the flow.
RUNS = {
    "llama": ["compress.method=whiten", "finetune.steps=2", "regularizer=orthonormal"],
    "mistral": ["compress.method=fwsvd"],
    "qwen2": ["compress.method=asvd", "model.dtype=bfloat16"],
    "opt": ["compress.method=whiten", "calibration.sequential=true"],
    "gpt_neox": ["compress.method=svd"],
}
LAYERS = {"llama": 14, "mistral": 14, "qwen2": 14, "opt": 12, "gpt_neox": 8}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A data.root with the first lines of the real WikiText-2 files, and each family as a local model
    directory (save_pretrained) holding the local GPT-2 tokenizer."""
    wiki, tokenizer_dir = require_data("wikitext-2-raw"), require_data("gpt2-tokenizer")
    base = tmp_path_factory.mktemp("causal_lm_runs")
    root = base / "data"
    (root / "wikitext-2-raw").mkdir(parents=True)
    for name in ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"):
        with open(wiki / name) as src:
            lines = [next(src) for _ in range(400 if "train" in name else 120)]
        (root / "wikitext-2-raw" / name).write_text("".join(lines))
    tokenizer = load_tokenizer(str(tokenizer_dir))
    models = {}
    for family, config in CONFIGS.items():
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(config()).save_pretrained(base / "models" / family)
        tokenizer.save_pretrained(base / "models" / family)
        models[family] = base / "models" / family
    return {"data_root": root, "cache": base / "cache", "base": base, "models": models}


def cli(env, name: str, *args: str, **kw):
    return run_cli(list(args), env["base"] / name, data_root=env["data_root"], cache=env["cache"], env=OFFLINE, **kw)


@pytest.mark.parametrize("family", list(RUNS))
def test_compress_each_family_through_the_command(env, family):
    _, r = cli(env, family, *COMMON, f"model.name_or_path={env['models'][family]}", *RUNS[family])
    assert r["status"] == "ok" and r["model"] == "causal_lm" and r["mode"] == "compress"
    assert len(r["layers"]) == LAYERS[family] and {layer["rank"] for layer in r["layers"]} == {4}
    assert not any("embed" in layer["name"] or "lm_head" in layer["name"] for layer in r["layers"])
    m = r["metrics"]
    assert m["test_tokens"] == 512 - 512 // 32
    for key in ("dense_test_ppl", "compressed_test_ppl", "test_ppl"):
        assert 1 < m[key] < 10 * 50257
    cal = r["compress"]["calibration"]
    if r["compress"]["method"] != "svd":
        assert cal["by_block"] is True and cal["tokens"] == 6 * 32 and cal["memory_estimate_mib"] > 0
        assert all(0 < layer["rel_data_error"] < 1 for layer in r["layers"])
    run_dir = env["base"] / family
    for name in ("model.safetensors", "config.json", "nnsvd_layers.json", "nnsvd_meta.json", "tokenizer.json"):
        assert (run_dir / name).is_file(), name
    log = (run_dir / "run.log").read_text()
    if family == "llama":
        penalties = [h["train/penalty"] for h in r["history"]["finetune"] if "train/penalty" in h]
        assert len(penalties) == 2 and min(penalties) > 0 and "finetuned_test_ppl" in m
        assert "4 distinct inputs for 7 targets" in log  # q/k/v share one Gram, gate/up another
    if family == "qwen2":
        assert json.loads((run_dir / "config.json").read_text())["dtype"] == "bfloat16"
    if family == "opt":
        assert "each calibrated on the compressed blocks before it" in log


def test_checkpoint_alone_reloads_a_causal_lm_run(env):
    """checkpoint=DIR needs nothing else: model=causal_lm and data=text_files from its run; the same perplexity."""
    source = env["base"] / "llama"
    if not (source / "results.json").is_file():
        cli(env, "llama", *COMMON, f"model.name_or_path={env['models']['llama']}", *RUNS["llama"])
    made = json.loads((source / "results.json").read_text())
    _, r = cli(env, "reload", f"checkpoint={source}")  # evaluated as its run was (eval.* of its config)
    assert r["status"] == "ok" and {"model=causal_lm", "data=text_files"} <= set(r["overrides"])
    assert (r["flow"], r["mode"], r["rank"], r["from_checkpoint"]["kind"]) == ("evaluate", "compress", 4, "causal_lm")
    assert r["eval_from"].endswith("config.yaml") and r["metrics"]["test_tokens"] == made["metrics"]["test_tokens"]
    assert r["metrics"]["test_ppl"] == made["metrics"]["test_ppl"]  # the same settings: exactly the same
    assert r["params"]["total"] == made["params"]["total"]


@pytest.mark.parametrize(("args", "match"), [
    (["model.dtype=float64"], "model.dtype=float64 is not allowed: allowed float32, bfloat16, float16"),
    ([], "model=causal_lm needs model.name_or_path"),
    (["model.name_or_path=PHI"],
     "model.targets=null, but model type 'phi' has no default targets (defaults exist for gemma, gpt2, gpt_neox, "
     "llama, mistral, opt, qwen2, qwen3): set model.targets to the layers to compress; its Linear layers are "
     "model.layers.*.self_attn.q_proj, "),
    (["model.name_or_path=CUSTOM"], "needs the custom code of its repository (trust_remote_code)"),
    (["model.name_or_path=LLAMA", "model.targets=[lm_head]", "compress.method=whiten"],
     "target 'lm_head' lies outside the decoder blocks (model.layers.N.…)"),
    (["model.name_or_path=LLAMA", "compress.method=svd", "compress.update=block"],
     "compress.update=block starts from a calibrated closed form: use a data-aware compress.method"),
    (["model.name_or_path=LLAMA", "compress.method=whiten", "compress.update=block", "calibration.samples=4",
      "calibration.batch_size=4"], "calibration.samples=4 with calibration.batch_size=4 makes 1; make at least 2"),
    (["model.name_or_path=LLAMA", "compress.method=whiten", "compress.update=block", "compress.update_holdout=1.5"],
     "compress.update_holdout=1.5 must lie in (0, 1)"),
])
def test_bad_input_fails_with_one_line(env, args, match, tmp_path):
    custom = env["base"] / "models" / "custom"
    custom.mkdir(exist_ok=True)
    (custom / "config.json").write_text(json.dumps({"model_type": "nnsvd_custom", "auto_map": {
        "AutoConfig": "configuration_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}}))
    paths = {"PHI": env["models"]["phi"], "CUSTOM": custom, "LLAMA": env["models"]["llama"]}
    args = [a.split("=")[0] + "=" + str(paths.get(a.split("=", 1)[1], a.split("=", 1)[1])) for a in args]
    proc, r = run_cli(["model=causal_lm", "data=text_files", "rank=4", *args], tmp_path / "run",
                      data_root=env["data_root"], cache=tmp_path / "cache", env=OFFLINE, check=False)
    out = proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and len(errors) == 1 and match in errors[0], out
    assert "Traceback" not in out
    assert r["status"] == "failed" and match in r["error"]
    assert not (tmp_path / "cache" / "datasets").exists()  # it failed before any data was read


@pytest.mark.parametrize(("allocation", "extra"), [("spectrum", []), ("sensitivity", ["calibration.sequential=true"])])
def test_ratio_allocates_ranks_of_a_causal_lm_and_reloads(env, allocation, extra):
    """compress.ratio on a language model: the budget met over the block targets, ranks that differ
    per layer, and checkpoint=DIR the same perplexity."""
    name = f"llama_ratio_{allocation}"
    args = [a for a in COMMON if a != "rank=4"]
    _, r = cli(env, name, *args, f"model.name_or_path={env['models']['llama']}", "compress.method=whiten",
               "compress.ratio=0.5", f"compress.allocation={allocation}", *extra)
    b = r["compress"]["budget"]
    ranks = b["ranks"]
    weights = {layer["name"]: tuple(map(int, layer["shape"].split("x"))) for layer in r["layers"]}
    kept = sum(rank * (out + inp) for name, rank in ranks.items() for out, inp in [weights[name]])
    total = sum(out * inp for out, inp in weights.values())
    assert b["removed_targets"] == pytest.approx(1 - kept / total) and b["removed_targets"] >= 0.5
    assert len(ranks) == LAYERS["llama"] and len(set(ranks.values())) > 1 and b["allocation"] == allocation
    # the spectrum allocation read every target's statistics at once, and factorizes from them; sequential
    # calibration then goes block by block on the compressed blocks before each
    assert r["compress"]["calibration"]["by_block"] is bool(extra)
    # evaluated with the source run's eval.* (eval.batch_size=8 among them), so the perplexity is exactly its
    _, again = cli(env, name + "_reload", f"checkpoint={env['base'] / name}")
    assert again["metrics"]["test_ppl"] == r["metrics"]["test_ppl"]
    assert {layer["name"]: layer["rank"] for layer in again["layers"]} == ranks


def test_sigterm_after_training_stops_at_once_and_resume_does_not_train_again(env, tmp_path):
    """A stop outside training ends the run where it is (here: evaluating the fine-tuned model,
    on the whole real test file), never as ok; resume=true keeps the finished fine-tuning."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    root = tmp_path / "data"
    (root / "wikitext-2-raw").mkdir(parents=True)
    for name in ("wiki.train.raw", "wiki.valid.raw"):
        (root / "wikitext-2-raw" / name).symlink_to(env["data_root"] / "wikitext-2-raw" / name)
    (root / "wikitext-2-raw" / "wiki.test.raw").symlink_to(require_data("wikitext-2-raw", "wiki.test.raw"))
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    args = [*COMMON, f"model.name_or_path={env['models']['llama']}", "finetune.steps=2", "eval.max_tokens=8192",
            "eval.validation=false"]
    cmd = [sys.executable, str(REPO / "run.py"), *args, f"hydra.run.dir={run_dir}", f"cache.dir={cache}",
           "wandb.mode=disabled"]
    environ = {**os.environ, **OFFLINE, "NNSVD_DATA_ROOT": str(root), "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = run_dir / "run.log"
    while proc.poll() is None and not (log.exists() and "finetune step=2 val/ppl" in log.read_text()):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate()
    assert proc.returncode != 0, out
    interrupted = json.loads((run_dir / "results.json").read_text())
    assert interrupted["status"] == "interrupted"
    assert "SIGTERM received while evaluating the fine-tuned model: stopped there" in interrupted["error"]
    assert "finetuned_test_ppl" not in interrupted["metrics"] and interrupted["checkpoint"] is None
    text = log.read_text()
    assert "stopping at the next epoch" not in text  # not training: it stopped at once
    assert "interrupted: SIGTERM received while evaluating the fine-tuned model" in text.splitlines()[-1]
    assert (run_dir / "interrupted" / "trainer.pt").is_file()  # the finished fine-tuning is kept

    _, resumed = run_cli([*args, "resume=true"], run_dir, data_root=root, cache=cache, env=OFFLINE)
    assert resumed["status"] == "ok" and "finetuned_test_ppl" in resumed["metrics"]
    text = log.read_text().split("finetune training had finished before the stop")
    assert len(text) == 2 and "finetune step=" not in text[1]  # redone: the evaluation, not the training
    assert resumed["history"]["finetune"] == interrupted["history"]["finetune"]
    assert not (run_dir / "interrupted").exists()


def test_block_update_and_loss_allocation_run_end_to_end_and_share_the_statistics(env):
    """The new rows through run.py: the loss allocation meets the budget and stores the dense statistics,
    which a second ratio reads back instead of calibrating; the block update never ends worse on its
    held-out batch, and its checkpoint reloads to the same perplexity."""
    # 8 calibration samples: batches no other test here uses, so the first run measures its statistics
    args = [a for a in COMMON if a not in ("rank=4", "calibration.samples=6")] + [
        f"model.name_or_path={env['models']['llama']}", "calibration.samples=8"]
    _, loss = cli(env, "llama_loss", *args, "+recipe=whiten_loss", "compress.ratio=0.5")
    b = loss["compress"]["budget"]
    assert loss["status"] == "ok" and b["allocation"] == "loss" and b["removed_targets"] >= 0.5
    assert loss["compress"]["calibration"]["statistics_cached"] is False
    _, again = cli(env, "llama_loss_40", *args, "+recipe=whiten_loss", "compress.ratio=0.4")
    assert again["compress"]["calibration"]["statistics_cached"] is True
    assert "calibration statistics of 14 target layers from the cache" in (env["base"] / "llama_loss_40" / "run.log").read_text()
    assert again["compress"]["budget"]["removed_targets"] >= 0.4

    _, r = cli(env, "llama_block", *args, "+recipe=whiten_block", "compress.ratio=0.5", "compress.update_steps=4",
               "compress.update_eval_every=2")
    update = r["compress"]["update"]
    assert r["status"] == "ok" and update["method"] == "block" and update["steps"] == 4
    assert [blk["block"] for blk in update["blocks"]] == [0, 1]
    assert all(blk["holdout_best"] <= blk["holdout_start"] for blk in update["blocks"])
    assert r["compress"]["calibration"]["sequential"] is True and r["compress"]["budget"]["removed_targets"] >= 0.5
    _, reload = cli(env, "llama_block_reload", f"checkpoint={env['base'] / 'llama_block'}")
    assert reload["metrics"]["test_ppl"] == r["metrics"]["test_ppl"]


def test_alternating_update_runs_end_to_end_and_reloads(env):
    """compress.update=alternating through run.py: every block's held-out output error at most its closed
    form's, each layer's best round recorded, and the checkpoint reloads to the same perplexity."""
    args = [a for a in COMMON if a not in ("rank=4", "calibration.samples=6")] + [
        f"model.name_or_path={env['models']['llama']}", "calibration.samples=8"]
    _, r = cli(env, "llama_alternating", *args, "+recipe=whiten_alternating", "compress.ratio=0.5",
               "compress.update_steps=3")
    update = r["compress"]["update"]
    assert r["status"] == "ok" and update["method"] == "alternating" and update["steps"] == 3
    assert [blk["block"] for blk in update["blocks"]] == [0, 1]
    assert all(blk["holdout_best"] <= blk["holdout_start"] for blk in update["blocks"])
    assert all(len(blk["layers"]) == 7 for blk in update["blocks"])
    _, reload = cli(env, "llama_alternating_reload", f"checkpoint={env['base'] / 'llama_alternating'}")
    assert reload["metrics"]["test_ppl"] == r["metrics"]["test_ppl"]

"""End-to-end `python run.py model=gpt2 ...` on tiny GPT-2s, offline, with data=text_files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import interrupt_and_resume, no_network, require_data, run_cli

pytestmark = pytest.mark.slow

TINY = [
    "model=gpt2_tiny",
    "model.config.n_layer=1",
    "model.config.n_embd=32",
    "model.config.n_head=2",
    "model.config.n_positions=64",
    "model.sample_tokens=5",
    "train.steps=4",
    "train.batch_size=4",
    "train.seq_len=32",
    "train.eval_every=2",
    "train.warmup_steps=1",
    "finetune.seq_len=32",
    "finetune.batch_size=4",
    "eval.max_length=32",
    "eval.stride=32",
    "eval.max_tokens=512",
    "eval.batch_size=8",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A data.root with the first lines of the real WikiText-2 files and the real tokenizer."""
    wiki, tokenizer = require_data("wikitext-2-raw"), require_data("gpt2-tokenizer")
    base = tmp_path_factory.mktemp("gpt2_runs")
    root = base / "data"
    (root / "wikitext-2-raw").mkdir(parents=True)
    for name in ("wiki.train.raw", "wiki.valid.raw", "wiki.test.raw"):
        with open(wiki / name) as src:
            lines = [next(src) for _ in range(600 if "train" in name else 150)]
        (root / "wikitext-2-raw" / name).write_text("".join(lines))
    (root / "gpt2-tokenizer").symlink_to(tokenizer)
    return {"data_root": root, "cache": base / "cache", "base": base}


def cli(where, name: str, *args: str, **kw):
    return run_cli([*TINY, *args], where["base"] / name, data_root=where["data_root"], cache=where["cache"], **kw)


def test_dense_trains_and_reports_perplexity(env):
    _, r = cli(env, "dense")
    assert r["status"] == "ok" and r["model"] == "gpt2" and r["mode"] == "dense"
    m = r["metrics"]
    assert 1 < m["test_ppl"] < 50257 and 1 < m["val_ppl"] < 50257
    assert m["test_tokens"] == m["val_tokens"] == 512 - 512 // 32  # stride = max_length: a window's first token is context
    assert [h["step"] for h in r["history"]["dense"] if "val/ppl" in h] == [2, 4]
    assert isinstance(r["sample"], str) and r["sample"].startswith("The meaning of low-rank compression is")
    run_dir = env["base"] / "dense"
    for name in ("model.safetensors", "config.json", "nnsvd_layers.json", "tokenizer.json"):
        assert (run_dir / name).is_file(), name


@pytest.fixture(scope="module")
def compressed(env):
    _, r = cli(env, "compress", "rank=4", "finetune.steps=2", "regularizer=symmetric", "regularizer.alpha=1e-3")
    return env["base"] / "compress", r


OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # any Hub call fails at once


def test_compress_finetune_with_symmetric_penalty(env, compressed):
    _, r = compressed
    assert r["status"] == "ok" and r["dense_source"].startswith(("trained", "cache"))
    forms = {layer["name"]: layer["form"] for layer in r["layers"]}
    assert forms == {
        "transformer.h.0.attn.c_attn": "lowrank",
        "transformer.h.0.attn.c_proj": "symmetric",
        "transformer.h.0.mlp.c_fc": "lowrank",
        "transformer.h.0.mlp.c_proj": "lowrank",
    }
    assert {layer["shape"] for layer in r["layers"]} == {"96x32", "32x32", "128x32", "32x128"}  # out x in
    m = r["metrics"]
    assert {"dense_test_ppl", "compressed_test_ppl", "finetuned_test_ppl"} <= m.keys()
    assert m["test_ppl"] == m["finetuned_test_ppl"]
    assert r["params"]["compression_ratio"] < 1 and r["bound"] is None
    assert r["history"]["finetune"][0]["train/penalty"] > 0

    # the saved directory reloads outside the suite with identical logits, and generates
    from nnsvd.models.gpt2 import load_compressed

    model, tokenizer = load_compressed(env["base"] / "compress")
    layers = json.loads((env["base"] / "compress" / "nnsvd_layers.json").read_text())
    assert sorted((x["name"], x["rank"]) for x in layers) == sorted((n, 4) for n in forms)
    ids = tokenizer("Valkyria Chronicles", return_tensors="pt").input_ids
    again, _ = load_compressed(env["base"] / "compress")
    with torch.inference_mode():
        assert torch.equal(model(ids).logits, again(ids).logits)
    assert model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=50256).shape[1] == ids.shape[1] + 3

    # checkpoint= reloads it in the suite: same perplexity, labelled as what it is
    _, again_r = cli(env, "reload", f"checkpoint={env['base'] / 'compress'}")
    assert again_r["status"] == "ok" and again_r["metrics"]["test_ppl"] == m["test_ppl"]
    assert (again_r["flow"], again_r["mode"], again_r["rank"]) == ("evaluate", "compress", 4)
    assert again_r["regularizer"]["label"] == "symmetric+orthonormal"
    assert {x["name"]: x["form"] for x in again_r["layers"]} == forms
    meta = json.loads((env["base"] / "compress" / "nnsvd_meta.json").read_text())
    assert (meta["mode"], meta["rank"], meta["method"]) == ("compress", 4, "auto")


def test_checkpoint_alone_reloads_a_gpt2_run_directory(env, compressed, tmp_path):
    """checkpoint=DIR needs nothing else: model=gpt2_tiny and data=text_files come from DIR's run,
    the architecture, tokenizer and lengths from its files; no Hub call (offline mode would refuse it)."""
    src, r = compressed
    kw = {"data_root": env["data_root"], "cache": env["cache"], "env": OFFLINE}
    _, alone = run_cli([f"checkpoint={src}"], tmp_path / "alone", **kw)
    assert alone["status"] == "ok" and {"model=gpt2_tiny", "data=text_files"} <= set(alone["overrides"])
    assert (alone["model"], alone["mode"], alone["rank"]) == ("gpt2", "compress", 4)
    assert alone["params"]["total"] == r["params"]["total"]
    # the evaluation settings of the run that made it (not the preset's: every test token, windows of 64)
    assert alone["metrics"]["test_tokens"] == r["metrics"]["test_tokens"] and alone["eval_from"].endswith("config.yaml")
    assert alone["metrics"]["test_ppl"] == r["metrics"]["test_ppl"]

    # model=gpt2 (pretrained from the Hub by default) takes the directory's tokenizer and config
    _, pretrained = run_cli([f"checkpoint={src}", "model=gpt2", "eval.max_length=32", "eval.stride=32",
                                    "eval.max_tokens=512"], tmp_path / "gpt2", **kw)
    assert pretrained["status"] == "ok"
    assert pretrained["metrics"]["test_ppl"] == r["metrics"]["test_ppl"]  # eval.batch_size=8 from the source run


def test_checkpoint_of_the_other_kind_is_refused_in_one_line(env, compressed):
    src, _ = compressed
    proc, r = run_cli([f"checkpoint={src}", "model=mlp"], env["base"] / "bad_kind", data_root=env["data_root"],
                      cache=env["cache"], check=False)
    match = f"checkpoint={src} holds a GPT-2 (config.json + nnsvd_layers.json) checkpoint, but model=mlp builds an MLP"
    assert proc.returncode != 0 and match in proc.stderr.splitlines()[-1], proc.stderr
    assert r["status"] == "failed" and match in r["error"]


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        ("weights", "model.safetensors is unreadable or corrupt"),
        ("layers", "nnsvd_layers.json is unreadable or corrupt"),
        ("no_layers", "is not a checkpoint written by nn-svd"),
        ("no_weights", "has no model.safetensors"),
    ],
)
def test_bad_gpt2_checkpoint_fails_before_any_data_is_read(env, compressed, tmp_path, damage, match):
    src, _ = compressed
    bad = tmp_path / "bad"
    shutil.copytree(src, bad, ignore=shutil.ignore_patterns(".hydra", "wandb"))
    if damage == "weights":
        (bad / "model.safetensors").write_bytes(b"\x00" * 64)
    elif damage == "layers":
        (bad / "nnsvd_layers.json").write_text("[{")
    else:
        (bad / ("nnsvd_layers.json" if damage == "no_layers" else "model.safetensors")).unlink()
    cache = tmp_path / "cache"
    proc, r = run_cli(["model=gpt2_tiny", f"checkpoint={bad}"], tmp_path / "run", data_root=env["data_root"],
                      cache=cache, env=OFFLINE, check=False)
    assert proc.returncode != 0 and match in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert r["status"] == "failed" and match in r["error"]
    assert not (cache / "datasets").exists()  # nothing was tokenized


def test_sequence_lengths_follow_the_model(env):
    """model=gpt2 at random init with n_positions=64: the default seq_len (null) trains on 64 tokens."""
    args = ["model=gpt2", "data=text_files", "model.pretrained=false",
            f"model.tokenizer={env['data_root'] / 'gpt2-tokenizer'}", "model.config.n_layer=1",
            "model.config.n_embd=32", "model.config.n_head=2", "model.config.n_positions=64", "model.sample_tokens=2",
            "train.steps=2", "train.batch_size=2", "train.warmup_steps=1", "eval.max_tokens=256", "eval.batch_size=8"]
    run_dir = env["base"] / "seq_null"
    _, r = run_cli(args, run_dir, data_root=env["data_root"], cache=env["cache"],
                   env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert r["status"] == "ok" and r["metrics"]["test_tokens"] == 256 - 256 // 64
    assert "dense: 2 sequences of 64 tokens a step" in (run_dir / "run.log").read_text()


@pytest.mark.parametrize(("method", "extra"), [("asvd", []), ("whiten", []), ("fwsvd", []),
                                              ("whiten", ["calibration.sequential=true", "model.config.n_layer=2"])])
def test_data_aware_methods_calibrate_on_the_train_stream(env, method, extra):
    _, r = cli(env, f"{method}{len(extra)}", "rank=4", f"compress.method={method}", "calibration.samples=6",
               "calibration.batch_size=4", *extra)
    assert r["status"] == "ok"
    cal = r["compress"]["calibration"]
    assert r["compress"]["method"] == method and cal["split"] == "train"
    assert cal["seq_len"] == 32 and cal["tokens"] == 6 * 32  # null resolved to the eval window (eval.max_length)
    assert len(r["layers"]) == (8 if extra else 4)
    for layer in r["layers"]:
        assert layer["calib_tokens"] == 6 * 32 and 0 < layer["rel_data_error"] < 1
    if extra:
        assert "in 2 stage(s)" in (env["base"] / f"{method}{len(extra)}" / "run.log").read_text()
    m = r["metrics"]
    assert 1 < m["compressed_test_ppl"] < 50257 and m["dense_test_ppl"] > 1


def test_scratch_trains_factorized_gpt2(env):
    _, r = cli(env, "scratch", "mode=scratch", "rank=4", "regularizer=orthonormal")
    assert r["status"] == "ok" and r["mode"] == "scratch" and len(r["layers"]) == 4
    assert r["metrics"]["test_ppl"] < 50257
    assert r["params"]["targets"] < r["params"]["dense_targets"]


def test_sigterm_during_gpt2_training_resumes_to_identical_results(env, tmp_path):
    args = [*TINY, "mode=scratch", "rank=4", "train.steps=30", "train.eval_every=10"]
    interrupted, resumed, straight = interrupt_and_resume(
        args, tmp_path, "scratch step=3", data_root=env["data_root"], cache=env["cache"])
    assert interrupted["status"] == "interrupted" and "steps" in interrupted["error"]
    done = max(h["step"] for h in interrupted["history"]["scratch"])
    assert 3 <= done < 30
    assert f"resuming scratch training after steps {done}" in (tmp_path / "interrupted" / "run.log").read_text()
    assert resumed["status"] == "ok"
    assert resumed["metrics"] == straight["metrics"]
    assert resumed["history"] == straight["history"]


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["eval.stride=64"], "eval.stride=64 is out of range: allowed 1 ≤ eval.stride ≤ eval.max_length (32)"),
        (["eval.stride=0"], "eval.stride=0 is out of range: allowed 1 ≤ eval.stride ≤ eval.max_length (32)"),
        (["eval.max_length=65"], "eval.max_length=65 is out of range: allowed 2 ≤ eval.max_length ≤ 64"),
        (["train.seq_len=128"], "train.seq_len=128 is out of range: allowed 1 ≤ train.seq_len ≤ 64"),
        (["train.seq_len=128", "finetune.seq_len=128"], "train.seq_len=128 is out of range"),  # equal values
        (["finetune.seq_len=65"], "finetune.seq_len=65 is out of range: allowed 1 ≤ finetune.seq_len ≤ 64"),
        (["train.seq_len=0"], "train.seq_len=0 is out of range"),
        (["rank=16"], "layer 'transformer.h.0.attn.c_proj' of shape 32×32 (low-rank form): allowed 1 ≤ rank ≤ 15"),
        (["rank=4", "compress.method=whiten", "calibration.seq_len=65"],
         "calibration.seq_len=65 is out of range: allowed 1 ≤ calibration.seq_len ≤ 64"),
        (["data.train_file=/nope/train.txt"], "data.train_file: no such file: /nope/train.txt"),
        (["model.pretrained=true", "model.name_or_path=not-a-model-xyz"],
         "could not load GPT-2 model 'not-a-model-xyz': HF_HUB_OFFLINE is set and it is not in the local"),
    ],
)
def test_bad_input_fails_with_one_line(env, args, match):
    name = "bad_" + str(abs(hash(tuple(args))))
    proc, r = cli(env, name, *args, check=False, env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and match in out, out
    assert "Traceback" not in out
    assert r["status"] == "failed" and match in r["error"]
    assert not (Path(env["base"]) / name / "model.safetensors").exists()


@pytest.mark.parametrize("args", [["model=gpt2"], ["model=gpt2_tiny", "data=wikitext2"]])
def test_unreachable_hub_fails_at_once_with_one_line(env, tmp_path, args):
    """No network at all (not just HF_HUB_OFFLINE): one probe, then one error line, no retry warnings."""
    no_offline = {"HF_HUB_OFFLINE": None, "TRANSFORMERS_OFFLINE": None, "HF_DATASETS_OFFLINE": None,
                  "HF_HOME": str(tmp_path / "hf")}  # an empty Hugging Face cache
    proc, r = run_cli(args, tmp_path / "run", data_root=env["data_root"], cache=tmp_path / "cache", env=no_offline,
                      prefix=no_network(), check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Retrying" not in out and "thrown while requesting" not in out, out
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, proc.stderr
    assert "Hub (https://huggingface.co) is unreachable" in errors[0] and "; run directory " in errors[0]
    assert r["status"] == "failed" and "is unreachable" in r["error"]

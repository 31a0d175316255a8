"""model=smollm2: the real pretrained SmolLM2-135M-Instruct from its GGUF file (NNSVD_TEST_DATA/smollm2),
offline, through run.py, against the stock Hugging Face model and an independent perplexity loop."""

from __future__ import annotations

import json
import math
import struct

import pytest
import torch
from conftest import require_data, run_cli

from nnsvd.models import causal_lm, gguf

pytestmark = pytest.mark.slow

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
SLICE = ["eval.max_length=256", "eval.max_tokens=1024"]  # 4 windows of 256 tokens: seconds, not minutes
SMALL_CALIBRATION = ["calibration.samples=4", "calibration.seq_len=null", "calibration.batch_size=4"]
# Blocks 0-9 only (70 of the 210 targets): the comparison holds there, at a third of the factorizations' time.
TEN_BLOCKS = "model.targets=['model.layers.?.self_attn.*_proj','model.layers.?.mlp.*_proj']"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A data.root with the GGUF file and the real WikiText-2 files (links), a cache, and the stock model:
    transformers' own GGUF load, which also fills the cache's dequantized copy that run.py then reads."""
    model_dir, wiki = require_data("smollm2"), require_data("wikitext-2-raw")
    if not (model_dir / GGUF_FILE).is_file():
        pytest.skip(f"{model_dir / GGUF_FILE} not found: set NNSVD_TEST_DATA to the offline data folder")
    base = tmp_path_factory.mktemp("smollm2")
    root = base / "data"
    root.mkdir()
    (root / "smollm2").symlink_to(model_dir)
    (root / "wikitext-2-raw").symlink_to(wiki)
    cache = base / "cache"
    model, tokenizer = causal_lm.load_gguf(gguf.GGUFSource(str(model_dir), GGUF_FILE), "float32", cache)
    return {"root": root, "cache": cache, "base": base, "model": model, "tokenizer": tokenizer, "wiki": wiki}


def cli(env, name: str, *args: str, **kw):
    return run_cli(["model=smollm2", *args], env["base"] / name, data_root=env["root"], cache=env["cache"],
                   env=OFFLINE, **kw)


def test_the_gguf_file_loads_as_smollm2(env):
    model, tokenizer = env["model"], env["tokenizer"]
    c = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and c.model_type == "llama"
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size) == (30, 576, 1536)
    assert (c.num_attention_heads, c.num_key_value_heads, c.vocab_size) == (9, 3, 49152)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008  # tied embeddings counted once
    assert getattr(c, "quantization_config", None) is None  # dequantized: an ordinary float32 model
    text = "The capital of France is Paris. Low-rank factors: W ≈ U·Σ·Vᵀ."
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids) == text and len(ids) < len(text) // 2
    assert gguf.gguf_architecture(require_data("smollm2", GGUF_FILE)) == "llama"


def test_the_dequantized_copy_equals_the_gguf_load(env):
    """run.py reads the cache's safetensors copy: tensor for tensor the model transformers dequantized."""
    (entry,) = [p for p in (env["cache"] / "gguf").iterdir() if p.is_dir()]
    copy, tokenizer = causal_lm.load_compressed(entry)
    stock = env["model"].state_dict()
    assert copy.state_dict().keys() == stock.keys()
    assert all(torch.equal(copy.state_dict()[k], stock[k]) for k in stock)
    assert tokenizer("Hello world").input_ids == env["tokenizer"]("Hello world").input_ids
    assert "quantization_config" not in json.loads((entry / "config.json").read_text())


def independent_perplexity(model, tokenizer, test_file, max_length: int, max_tokens: int) -> float:
    """The Hugging Face guide's loop, written out: every line tokenized, the stream cut to max_tokens,
    disjoint windows, the model's own shifted loss (labels = inputs) weighted by the tokens it scores."""
    with open(test_file) as f:
        ids = [i for line in f.read().splitlines(keepends=True) for i in tokenizer(line).input_ids][:max_tokens]
    nll, count = 0.0, 0
    with torch.no_grad():
        for begin in range(0, len(ids), max_length):
            window = torch.tensor([ids[begin:begin + max_length]])
            if window.shape[1] < 2:
                continue
            loss = model(input_ids=window, labels=window, use_cache=False).loss
            nll += float(loss) * (window.shape[1] - 1)
            count += window.shape[1] - 1
    return math.exp(nll / count)


@pytest.fixture(scope="module")
def dense(env):
    _, r = cli(env, "dense", *SLICE)
    return r


def test_dense_perplexity_equals_an_independent_loop(env, dense):
    assert dense["status"] == "ok" and dense["mode"] == "dense"
    assert GGUF_FILE in dense["weights"] and "dequantized to float32" in dense["weights"]
    expected = independent_perplexity(env["model"], env["tokenizer"], env["wiki"] / "wiki.test.raw", 256, 1024)
    assert dense["metrics"]["test_ppl"] == pytest.approx(expected, rel=1e-4)
    assert dense["metrics"]["test_tokens"] == 1024 - 4 and "val_ppl" not in dense["metrics"]  # eval.validation=false
    assert dense["sample"].startswith("The capital of France is")
    log = (env["base"] / "dense" / "run.log").read_text()
    assert "evaluating test: 4 windows done" in log and "its dequantized copy" in log


@pytest.fixture(scope="module")
def whitened(env, dense):
    _, r = cli(env, "whiten", *SLICE, *SMALL_CALIBRATION, TEN_BLOCKS, "compress.method=whiten", "compress.ratio=0.2")
    return r


def test_whitening_beats_plain_svd_and_reloads_exactly(env, dense, whitened):
    _, svd = cli(env, "svd", *SLICE, TEN_BLOCKS, "compress.method=svd", "compress.ratio=0.2")
    w, m = whitened, whitened["metrics"]
    assert w["status"] == svd["status"] == "ok"
    assert math.isfinite(m["test_ppl"]) and dense["metrics"]["test_ppl"] < m["test_ppl"] < svd["metrics"]["test_ppl"]
    # both measured the dense model on the same slice; the second job read it from the dense cache
    assert m["dense_test_ppl"] == svd["metrics"]["dense_test_ppl"] == dense["metrics"]["test_ppl"]
    assert "dense metrics from the cache" in (env["base"] / "svd" / "run.log").read_text()
    assert len(w["layers"]) == 70 and w["compress"]["budget"]["removed_targets"] >= 0.2
    cal = w["compress"]["calibration"]
    assert cal["seq_len"] == 256 and cal["tokens"] == 4 * 256 and cal["by_block"]  # null resolved, and recorded
    run_dir = env["base"] / "whiten"
    assert (run_dir / "layers.txt").read_text().count("model.layers.") == 70  # the full table is in the run directory
    out_lines = (run_dir / "run.log").read_text().splitlines()
    assert max(map(len, out_lines)) < 400  # no line lists every layer's rank
    # checkpoint=DIR: the source run's evaluation settings (not the preset's 2048-token windows), the same
    # perplexity, and no second copy of the model
    _, again = run_cli([f"checkpoint={run_dir}"], env["base"] / "reload", data_root=env["root"], cache=env["cache"],
                       env=OFFLINE)
    assert again["status"] == "ok" and again["flow"] == "evaluate"
    assert again["metrics"]["test_ppl"] == m["test_ppl"] and again["metrics"]["test_tokens"] == m["test_tokens"]
    assert again["eval_from"].endswith(".hydra/config.yaml") and again["checkpoint"] is None
    assert not (env["base"] / "reload" / "model.safetensors").exists()
    # the saved directory is an ordinary causal-LM checkpoint, with identical logits on reload
    model, _ = causal_lm.load_compressed(run_dir)
    config = json.loads((run_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "nnsvd"
    assert config["nnsvd_base_model_type"] == "llama" and len(config["nnsvd_layers"]) == 70
    ids = env["tokenizer"]("The capital of France is", return_tensors="pt").input_ids
    twice, _ = causal_lm.load_compressed(run_dir)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, twice(ids).logits)


def test_the_compressed_smollm2_opens_in_plain_transformers_without_nnsvd(env, whitened, tmp_path):
    """The run directory through AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True) in an
    interpreter that cannot import nnsvd: the same logits and the same greedy continuation, bit for bit."""
    from safetensors.torch import save_file
    from test_hf_remote import run_isolated

    run_dir = env["base"] / "whiten"
    ours, _ = causal_lm.load_compressed(run_dir)
    ids = env["tokenizer"]("The capital of France is known for", return_tensors="pt").input_ids
    out = tmp_path / "out"
    out.mkdir()
    save_file({"ids": ids}, out / "ids.safetensors")
    [(report, theirs)] = run_isolated([(run_dir, out)], tmp_path)
    assert report["nnsvd_loaded"] is False and report["class"] == "LlamaForCausalLM"
    assert "trust_remote_code" in report["plain"]  # without it: an error, not random weights
    with torch.no_grad():
        assert torch.equal(theirs["logits"], ours(ids).logits)
        generated = ours.generate(ids[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(theirs["generated"], generated)


def gguf_header(architecture: str) -> bytes:
    """A GGUF file's start: magic, version 3, no tensors, one key (general.architecture)."""
    key, value = b"general.architecture", architecture.encode()
    return (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", len(key)) + key
            + struct.pack("<I", 8) + struct.pack("<Q", len(value)) + value)


@pytest.mark.parametrize(("make", "match"), [
    (None, "model.gguf_file=missing.gguf: no such file in"),
    (b"not a gguf file at all", "is not a readable GGUF file (it does not start with the GGUF magic bytes)"),
    (gguf_header("mamba9"), "holds a GGUF model of architecture 'mamba9', which transformers cannot read from GGUF"),
])
def test_bad_gguf_files_fail_in_one_line_before_any_data(env, tmp_path, make, match):
    folder = tmp_path / "models"
    folder.mkdir()
    name = "missing.gguf"
    if make is not None:
        name = "bad.gguf"
        (folder / name).write_bytes(make)
    proc, r = run_cli(["model=smollm2", f"model.name_or_path={folder}", f"model.gguf_file={name}",
                       "model.fallback=null"], tmp_path / "run", data_root=env["root"], cache=tmp_path / "cache",
                      env=OFFLINE, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(errors) == 1 and match in errors[0], proc.stdout + proc.stderr
    assert r["status"] == "failed" and match in r["error"]
    assert not (tmp_path / "cache").exists()  # nothing was read or converted


def test_a_missing_gguf_file_falls_back_to_the_hub_model_and_says_so(env, tmp_path):
    proc, r = run_cli(["model=smollm2", f"model.name_or_path={tmp_path}"], tmp_path / "run", data_root=env["root"],
                      cache=tmp_path / "cache", env=OFFLINE, check=False)
    assert "using model.fallback=HuggingFaceTB/SmolLM2-135M-Instruct instead" in proc.stderr
    assert r["weights"].startswith("HuggingFaceTB/SmolLM2-135M-Instruct (model.fallback:")
    # offline, the Hub model is not to be had: one line that names it
    assert proc.returncode == 1 and "could not load model 'HuggingFaceTB/SmolLM2-135M-Instruct'" in r["error"]


def test_an_evaluation_that_cannot_fit_in_memory_is_refused_before_it_starts(env, tmp_path):
    proc, r = cli(env, "too_big", "eval.max_length=8192", "eval.batch_size=512", check=False)
    assert proc.returncode == 1 and "eval.batch_size=512 with eval.max_length=8192 needs about" in r["error"]
    assert "lower eval.batch_size or eval.max_length" in r["error"] and r["metrics"] == {}


def test_a_rank_too_large_names_the_binding_layer_and_the_largest_rank_all_accept(env):
    """rank=700: not q_proj's limit (287) and then k_proj's (143) one run after another, but 143 at once."""
    proc, r = cli(env, "rank_700", "rank=700", check=False)
    assert proc.returncode == 1 and r["metrics"] == {}
    assert ("rank=700 is out of range for layer 'model.layers.0.self_attn.k_proj' of shape 192×576 (low-rank form): "
            "allowed 1 ≤ rank ≤ 143 (larger ranks save no parameters); 143 is the largest rank that every one of the 210 "
            "targets accepts"
            ) in r["error"]


CAPITALS = [  # a small multiple-choice task from local files: question, choices, index of the answer
    ("The capital of France is", ["Paris", "Berlin", "Madrid", "Rome"], 0),
    ("The capital of Germany is", ["Vienna", "Berlin", "Oslo", "Lisbon"], 1),
    ("The capital of Italy is", ["Athens", "Dublin", "Rome", "Warsaw"], 2),
    ("The capital of Spain is", ["Prague", "Madrid", "Paris", "Bern"], 1),
    ("The capital of Japan is", ["Seoul", "Beijing", "Bangkok", "Tokyo"], 3),
    ("Water freezes at a temperature of zero degrees", ["Celsius", "meters", "volts", "grams"], 0),
    ("The largest planet in the solar system is", ["Mercury", "Mars", "Jupiter", "Venus"], 2),
    ("A week has seven", ["days", "hours", "planets", "colors"], 0),
]


def write_task(folder):
    folder.mkdir(parents=True)
    data = folder / "capitals.jsonl"
    data.write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n" for q, c, a in CAPITALS))
    (folder / "nnsvd_capitals.yaml").write_text(
        "task: nnsvd_capitals\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )


def independent_choices(model, tokenizer) -> tuple[float, float]:
    """(acc, acc_norm) by hand: Σ log p(" choice" | question) per choice, argmax (acc_norm: per byte)."""
    right = right_norm = 0
    for question, choices, answer in CAPITALS:
        context = tokenizer(question).input_ids
        scores, norms = [], []
        for choice in choices:
            whole = tokenizer(question + " " + choice).input_ids
            ids = torch.tensor([whole])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
            cont = whole[len(context):]
            total = sum(float(logp[len(context) - 1 + i, t]) for i, t in enumerate(cont))
            scores.append(total)
            norms.append(total / len((" " + choice).encode()))
        right += max(range(len(choices)), key=scores.__getitem__) == answer
        right_norm += max(range(len(choices)), key=norms.__getitem__) == answer
    return right / len(CAPITALS), right_norm / len(CAPITALS)


def test_zero_shot_tasks_run_offline_from_a_local_task_and_agree_with_an_independent_computation(env, tmp_path):
    write_task(tmp_path / "tasks")
    extra = {"HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_HOME": str(tmp_path / "hf")}
    _, r = run_cli(["model=smollm2", *SLICE, "eval.tasks=[nnsvd_capitals]", f"eval.include_path={tmp_path / 'tasks'}"],
                   tmp_path / "run", data_root=env["root"], cache=env["cache"], env={**OFFLINE, **extra})
    assert r["status"] == "ok"
    acc, acc_norm = independent_choices(env["model"], env["tokenizer"])
    assert r["metrics"]["nnsvd_capitals_acc"] == pytest.approx(acc)
    assert r["metrics"]["nnsvd_capitals_acc_norm"] == pytest.approx(acc_norm)
    assert 0.5 <= acc <= 1.0  # the pretrained model knows most of these


@pytest.mark.parametrize(("args", "match"), [
    (["eval.tasks=[no_such_task_xyz]"], "eval.tasks: unknown lm-eval task 'no_such_task_xyz'"),
    (["eval.tasks=[arc_easy]", "eval.include_path=/no/such/folder"], "eval.include_path=/no/such/folder is not a folder"),
    (["model=mlp", "eval.tasks=[arc_easy]"], "eval.tasks=['arc_easy'] scores language models"),
])
def test_a_bad_task_setting_fails_in_one_line_before_any_data(env, tmp_path, args, match):
    proc, r = run_cli(["model=smollm2", *args], tmp_path / "run", data_root=env["root"], cache=tmp_path / "cache",
                      env=OFFLINE, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode != 0 and len(errors) == 1 and match in errors[0], proc.stdout[-2000:] + proc.stderr[-2000:]
    assert r["status"] == "failed" and not (tmp_path / "cache").exists()  # nothing read, nothing loaded

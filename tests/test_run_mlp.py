"""End-to-end: `python run.py model=mlp ...` on real MNIST (copied from NNSVD_TEST_DATA)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import no_network, run_cli, wandb_config, wandb_run_record
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

QUICK = ["train.epochs=2"]


@pytest.fixture(scope="module")
def env(data_root, tmp_path_factory):
    """A private cache and output area shared by this module's runs."""
    base = tmp_path_factory.mktemp("mlp_runs")
    return {"data_root": data_root, "cache": base / "cache", "base": base}


def cli(where, name: str, *args: str, **kw):
    return run_cli(list(args), where["base"] / name, data_root=where["data_root"], cache=where["cache"], **kw)


@pytest.fixture(scope="module")
def dense_run(env):
    proc, results = cli(env, "dense", *QUICK)
    return env["base"] / "dense", proc, results


def test_dense_run_trains_evaluates_and_records_everything(dense_run):
    run_dir, proc, r = dense_run
    assert r["status"] == "ok" and r["error"] is None
    assert r["mode"] == "dense" and r["model"] == "mlp" and r["rank"] is None and r["seed"] == 42
    assert r["regularizer"] == {"name": "none", "label": "none", "symmetric": False, "alpha": 0.0, "effective": True}
    assert r["metrics"]["test_acc"] > 0.93 and r["metrics"]["val_acc"] > 0.92 and r["metrics"]["test_loss"] > 0
    assert r["params"]["total"] == r["params"]["dense_total"] == 784 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    assert r["params"]["compression_ratio"] == 1.0
    assert set(r["timing"]) >= {"train_s", "compress_s", "eval_s", "total_s"} and r["timing"]["train_s"] > 0
    assert len(r["history"]["dense"]) == 2 and "val/acc" in r["history"]["dense"][0]
    assert "trained, cached at" in r["dense_source"]
    # the model, the resolved config and the log sit beside results.json
    assert Path(r["checkpoint"]) == run_dir
    assert (run_dir / "model.safetensors").is_file() and (run_dir / "model.json").is_file()
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "run.log").is_file()
    assert "dense epoch=2" in (run_dir / "run.log").read_text()
    # the last line says where the run is and its main metric; nothing went to stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert f"ok: test_acc={r['metrics']['test_acc']:.4f} (mlp dense); run directory {run_dir}" in last
    assert proc.stderr.strip() == ""


def test_compress_reuses_the_cached_dense_model(env, dense_run):
    _, _, dense = dense_run
    proc, r = cli(env, "compress8", *QUICK, "rank=8")
    assert r["status"] == "ok" and r["mode"] == "compress"
    assert r["dense_source"].startswith("cache:")
    m = r["metrics"]
    assert m["dense_test_acc"] == dense["metrics"]["test_acc"]  # the same dense model, not retrained
    assert m["compressed_test_acc"] == m["test_acc"] and "finetuned_test_acc" not in m
    assert 0.5 < m["compressed_test_acc"] < m["dense_test_acc"]
    assert [layer["name"] for layer in r["layers"]] == ["l1", "l2"]
    assert all(layer["rank"] == 8 and layer["form"] == "lowrank" for layer in r["layers"])
    p = r["params"]
    assert p["dense_targets"] == 784 * 64 + 64 + 64 * 64 + 64
    assert p["targets"] == 8 * (784 + 64) + 64 + 8 * (64 + 64) + 64
    assert p["compression_ratio"] == pytest.approx(p["total"] / p["dense_total"])
    assert r["timing"]["train_s"] == 0.0 and r["timing"]["compress_s"] > 0
    # the robustness bound holds on every test input, and is not vacuous
    b = r["bound"]
    assert 0 < b["measured_max"] <= b["bound_max"] <= b["data_free_bound_max"]
    assert b["measured_mean"] <= b["bound_mean"] <= b["data_free_bound_mean"]


def test_compress_with_finetuning_and_symmetric_form(env, dense_run):
    proc, r = cli(env, "compress_sym_ft", *QUICK, "rank=8", "regularizer=symmetric", "regularizer.alpha=1e-3",
                  "finetune.epochs=1")
    assert r["status"] == "ok"
    assert {layer["name"]: layer["form"] for layer in r["layers"]} == {"l1": "lowrank", "l2": "symmetric"}
    m = r["metrics"]
    assert m["finetuned_test_acc"] == m["test_acc"] and m["finetuned_test_acc"] > m["compressed_test_acc"]
    assert r["regularizer"]["label"] == "symmetric+orthonormal" and r["regularizer"]["effective"] is True
    assert "train/penalty" in r["history"]["finetune"][0]


def test_orthonormal_without_finetuning_warns_and_records_no_effect(env, dense_run):
    proc, r = cli(env, "ortho_noft", *QUICK, "rank=4", "regularizer=orthonormal")
    assert r["status"] == "ok" and r["regularizer"]["effective"] is False
    assert "has no effect" in proc.stdout + proc.stderr


def test_scratch_trains_factorized_model(env):
    proc, r = cli(env, "scratch", *QUICK, "mode=scratch", "rank=8", "regularizer=symmetric")
    assert r["status"] == "ok" and r["mode"] == "scratch"
    assert {layer["name"]: layer["form"] for layer in r["layers"]} == {"l1": "lowrank", "l2": "symmetric"}
    assert r["metrics"]["test_acc"] > 0.85
    assert r["params"]["targets"] == 8 * (784 + 64) + 64 + 64 * 8 + 64


def test_checkpoint_reloads_compressed_model_with_identical_metrics(env, dense_run):
    _, r8 = cli(env, "ckpt_src", *QUICK, "rank=4", "regularizer=symmetric")
    src = Path(r8["checkpoint"])
    structure = json.loads((src / "model.json").read_text())
    assert [(x["name"], x["rank"], x["form"]) for x in structure["layers"]] == [
        ("l1", 4, "lowrank"), ("l2", 4, "symmetric")]
    assert structure["meta"]["mode"] == "compress" and structure["meta"]["method"] == "auto"
    proc, r = cli(env, "ckpt_eval", f"checkpoint={src}", "save=true", "wandb.mode=offline", env={"WANDB_MODE": None})
    assert r["status"] == "ok" and r["dense_source"] == f"checkpoint:{src}"
    assert r["metrics"]["test_acc"] == r8["metrics"]["test_acc"]
    assert r["params"]["total"] == r8["params"]["total"]
    a, b = load_file(str(src / "model.safetensors")), load_file(str(Path(r["checkpoint"]) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # labelled as what it is: a rank-4 symmetric compressed model, evaluated from that checkpoint
    assert (r["flow"], r["mode"], r["rank"], r["regularizer"]["label"]) == ("evaluate", "compress", 4, "symmetric")
    assert [(x["name"], x["rank"], x["form"], x["params_after"]) for x in r["layers"]] == [
        ("l1", 4, "lowrank", 4 * (784 + 64) + 64), ("l2", 4, "symmetric", 4 * 64 + 64)]
    source = r["from_checkpoint"]
    assert source["path"] == str(src) and source["made_in"] == str(src) and source["method"] == "auto"
    assert f"(mlp compress rank 4, evaluated from checkpoint {src})" in proc.stdout.splitlines()[-1]
    run = wandb_run_record(env["base"] / "ckpt_eval")
    assert run.display_name == "mlp-compress-r4-symmetric-s42-from-checkpoint" and run.job_type == "evaluate"
    config = wandb_config(run)
    assert (config["mode"], config["rank"], config["regularizer"]["label"]) == ("compress", 4, "symmetric")
    assert config["from_checkpoint"]["path"] == str(src)
    # its own saved copy says the same, so a reload of the reload is labelled alike
    meta = json.loads((env["base"] / "ckpt_eval" / "model.json").read_text())["meta"]
    assert (meta["mode"], meta["rank"], meta["from_checkpoint"]) == ("compress", 4, str(src))


def test_checkpoint_alone_uses_its_own_architecture(env, dense_run):
    """checkpoint=DIR needs nothing else: a model of another width than the default reloads as it is."""
    _, small = cli(env, "narrow_src", *QUICK, "model.hidden=32", "mode=scratch", "rank=4")
    proc, r = cli(env, "narrow_eval", f"checkpoint={env['base'] / 'narrow_src'}")
    assert r["status"] == "ok" and r["metrics"]["test_acc"] == small["metrics"]["test_acc"]
    assert (r["mode"], r["rank"], r["params"]["total"]) == ("scratch", 4, small["params"]["total"])


def test_model_option_must_fit_the_checkpoint(env, dense_run):
    run_dir, _, _ = dense_run
    r = _fails(env, "bad_kind", f"checkpoint={run_dir}", "model=gpt2",
               match=f"checkpoint={run_dir} holds an MLP (model.json) checkpoint, but model=gpt2 builds a GPT-2")
    assert r["status"] == "failed" and r["metrics"] == {}


def _only(pattern: str, where: Path) -> Path:
    found = list(where.glob(pattern))
    assert len(found) == 1, found
    return found[0]


def test_suite_directories_work_unquoted_as_checkpoint(env, dense_run, tmp_path):
    """The run and sweep-job directories that run.py names itself pass back as checkpoint=DIR."""
    kw = {"data_root": env["data_root"], "cache": env["cache"], "cwd": tmp_path}
    run_cli([*QUICK, "rank=4", "regularizer=symmetric", "model.targets=[l1,l2]"], None, **kw)
    source = _only("outputs/runs/*/*", tmp_path)
    assert source.name.endswith("_model.targets-l1+l2_rank-4_regularizer-symmetric_train.epochs-2")
    assert "=" not in source.name and "," not in source.name
    proc, _ = run_cli([f"checkpoint={source.relative_to(tmp_path)}"], None, **kw)
    reloaded = _only("outputs/runs/*/*_checkpoint-*", tmp_path)
    assert reloaded.name.endswith(f"_checkpoint-{source.name}")
    before, after = (json.loads((d / "results.json").read_text()) for d in (source, reloaded))
    assert after["status"] == "ok" and after["metrics"]["test_acc"] == before["metrics"]["test_acc"]

    run_cli([*QUICK, "rank=2,8"], None, multirun=True, **kw)
    job = _only("outputs/multirun/*/*/1_rank-8", tmp_path)
    proc, _ = run_cli([f"checkpoint={job}", "wandb.mode=disabled"], None, **kw)
    reloaded = _only("outputs/runs/*/*_checkpoint-1_rank-8", tmp_path)
    assert json.loads((reloaded / "results.json").read_text())["metrics"]["test_acc"] == json.loads(
        (job / "results.json").read_text())["metrics"]["test_acc"]


def test_dense_checkpoint_feeds_compress(env, dense_run):
    run_dir, _, dense = dense_run
    proc, r = cli(env, "ckpt_compress", f"checkpoint={run_dir}", "rank=16")
    assert r["status"] == "ok" and r["metrics"]["dense_test_acc"] == dense["metrics"]["test_acc"]


def test_wandb_offline_run_is_written(env, dense_run):
    args = [*QUICK, "rank=2", "regularizer=symmetric", "regularizer.alpha=1e-3", "model.targets=[l1,l2]"]
    proc, r = cli(env, "wandb_offline", *args, "wandb.mode=offline", env={"WANDB_MODE": None})
    assert r["status"] == "ok"
    runs = list((env["base"] / "wandb_offline" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))
    run = wandb_run_record(env["base"] / "wandb_offline")
    assert run.display_name == "mlp-compress-r2-symmetric+orthonormal-a0.001-s42" and run.job_type == "compress"
    # a single run's group: its date and time, then its overrides as whole items
    assert re.fullmatch(r"run-\d{4}-\d\d-\d\d_\d\d-\d\d-\d\d_model\.targets-l1\+l2_rank-2_regularizer-symmetric_"
                        r"regularizer\.alpha-1e-3_train\.epochs-2", run.run_group), run.run_group
    config = wandb_config(run)
    assert config["mode"] == "compress" and config["rank"] == 2  # resolved, not null
    assert config["regularizer"]["label"] == "symmetric+orthonormal"


def test_same_seed_same_numbers(env):
    _, a = cli(env, "det_a", *QUICK, "mode=scratch", "rank=2")
    _, b = cli(env, "det_b", *QUICK, "mode=scratch", "rank=2")
    assert a["metrics"] == b["metrics"] and a["history"] == b["history"]
    assert a["threads"] == b["threads"] >= 1  # recorded: CPU figures depend on the thread count


# ----------------------------------------------------------------- bad input


def _fails(env, name, *args, match: str):
    proc, r = cli(env, name, *args, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert match in proc.stderr, out  # errors go to stderr
    assert "Traceback" not in out, out
    if r is not None:  # a run directory exists: the error is in run.log, and the run ends with one line
        run_dir = env["base"] / name
        assert match in (run_dir / "run.log").read_text()
        last = proc.stderr.strip().splitlines()[-1]
        assert match in last and last.endswith(f"; run directory {run_dir}"), last
        assert match not in proc.stdout
    return r


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["rank=0"], "rank=0 is out of range for layer 'l2' of shape 64×64 (low-rank form): allowed 1 ≤ rank ≤ 31"),
        (["rank=60"], "rank=60 is out of range for layer 'l2' of shape 64×64 (low-rank form): allowed 1 ≤ rank ≤ 31 "
                      "(larger ranks save no parameters); 31 is the largest rank that every one of the 2 targets"),
        (["rank=-3"], "rank=-3 is out of range"),
        (["rank=32"], "layer 'l2' of shape 64×64 (low-rank form): allowed 1 ≤ rank ≤ 31"),
        (["rank=8", "regularizer=symmetric", "model.targets=[l1]"], "symmetric form needs a square target"),
        (["rank=8", "model.targets=[l9]"], "target pattern 'l9' matches no Linear/Conv1D layer"),
        (["mode=scratch"], "mode=scratch needs a size: add rank=R (e.g. rank=8) or compress.ratio=F"),
        (["rank=8", "checkpoint=/does/not/exist"], "checkpoint=/does/not/exist does not exist"),
        (["+rnak=8"], "unknown config key 'rnak' (nearest known keys: rank)"),  # Hydra's own hint for rnak=8
        (["rank=8", "+compress.ration=0.2"], "unknown config key 'compress.ration' (nearest known keys: compress.ratio"),
    ],
)
def test_bad_input_fails_before_training_with_one_line(env, args, match, tmp_path):
    name = re.sub(r"[^A-Za-z0-9]+", "_", "bad_" + "_".join(args))[:60]
    r = _fails(env, name, *args, match=match)
    assert r["status"] == "failed" and match in r["error"]
    assert r["timing"]["train_s"] == 0.0 and r["metrics"] == {}


@pytest.mark.parametrize(("args", "match"), [(["rank=abc"], "could not be converted to Integer"),
                                              (["rank=8.5"], "could not be converted to Integer"),
                                              (["model=foo"], "Could not find 'model/foo'"),
                                              (["model=mlp_schema", "rank=8"], "Could not find 'model/mlp_schema'"),
                                              (["regularizer=foo"], "Could not find 'regularizer/foo'")])
def test_config_errors_are_hydras_own(env, args, match):
    r = _fails(env, re.sub(r"[^A-Za-z0-9]+", "_", "cfg_" + args[0]), *args, match=match)
    assert r is None  # composition fails before a run directory exists: nothing is recorded


def test_corrupt_checkpoint(env, dense_run, tmp_path):
    run_dir, _, _ = dense_run
    bad = tmp_path / "corrupt"
    bad.mkdir()
    (bad / "model.json").write_text((run_dir / "model.json").read_text())
    (bad / "model.safetensors").write_bytes(b"not a safetensors file at all")
    r = _fails(env, "bad_corrupt", "rank=8", f"checkpoint={bad}", match="is corrupt or unreadable")
    assert r["status"] == "failed"


def test_checkpoint_of_another_architecture(env, dense_run):
    run_dir, _, _ = dense_run
    r = _fails(env, "bad_arch", "rank=8", "model.hidden=32", f"checkpoint={run_dir}",
               match="is of another architecture: model.hidden=64 in the checkpoint but 32 here")
    assert r["status"] == "failed"


def test_diverging_loss_stops_with_status_failed(env):
    r = _fails(env, "bad_nan", "train.epochs=1", "train.lr=1e30", "cache.dense=false",
               match="at epoch 1 step")
    assert r["status"] == "failed" and "lower train.lr" in r["error"]
    assert not (env["base"] / "bad_nan" / "model.safetensors").exists()


def test_missing_mnist_says_where_it_looked(env, tmp_path):
    empty = tmp_path / "nodata"
    empty.mkdir()
    proc, r = run_cli(["rank=8", "data.download=false"], tmp_path / "run", data_root=empty, check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"MNIST not found in {empty}/mnist/MNIST/raw" in out
    assert "set data.root" in out and "Traceback" not in out
    assert r["status"] == "failed"


def test_missing_data_root_is_refused_and_nothing_is_created(tmp_path):
    missing = tmp_path / "nonexistent"
    proc, r = run_cli(["rank=8"], tmp_path / "run", data_root=missing, cache=tmp_path / "cache", check=False)
    assert proc.returncode != 0 and f"data.root={missing} does not exist" in proc.stderr, proc.stderr
    assert not missing.exists() and r["status"] == "failed"


def test_failed_download_gives_its_cause_and_leaves_nothing_behind(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc, r = run_cli(["rank=8"], tmp_path / "run", data_root=empty, cache=tmp_path / "cache", check=False,
                      prefix=no_network())
    assert proc.returncode != 0
    cause = "downloading it failed (Error downloading train-images-idx3-ubyte.gz: <urlopen error"
    assert cause in proc.stderr and cause in r["error"], proc.stderr
    assert list(empty.iterdir()) == []  # torchvision's mnist/MNIST/raw were removed again


# ------------------------------------------------------------- quality floors


@pytest.fixture(scope="module")
def full_env(data_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("mlp_quality")
    return {"data_root": data_root, "cache": base / "cache", "base": base}


def test_quality_floors_with_the_default_config(full_env):
    """Default config and seed on real MNIST: dense ≥ 96.5%, compress r16 ≥ 93%, scratch r8 ≥ 92%."""
    _, dense = cli(full_env, "dense")
    _, compress = cli(full_env, "compress16", "rank=16")
    _, scratch = cli(full_env, "scratch8", "mode=scratch", "rank=8")
    assert dense["metrics"]["test_acc"] >= 0.965
    assert compress["metrics"]["compressed_test_acc"] >= 0.93
    assert scratch["metrics"]["test_acc"] >= 0.92

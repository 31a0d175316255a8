"""End-to-end `python run.py compress.ratio=... compress.allocation=...` on real MNIST, and the MLP preset."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

QUICK = ["train.epochs=2"]
TARGET_WEIGHTS = 64 * 784 + 64 * 64


@pytest.fixture(scope="module")
def env(data_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("budget")
    return {"data_root": data_root, "cache": base / "cache", "base": base}


def cli(env, name: str, *args: str, **kw):
    return run_cli([*QUICK, *args], env["base"] / name, data_root=env["data_root"], cache=env["cache"], **kw)


def kept(ranks: dict) -> int:
    return ranks["l1"] * (64 + 784) + ranks["l2"] * (64 + 64)


@pytest.mark.parametrize("allocation", ["uniform", "spectrum", "sensitivity"])
def test_ratio_meets_the_budget_and_records_it(env, allocation):
    _, r = cli(env, allocation, "compress.ratio=0.8", f"compress.allocation={allocation}")
    assert r["status"] == "ok" and r["rank"] is None
    b = r["compress"]["budget"]
    assert (b["ratio"], b["allocation"]) == (0.8, allocation)
    ranks = {layer["name"]: layer["rank"] for layer in r["layers"]}
    assert b["ranks"] == ranks
    # achieved ≥ requested, and short of it by less than one rank step of the largest target
    assert b["removed_targets"] == pytest.approx(1 - kept(ranks) / TARGET_WEIGHTS)
    assert 0.8 <= b["removed_targets"] < 0.8 + (64 + 784) / TARGET_WEIGHTS + 1e-12
    p = r["params"]
    assert b["removed_model"] == pytest.approx(1 - p["total"] / p["dense_total"])
    if allocation == "uniform":
        assert ranks == {"l1": int(64 * 784 * 0.2 / 848), "l2": int(64 * 64 * 0.2 / 128)}
    # the run's saved structure holds the per-layer ranks
    structure = json.loads((env["base"] / allocation / "model.json").read_text())
    assert {x["name"]: x["rank"] for x in structure["layers"]} == ranks


def test_spectrum_allocation_is_not_uniform_and_reloads_to_identical_outputs(env):
    _, r = cli(env, "spectrum_reload_src", "compress.ratio=0.8", "compress.allocation=spectrum",
                "compress.method=whiten")
    ranks = r["compress"]["budget"]["ranks"]
    assert ranks != {"l1": 11, "l2": 6}  # not the uniform shares
    src = env["base"] / "spectrum_reload_src"
    _, again = cli(env, "spectrum_reload", f"checkpoint={src}", "save=true")
    assert again["status"] == "ok" and again["metrics"]["test_acc"] == r["metrics"]["test_acc"]
    assert {layer["name"]: layer["rank"] for layer in again["layers"]} == ranks
    a, b = load_file(str(src / "model.safetensors")), load_file(str(env["base"] / "spectrum_reload" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sensitivity_is_measured_once_per_model_data_and_method(env):
    _, first = cli(env, "sens_a", "compress.ratio=0.7", "compress.allocation=sensitivity", "compress.method=whiten")
    cached = sorted((env["cache"] / "sensitivity").glob("*.json"))
    _, second = cli(env, "sens_b", "compress.ratio=0.9", "compress.allocation=sensitivity", "compress.method=whiten")
    assert "sensitivity measurements cached at" in (env["base"] / "sens_a" / "run.log").read_text()
    assert "sensitivity measurements from cache" in (env["base"] / "sens_b" / "run.log").read_text()
    assert "dense metrics from the cache" in (env["base"] / "sens_b" / "run.log").read_text()  # evaluated once
    assert second["metrics"]["dense_test_acc"] == first["metrics"]["dense_test_acc"]
    assert first["compress"]["budget"]["removed_targets"] >= 0.7
    assert second["compress"]["budget"]["removed_targets"] >= 0.9
    assert sorted((env["cache"] / "sensitivity").glob("*.json")) == cached  # nothing measured again


def test_scratch_takes_a_uniform_ratio(env):
    _, r = cli(env, "scratch_ratio", "mode=scratch", "compress.ratio=0.5", "train.epochs=1")
    assert r["status"] == "ok" and r["mode"] == "scratch"
    assert {layer["name"]: layer["rank"] for layer in r["layers"]} == {"l1": int(64 * 784 * 0.5 / 848), "l2": 16}


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["rank=8", "compress.ratio=0.5"], "rank=8 and compress.ratio=0.5 both size the factors"),
        (["compress.ratio=1.5"], "compress.ratio=1.5 is out of range: allowed 0 < compress.ratio < 1"),
        (["compress.ratio=0"], "compress.ratio=0.0 is out of range: allowed 0 < compress.ratio < 1"),
        (["rank=8", "compress.allocation=spectrum"], "compress.allocation=spectrum shares out a parameter budget"),
        (["mode=scratch", "compress.ratio=0.5", "compress.allocation=spectrum"],
         "compress.allocation=spectrum reads a trained model's weights"),
        (["compress.ratio=0.5", "regularizer=symmetric"], "compress.ratio budgets the plain two-factor form"),
        (["compress.ratio=0.99"], "compress.ratio=0.99 removes more than rank 1 everywhere does"),
        (["mode=compress"], "mode=compress needs a size: add rank=R (e.g. rank=8) or compress.ratio=F"),
    ],
)
def test_bad_budgets_fail_before_training(env, tmp_path, args, match):
    proc, r = run_cli([*args, "cache.dense=false"], tmp_path / "bad", data_root=env["data_root"], check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and match in out, out
    assert "Traceback" not in out
    assert r["status"] == "failed" and match in r["error"] and r["timing"]["train_s"] == 0.0


def test_allocation_is_validated_by_the_schema(env, tmp_path):
    proc, r = run_cli(["compress.ratio=0.5", "compress.allocation=greedy"], tmp_path / "bad",
                      data_root=env["data_root"], check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "compress.allocation" in out and "sensitivity" in out and r is None


def test_mlp_methods_preset_runs_end_to_end_reduced_to_two_cells(env, tmp_path):
    sweep = tmp_path / "preset"
    proc, _ = run_cli(["experiment=mlp_methods", *QUICK, "+size=r08,ratio80_spectrum", "compress.method=whiten"],
                      sweep, data_root=env["data_root"], cache=env["cache"], multirun=True)
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert len(results) == 2 and all(r["status"] == "ok" for r in results)
    assert sorted(((r["rank"], r["compress"]["budget"]["ratio"]) for r in results), key=str) == [(8, None), (None, 0.8)]
    md = (sweep / "summary.md").read_text()
    assert "| whiten | spectrum | 0.8 |" in md
    assert Path(sweep / "summary.png").read_bytes().startswith(b"\x89PNG")

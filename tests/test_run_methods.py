"""End-to-end data-aware compression through `python run.py compress.method=...` on real MNIST."""

from __future__ import annotations

import pytest
from conftest import run_cli

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(data_root, tmp_path_factory):
    """The default config (10 epochs): one dense model, cached, shared by every compress run."""
    base = tmp_path_factory.mktemp("methods")
    return {"data_root": data_root, "cache": base / "cache", "base": base}


def cli(env, name: str, *args: str, **kw):
    return run_cli(list(args), env["base"] / name, data_root=env["data_root"], cache=env["cache"], **kw)


@pytest.fixture(scope="module")
def plain16(env):
    return cli(env, "svd16", "rank=16", "compress.method=svd")[1]


@pytest.mark.parametrize("method", ["asvd", "whiten", "fwsvd"])
def test_each_method_runs_and_records_its_calibration(env, plain16, method):
    _, r = cli(env, method, "rank=16", f"compress.method={method}")
    assert r["status"] == "ok" and r["dense_source"].startswith("cache:")
    c = r["compress"]
    assert c["method"] == method
    assert c["options"] == {"asvd": {"alpha": 0.5}, "whiten": {"damp": 0.01}, "fwsvd": {}}[method]
    cal = c["calibration"]
    assert (cal["samples"], cal["split"], cal["seed"], cal["tokens"], cal["sequential"]) == (2048, "train", 42, 2048, False)
    assert cal["fisher"] is (method == "fwsvd")
    for layer in r["layers"]:
        assert layer["method"] == method and layer["calib_tokens"] == 2048
        assert 0 < layer["rel_data_error"] < 1
        assert (layer["damping"] is not None) is (method == "whiten")
    assert r["metrics"]["dense_test_acc"] == plain16["metrics"]["dense_test_acc"]  # the same dense model
    # the bound still holds for a data-aware factorization
    assert r["bound"]["measured_max"] <= r["bound"]["bound_max"]


def test_whitening_beats_plain_svd_on_real_mnist(env, plain16):
    """docs/results.md's targets (2048 calibration images, seed 42): whiten r8 ≥ 86%, r16 ≥ 95.5%; sequential r4 ≥ 49%."""
    _, w16 = cli(env, "whiten16", "rank=16", "compress.method=whiten")
    _, w8 = cli(env, "whiten8", "rank=8", "compress.method=whiten")
    _, s4 = cli(env, "seq4", "rank=4", "compress.method=whiten", "calibration.sequential=true")
    assert w16["metrics"]["test_acc"] >= 0.955 > plain16["metrics"]["test_acc"]
    assert w8["metrics"]["test_acc"] >= 0.86
    assert s4["metrics"]["test_acc"] >= 0.49 and s4["compress"]["calibration"]["sequential"] is True


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["mode=scratch", "rank=8", "compress.method=whiten"], "compress.method=whiten is data-aware"),
        (["rank=8", "compress.method=asvd", "regularizer=symmetric"], "compress.method=asvd has no symmetric form"),
        (["rank=8", "compress.method=whiten", "calibration.split=test"], "calibration.split=test is refused"),
        (["rank=8", "compress.method=fwsvd", "calibration.fisher=false"], "calibration.fisher=false is not allowed"),
        (["rank=8", "compress.method=whiten", "calibration.samples=60000"],
         "calibration.samples=60000 is more than the 55000 images of the train split"),
        (["rank=8", "compress.method=whiten", "compress.damp=-1"], "compress.damp=-1.0 must be ≥ 0"),
    ],
)
def test_bad_method_settings_fail_before_training(env, tmp_path, args, match):
    proc, r = run_cli([*args, "cache.dense=false"], tmp_path / "bad", data_root=env["data_root"], check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and match in out, out
    assert "Traceback" not in out
    assert r["status"] == "failed" and match in r["error"]
    assert r["timing"]["train_s"] == 0.0  # refused before any training


def test_unknown_method_is_refused_by_the_schema(env, tmp_path):
    proc, r = run_cli(["rank=8", "compress.method=qr"], tmp_path / "bad", data_root=env["data_root"], check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "compress.method" in out and "whiten" in out and "fwsvd" in out
    assert r is None

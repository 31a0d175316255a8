"""The cache keys stay what they are: a dense model, its evaluations and the sensitivity measurements
trained or measured by an earlier version are found again.

The expected names were computed once and are pinned here; a change to how the config reaches
the key (a typed section instead of a dict, an enum instead of its string) must not move them.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import REPO
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from nnsvd.config import Config, plain
from nnsvd.run.compression import sensitivity_key, statistics_store
from nnsvd.run.overrides import register_configs
from nnsvd.run.pipeline import dense_cache_entry, evaluate_dense, local_paths, make_task

register_configs()
START = Path("/nnsvd-start")  # the directory the run starts in: relative paths resolve against it (never created)

# model option → (dense-cache entry, dense-evaluation file), with the default data and data.root=./data
DENSE = {
    "mlp": ("mlp-7694a2e17eb97ba2", "eval-adfa7cdadc9fb54d.json"),
    "gpt2": ("gpt2-e1522957fb444708", "eval-cb098b1904753eab.json"),
    "gpt2_tiny": ("gpt2-cbad0d715c355ef7", "eval-3c6acb483ec1ff2a.json"),
    "gpt2_bytes": ("gpt2-542b3c7bec2f23be", "eval-47cc2680a50ed44e.json"),
    "causal_lm": ("causal_lm-ed65de2686d83145", "eval-cb098b1904753eab.json"),
    "smollm2": ("causal_lm-345cf04128d27c9d", "eval-f49aedb71a9f580a.json"),
}


@pytest.fixture(autouse=True)
def _no_environment(monkeypatch):
    """data.root and cache.dir as the config writes them, whatever the machine sets."""
    monkeypatch.delenv("NNSVD_DATA_ROOT", raising=False)
    monkeypatch.delenv("NNSVD_CACHE_DIR", raising=False)


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def _config(*overrides: str) -> Config:
    """The typed config a run builds, as run_job does."""
    return OmegaConf.to_object(_compose(*overrides))


class _Scored:
    """A task whose evaluation is a constant: evaluate_dense then writes its cache file."""

    @staticmethod
    def evaluate(model) -> dict:
        return {"test_metric": 1.0}


def _dense_names(model: str, tmp_path: Path, *overrides: str) -> tuple[str, str]:
    """The dense-cache entry a run of ``model=<model>`` uses, and the file its dense evaluation is kept in."""
    config = local_paths(_config(f"model={model}", *overrides), START)  # as run_experiment does
    task = make_task(config, torch.device("cpu"), START)
    weights = task.weights if task.length(config.train) == 0 else None
    entry = dense_cache_entry(config, tmp_path, weights)
    evaluate_dense(_Scored(), None, config, entry, torch.device("cpu"))
    (written,) = [p.name for p in entry.glob("eval-*.json")]
    return entry.name, written


@pytest.mark.parametrize("model", sorted(DENSE))
def test_dense_cache_keys_are_pinned(model, tmp_path):
    assert _dense_names(model, tmp_path) == DENSE[model]


# overrides → (dense-cache entry, dense-evaluation file): other data, a trained model's settings, zero-shot tasks
VARIANTS = {
    ("model=gpt2", "data=text_files", "data.root=some/where"): ("gpt2-221a1e89af8b496d", "eval-8bc004d2a3980f9e.json"),
    ("model=mlp", "train.epochs=3", "seed=1", "data.root=/abs/data"): ("mlp-130ea51db3825143", "eval-adfa7cdadc9fb54d.json"),
    ("model=gpt2_tiny", "eval.tasks=[piqa]", "eval.limit=8"): ("gpt2-cbad0d715c355ef7", "eval-1f3689d3d51e06d6.json"),
}


@pytest.mark.parametrize("overrides", sorted(VARIANTS))
def test_dense_cache_keys_of_variants_are_pinned(overrides, tmp_path):
    model, *rest = overrides
    assert _dense_names(model.removeprefix("model="), tmp_path, *rest) == VARIANTS[overrides]


def _tiny() -> tuple[nn.Module, list[torch.Tensor]]:
    """A model and calibration batches whose bytes do not depend on any random generator."""
    model = nn.Sequential(nn.Linear(4, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(12.0).reshape(3, 4) / 10)
        model[0].bias.copy_(torch.arange(3.0))
    return model, [torch.arange(8).reshape(2, 4), torch.arange(8, 16).reshape(2, 4)]


class GPT2Task:
    """Stands for the real GPT2Task, whose class name is part of the statistics key."""

    calibrates_by_block = True


# overrides → the sensitivity measurements' key
SENSITIVITY = {
    ("compress.method=whiten",): "90190f4dd0deb727a906",
    ("compress.method=asvd", "compress.asvd_alpha=0.25"): "b6d2f674c279b6037f80",
    ("compress.method=svd", "compress.sensitivity_ratios=[0.2,0.6]"): "eff2b683956571d5c53e",
}


@pytest.mark.parametrize("overrides", sorted(SENSITIVITY))
def test_sensitivity_keys_are_pinned(overrides):
    assert _sensitivity_key(*overrides) == SENSITIVITY[overrides]


# overrides → the dense calibration statistics' directory name (the weights, targets and batches make
# the key; the config decides only whether there is a store)
STATISTICS = {
    ("compress.method=whiten",): "bd4ad5b7bd5ee0dc483f",
    ("compress.method=fwsvd", "calibration.sequential=true"): "bd4ad5b7bd5ee0dc483f",
    ("compress.method=whiten", "compress.ratio=0.4", "compress.allocation=spectrum"): "bd4ad5b7bd5ee0dc483f",
    ("compress.method=whiten", "calibration.sequential=true"): None,  # would neither read nor write: no store
    ("compress.method=whiten", "cache.statistics=false"): None,
}


@pytest.mark.parametrize("overrides", sorted(STATISTICS))
def test_statistics_keys_are_pinned(overrides, tmp_path):
    assert _statistics_key(tmp_path, *overrides) == STATISTICS[overrides]


def _sensitivity_key(*overrides: str) -> str:
    config = _config("model=gpt2", *overrides)
    model, batches = _tiny()
    ratios = [float(r) for r in config.compress.sensitivity_ratios]
    return sensitivity_key(model, {"0": (3, 4)}, batches, config.compress, ratios)


def _statistics_key(tmp_path: Path, *overrides: str) -> str | None:
    model, batches = _tiny()
    store = statistics_store(GPT2Task(), model, _config("model=gpt2", *overrides), {"0": (3, 4)}, batches, tmp_path)
    return None if store is None else store.root.name


@pytest.mark.parametrize("model", sorted(DENSE))
@pytest.mark.parametrize("extra", [(), ("compress.method=whiten", "compress.update=block", "compress.ratio=0.4",
                                        "compress.allocation=spectrum", "mode=compress", "wandb.mode=disabled")])
def test_the_typed_config_writes_as_the_composed_one(model, extra):
    """The W&B config (and model.json) are made with ``plain``: the same keys, order and values as
    the composed config, enums as their names."""
    cfg = _compose(f"model={model}", *extra)
    expected = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    assert json.dumps(plain(OmegaConf.to_object(cfg))) == json.dumps(expected)

"""Every name that README.md, docs/ and conf/ point a user to imports: the library's names, the old
module paths kept for them, and the ``_target_`` (and logging ``()``) classes that Hydra builds."""

import importlib
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# module → names, as README.md and docs/*.md write them (grep them for "nnsvd" when the docs change)
DOCUMENTED = {
    "nnsvd": ["compress_model", "orthonormal_penalty", "param_summary", "output_error_bound",
              "factorize", "lowrank_from_scratch", "count_params", "LowRankLinear"],
    "nnsvd.lowrank": ["collect_statistics", "compress_blockwise", "compress_with_calibration",
                      "resolve_factorizer", "svd_auto"],
    "nnsvd.lowrank.bounds": ["output_error_bound"],
    "nnsvd.models.gpt2": ["load_compressed"],
    "nnsvd.models.causal_lm": ["load_compressed"],
    "nnsvd.training": ["fit", "on_step"],
    "nnsvd.training.classification": ["ClassifierEpochs", "train_classifier"],
    "nnsvd.training.language_modeling": ["CausalLMSteps", "train_causal_lm"],
    "nnsvd.training.perplexity": ["lm_loss"],
    "nnsvd.training.zero_shot": ["evaluate_tasks"],
    "nnsvd.tracking.summary": ["REFERENCE_CSV", "summarize"],
    "nnsvd.cluster.squeue": ["use_squeue_without_accounting"],
    "nnsvd.config": ["Config"],
    # the old paths docs/library.md named before the layout (thin aliases of the training modules)
    "nnsvd.perplexity": ["lm_loss"],
    "nnsvd.train": ["ClassifierEpochs", "train_classifier"],
    "nnsvd.train_lm": ["CausalLMSteps", "train_causal_lm"],
    # the _target_s conf/config.yaml named before the layout, which a saved .hydra/config.yaml may still name
    "nnsvd.callbacks": ["SweepSummary", "SlurmJobStates"],
    "nnsvd.threads": ["SweepThreads"],
}


@pytest.mark.parametrize(("module", "name"), [(m, n) for m, names in DOCUMENTED.items() for n in names])
def test_documented_name_imports(module, name):
    assert hasattr(importlib.import_module(module), name), f"{module}.{name}"


def test_old_paths_are_the_new_modules():
    for old, new in [("nnsvd.perplexity", "nnsvd.training.perplexity"), ("nnsvd.train", "nnsvd.training.classification"),
                     ("nnsvd.train_lm", "nnsvd.training.language_modeling"),
                     ("nnsvd.callbacks", "nnsvd.cluster.callbacks"), ("nnsvd.threads", "nnsvd.run.threads")]:
        assert importlib.import_module(old) is importlib.import_module(new)


def _documented_paths() -> list[str]:
    """The dotted nnsvd paths and the nnsvd/… files that README.md and docs/*.md name."""
    text = "\n".join(p.read_text() for p in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))])
    dotted = set(re.findall(r"\bnnsvd(?:\.[A-Za-z_][A-Za-z_0-9]*)+", text))
    files = set(re.findall(r"\bnnsvd/[a-z_/]+\.py\b", text))
    return sorted(dotted | files)


@pytest.mark.parametrize("path", _documented_paths())
def test_every_path_the_docs_name_exists(path):
    if "/" in path:
        assert (REPO / path).is_file(), path
        return
    parts = path.split(".")
    for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
        return
    pytest.fail(f"{path} does not import")


def _conf_targets() -> list[str]:
    found = set()
    for yaml in (REPO / "conf").rglob("*.yaml"):
        found |= set(re.findall(r"(?:_target_|\(\)):\s*(nnsvd[.\w]+)", yaml.read_text()))
    return sorted(found)


def test_conf_names_targets():
    assert "nnsvd.cluster.callbacks.SweepSummary" in _conf_targets()


@pytest.mark.parametrize("target", _conf_targets())
def test_conf_target_imports(target):
    module, _, name = target.rpartition(".")
    assert hasattr(importlib.import_module(module), name), target

"""The package's layers (docs/library.md, "The layers"): no module imports from a layer above its own.

    base      errors, config (the schema, on omegaconf), files, hub: any layer may import them
    engine    nnsvd (the package's re-exports), lowrank/: plain PyTorch, no Hydra, no W&B
    middle    models/, data/, training/
    tasks     tasks/
    top       run/, tracking/, cluster/

Every import counts, a function's own included, and so does ``if TYPE_CHECKING:``.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "nnsvd"

BASE, ENGINE, MIDDLE, TASKS, TOP = range(5)
LAYER_NAMES = ["base", "engine", "middle", "tasks", "top"]

# A module's layer: its own entry, else its package's (the longest prefix listed).
LAYERS = {
    "nnsvd": ENGINE,  # __init__ re-exports the engine
    "nnsvd.errors": BASE,
    "nnsvd.config": BASE,
    "nnsvd.files": BASE,
    "nnsvd.hub": BASE,
    "nnsvd.lowrank": ENGINE,
    "nnsvd.models": MIDDLE,
    "nnsvd.data": MIDDLE,
    "nnsvd.training": MIDDLE,
    "nnsvd.perplexity": MIDDLE,  # old paths of training modules, kept for library users
    "nnsvd.train": MIDDLE,
    "nnsvd.train_lm": MIDDLE,
    "nnsvd.callbacks": TOP,  # old paths of the Hydra callbacks' modules, which saved configs may name
    "nnsvd.threads": TOP,
    "nnsvd.tasks": TASKS,
    "nnsvd.run": TOP,
    "nnsvd.tracking": TOP,
    "nnsvd.cluster": TOP,
}

NOT_IN_THE_ENGINE = ("hydra", "omegaconf", "wandb")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int | None:
    while module:
        if module in LAYERS:
            return LAYERS[module]
        module = module.rpartition(".")[0]
    return None


def imported(name: str, path: Path) -> list[tuple[int, str]]:
    """(line, module) of every import in ``path``, relative ones resolved; ``from nnsvd import x``
    names the module nnsvd.x when there is one, else the package."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((node.lineno, sub if sub in MODULES else base))
    return found


def test_every_module_has_a_layer():
    unplaced = [m for m in MODULES if layer_of(m) is None]
    assert not unplaced, f"give these modules a layer in LAYERS (and docs/library.md): {unplaced}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_no_import_from_a_layer_above(name):
    own = layer_of(name)
    upward = [
        f"line {line}: {target} ({LAYER_NAMES[layer_of(target)]})"
        for line, target in imported(name, MODULES[name])
        if target.split(".")[0] == "nnsvd" and layer_of(target) is not None and layer_of(target) > own
    ]
    assert not upward, f"{name} ({LAYER_NAMES[own]}) imports from a layer above its own: {upward}"


@pytest.mark.parametrize("name", sorted(m for m in MODULES if layer_of(m) == ENGINE))
def test_the_engine_imports_neither_hydra_nor_wandb(name):
    found = [f"line {line}: {t}" for line, t in imported(name, MODULES[name]) if t.split(".")[0] in NOT_IN_THE_ENGINE]
    assert not found, f"{name} is in the engine, which works without Hydra and W&B: {found}"


def test_the_check_sees_an_upward_import(tmp_path):
    """The check itself: a function-level import of the pipeline from the engine is found."""
    source = tmp_path / "bad.py"
    source.write_text("def f():\n    from nnsvd.run.pipeline import run_job\n    from . import layers\n")
    found = imported("nnsvd.lowrank.bad", source)
    assert (2, "nnsvd.run.pipeline") in found and (3, "nnsvd.lowrank.layers") in found
    assert layer_of("nnsvd.run.pipeline") > layer_of("nnsvd.lowrank.bad")

"""Model checkpoints: safetensors + a JSON structure record, and what a checkpoint is.

An MLP checkpoint directory holds ``model.safetensors`` and ``model.json``:
{"model": <model config>, "layers": [{"name", "shape", "rank", "form"}, …], "meta": {…}}.
The structure record lets ``load_checkpoint`` rebuild factorized layers before loading the
weights. Nothing is ever unpickled. Writes are atomic: a temporary sibling is renamed into
place, so a crash never leaves a half-written checkpoint behind.

A language-model checkpoint directory (``nnsvd.models.hf_checkpoint.save_compressed``) holds
``model.safetensors``, ``config.json``, ``nnsvd_layers.json``, the tokenizer and, written by the suite,
``nnsvd_meta.json``: GPT-2 when config.json's model_type is gpt2, any other causal LM otherwise.
``checkpoint_info`` tells the kinds apart from the files alone and reads what a checkpoint is
(its layers and the meta: mode, rank, regularizer, method, seed, where it was made) without
loading its weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nnsvd.errors import CheckpointError
from nnsvd.lowrank import layer_records, rebuild_structure

WEIGHTS = "model.safetensors"
STRUCTURE = "model.json"
# as models.hf_checkpoint writes them
GPT2_CONFIG, GPT2_LAYERS, GPT2_META = "config.json", "nnsvd_layers.json", "nnsvd_meta.json"
KINDS = {
    "mlp": f"an MLP ({STRUCTURE})",
    "gpt2": f"a GPT-2 ({GPT2_CONFIG} + {GPT2_LAYERS})",
    "causal_lm": f"a causal LM ({GPT2_CONFIG} + {GPT2_LAYERS})",
}


def save_checkpoint(model: nn.Module, directory: Path, model_config: Mapping, meta: Mapping | None = None) -> Path:
    """Write model.safetensors + model.json into ``directory`` atomically; returns the directory."""
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.", suffix=".tmp"))
    try:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        record = {"model": dict(model_config), "layers": layer_records(model), "meta": dict(meta or {})}
        (tmp / STRUCTURE).write_text(json.dumps(record, indent=2, default=str))
        if directory.exists():
            # Only the two checkpoint files are replaced; other files in the directory stay.
            for name in (WEIGHTS, STRUCTURE):
                os.replace(tmp / name, directory / name)
        else:
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def read_structure(path: str | Path) -> tuple[Path, dict]:
    """(weights file, structure record) of a checkpoint directory or its model.safetensors."""
    path = Path(path).expanduser()
    directory = path if path.is_dir() else path.parent
    weights, structure = directory / WEIGHTS, directory / STRUCTURE
    if not path.exists():
        raise CheckpointError(f"checkpoint={path} does not exist; pass a run directory holding {WEIGHTS}")
    if not weights.is_file() or not structure.is_file():
        raise CheckpointError(f"checkpoint={path} needs both {WEIGHTS} and {STRUCTURE} in {directory}")
    try:
        record = json.loads(structure.read_text())
        record["model"], record["layers"]  # noqa: B018 - both keys are required
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint={path}: {structure.name} is corrupt ({exc})") from exc
    return weights, record


def load_checkpoint(path: str | Path, build: Callable[[Mapping], nn.Module], expected: Mapping) -> tuple[nn.Module, dict]:
    """Rebuild the model recorded at ``path`` and load its weights (strict, never unpickled).

    ``build(model_config)`` constructs the dense architecture; ``expected`` is the current
    run's model config, which must describe the same architecture.
    """
    weights, record = read_structure(path)
    saved = record["model"]
    arch_keys = [k for k in expected if k not in ("targets", "dropout", "sample_prompt", "sample_tokens")]
    diff = {k: (saved.get(k), expected[k]) for k in arch_keys if saved.get(k) != expected[k]}
    if diff:
        shown = ", ".join(f"model.{k}={v[0]!r} in the checkpoint but {v[1]!r} here" for k, v in diff.items())
        raise CheckpointError(f"checkpoint={path} is of another architecture: {shown}")
    model = build(saved)
    try:
        rebuild_structure(model, record["layers"])
        state = load_file(str(weights))
    except (SafetensorError, OSError, ValueError, KeyError, AttributeError) as exc:
        raise CheckpointError(f"checkpoint={path} is corrupt or unreadable: {exc}") from exc
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    bad_shapes = [k for k in own.keys() & state.keys() if own[k].shape != state[k].shape]
    if missing or unexpected or bad_shapes:
        raise CheckpointError(
            f"checkpoint={path} does not fit the model: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, wrong shapes {bad_shapes[:3]}"
        )
    model.load_state_dict(state)
    return model, record


# ------------------------------------------------------------------- what a checkpoint is


@dataclass
class CheckpointInfo:
    """A checkpoint read from its JSON files alone (no weights loaded)."""

    path: Path  # as given: the directory or its model.safetensors
    directory: Path
    kind: str  # "mlp", "gpt2" or "causal_lm"
    layers: list[dict]  # the factorized layers: name, shape, rank, form
    meta: dict  # what the suite saved with it (empty for checkpoints from elsewhere)
    choices: dict  # the model/data config choices of the run that made it (from .hydra/hydra.yaml)


def checkpoint_kind(directory: Path) -> str | None:
    """"mlp", "gpt2" or "causal_lm" from the files in ``directory``, None when it holds none of them."""
    if (directory / STRUCTURE).is_file():
        return "mlp"
    if (directory / GPT2_CONFIG).is_file() and (directory / GPT2_LAYERS).is_file():
        # imported here: transformers is needed for a Hugging Face folder only
        from nnsvd.models.hf_checkpoint import base_config_dict

        try:
            model_type = base_config_dict(json.loads((directory / GPT2_CONFIG).read_text())).get("model_type")
        except (OSError, ValueError, AttributeError):
            model_type = None  # unreadable: loading it says so
        return "gpt2" if model_type == "gpt2" else "causal_lm"
    return None


def checkpoint_info(path: str | Path) -> CheckpointInfo:
    """Kind, layers, meta and config choices of the checkpoint at ``path`` (a directory or its
    model.safetensors); a CheckpointError names what is missing or unreadable."""
    path = Path(path).expanduser()
    directory = path if path.is_dir() else path.parent
    if not path.exists():
        raise CheckpointError(f"checkpoint={path} does not exist; pass a run directory holding {WEIGHTS}")
    kind = checkpoint_kind(directory)
    if kind is None:
        raise CheckpointError(
            f"checkpoint={path} is not a checkpoint written by nn-svd: {directory} needs {WEIGHTS} with "
            f"{STRUCTURE} (MLP) or with {GPT2_CONFIG} and {GPT2_LAYERS} (GPT-2 or another causal LM)"
        )
    if not (directory / WEIGHTS).is_file():
        raise CheckpointError(f"checkpoint={path} has no {WEIGHTS} in {directory}")
    if kind == "mlp":
        _, record = read_structure(path)
        layers, meta = record["layers"], record.get("meta") or {}
    else:
        layers = _read_json(path, directory / GPT2_LAYERS, list)
        meta = _read_json(path, directory / GPT2_META, dict) if (directory / GPT2_META).is_file() else {}
    return CheckpointInfo(path, directory, kind, list(layers), dict(meta), run_choices(directory))


def _read_json(path: Path, file: Path, kind: type):
    try:
        value = json.loads(file.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint={path}: {file.name} is unreadable or corrupt ({exc})") from exc
    if not isinstance(value, kind):
        raise CheckpointError(f"checkpoint={path}: {file.name} is corrupt (not a JSON {kind.__name__})")
    return value


def run_choices(directory: Path) -> dict:
    """{"model": …, "data": …} as chosen by the Hydra run that wrote ``directory`` (its
    .hydra/hydra.yaml, read as plain YAML); {} for a directory made outside a run."""
    import yaml

    try:
        hydra = yaml.safe_load((directory / ".hydra" / "hydra.yaml").read_text())
        choices = hydra["hydra"]["runtime"]["choices"]
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return {}
    return {k: choices[k] for k in ("model", "data") if isinstance(choices.get(k), str)}

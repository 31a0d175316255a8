"""Compressed Hugging Face models as directories: written by ``save_compressed``, rebuilt by
``rebuild_compressed`` without the suite and without unpickling anything, and opened by plain
transformers with ``trust_remote_code=True`` through the modeling file they carry::

    config.json                  the model's transformers configuration; for a compressed model the base
                                 model's in full, with model_type "nnsvd", the base type, the layers
                                 (nnsvd_layers) and auto_map entries pointing at modeling_nnsvd.py
    modeling_nnsvd.py            a compressed model's loader for transformers (``nnsvd.models.modeling_nnsvd``)
    model.safetensors            the compressed model's state dict (tied tensors stored once)
    nnsvd_layers.json            [{"name", "shape": [out, in], "rank", "form"}] of each factorized layer
    nnsvd_buffers.safetensors    the non-persistent buffers (rotary inv_freq, Gemma's embed_scale), when any
    tokenizer files              whatever tokenizer.save_pretrained writes
    nnsvd_meta.json              optional: what the model is (mode, rank, regularizer, where it was made)

The rebuild builds the architecture on the meta device (no random init, no memory), swaps in the
factorized layers, loads the safetensors strictly, restores the buffers and ties the weights.
Non-persistent buffers are not part of a state dict, so a meta-built model would have none:
they are stored as they were, which makes a reload exact whatever derived them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load_file, save_file, save_model
from torch import nn

from nnsvd.errors import CheckpointError
from nnsvd.lowrank import layer_records, rebuild_structure
from nnsvd.models import modeling_nnsvd
from nnsvd.models.sources import first_line

WEIGHTS_FILE = "model.safetensors"
BUFFERS_FILE = "nnsvd_buffers.safetensors"
CONFIG_FILE = "config.json"
LAYERS_FILE = "nnsvd_layers.json"
META_FILE = "nnsvd_meta.json"
MODELING_FILE = "modeling_nnsvd.py"


def base_config_dict(config: Mapping) -> dict:
    """The base model's config.json fields from a compressed model's (model_type "nnsvd"); others as they are."""
    config = dict(config)
    if config.get("model_type") != modeling_nnsvd.MODEL_TYPE:
        return config
    config["model_type"] = config.pop("nnsvd_base_model_type", None)
    config["architectures"] = config.pop("nnsvd_base_architectures", None)
    for key in (*modeling_nnsvd.NNSVD_KEYS, "auto_map"):
        config.pop(key, None)
    return config


def _normalized(layers: Sequence[Mapping]) -> list[dict]:
    return [
        {"name": s["name"], "shape": [int(d) for d in s["shape"]], "rank": int(s["rank"]), "form": s["form"]}
        for s in layers
    ]


non_persistent_buffers = modeling_nnsvd._buffers  # {name: buffer} of those a state dict leaves out


def save_compressed(
    model: nn.Module,
    tokenizer,
    directory: str | Path,
    layers: Sequence[Mapping] | None = None,
    meta: Mapping | None = None,
) -> Path:
    """Write a (compressed) Hugging Face model to ``directory`` (created if needed) for rebuild_compressed.

    layers: the per-layer records ({"name", "shape", "rank", "form"}, e.g. from the compression
    report); read off the model when None, and checked against it when given.
    meta: JSON-able facts about the model (how it was made), written to nnsvd_meta.json.
    """
    records = layer_records(model)
    if layers is not None and sorted(_normalized(layers), key=str) != sorted(records, key=str):
        raise ValueError(
            "layers do not describe the model's factorized layers; pass layers=None to "
            "read them off the model"
        )
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    # save_model stores tensors shared by several names (a tied embedding / lm_head) once.
    save_model(model, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    buffers = non_persistent_buffers(model)
    if buffers:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in buffers.items()}, str(directory / BUFFERS_FILE))
    if records:  # opens in plain transformers with trust_remote_code=True; without it, fails (unknown model_type)
        config = modeling_nnsvd.nnsvd_config_dict(model.config, records)
        (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        shutil.copyfile(modeling_nnsvd.__file__, directory / MODELING_FILE)
    else:  # a dense model: the stock format
        model.config.save_pretrained(directory)
    (directory / LAYERS_FILE).write_text(json.dumps(records, indent=1) + "\n")
    if meta is not None:
        (directory / META_FILE).write_text(json.dumps(dict(meta), indent=1, default=str) + "\n")
    tokenizer.save_pretrained(directory)
    return directory


def read_config(directory: Path) -> tuple[dict, list]:
    """(config.json, nnsvd_layers.json) of a directory written by save_compressed."""
    if not directory.is_dir():
        raise CheckpointError(f"compressed checkpoint directory '{directory}' does not exist")
    for name in (CONFIG_FILE, LAYERS_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(f"'{directory}' has no {name}: it is not a directory written by save_compressed")
    try:
        config = json.loads((directory / CONFIG_FILE).read_text())
        layers = json.loads((directory / LAYERS_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"'{directory}' has an unreadable config or layer file ({first_line(e)})") from e
    if not isinstance(config, dict) or not isinstance(layers, list):
        raise CheckpointError(f"'{directory}' has a corrupt config or layer file (not a JSON object and list)")
    return base_config_dict(config), layers


_fill_tied = modeling_nnsvd._fill_tied  # the modeling file is self-contained: the suite shares its copy


def _mismatch(expected: Mapping[str, tuple], state: Mapping[str, torch.Tensor]) -> str | None:
    """One line describing missing, unexpected and mis-shaped keys, or None when all match."""
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    parts = [
        f"{label} ({len(items)}): {', '.join(items[:3])}{' …' if len(items) > 3 else ''}"
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
        if items
    ]
    return "; ".join(parts) or None


def _load(path: Path, device: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path, device=device)
    except (OSError, safetensors.SafetensorError) as e:
        raise CheckpointError(f"{path} is unreadable or corrupt ({first_line(e)})") from e


def rebuild_compressed(
    directory: str | Path, build: Callable[[dict], nn.Module], device: str | torch.device = "cpu"
) -> nn.Module:
    """The model saved in ``directory`` by save_compressed, in eval mode on ``device``.

    ``build(config_dict)`` constructs the dense architecture; it runs on the meta device, so it
    allocates nothing. Every stored tensor must fit the rebuilt structure exactly (strict).
    """
    directory = Path(directory)
    config, layers = read_config(directory)
    with torch.device("meta"):
        try:
            model = build(config)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{directory / CONFIG_FILE} describes no model that can be built ({first_line(e)})") from e
        try:
            rebuild_structure(model, layers)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{directory / LAYERS_FILE} does not fit the model of config.json ({first_line(e)})") from e
    device = str(torch.device(device))
    state = _load(directory / WEIGHTS_FILE, device)
    _fill_tied(model, state)
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    problem = _mismatch(expected, state)
    if problem:
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE} does not match the architecture of config.json and "
            f"{LAYERS_FILE} (corrupt, or saved from another model): {problem}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    wanted = {k: tuple(v.shape) for k, v in non_persistent_buffers(model).items()}
    if wanted:
        if not (directory / BUFFERS_FILE).is_file():
            raise CheckpointError(f"'{directory}' has no {BUFFERS_FILE}, which holds the model's buffers {sorted(wanted)[:3]}")
        buffers = _load(directory / BUFFERS_FILE, device)
        problem = _mismatch(wanted, buffers)
        if problem:
            raise CheckpointError(f"{directory / BUFFERS_FILE} does not fit the model: {problem}")
        modeling_nnsvd._restore_buffers(model, buffers)
    left = modeling_nnsvd._finish(model)
    if left:
        raise CheckpointError(f"'{directory}' holds no values for {', '.join(left[:3])}")
    return model.eval()


def export_dense(model: nn.Module, build: Callable[[dict], nn.Module]) -> nn.Module:
    """A stock copy of a compressed model: each factorized layer's product A·B (or B·Bᵀ) written back
    into the base architecture's own dense layer, for tools that run no custom code (vLLM, llama.cpp).

    ``build(config_dict)`` constructs the base architecture (on the meta device: no init). The copy
    keeps the compressed model's outputs (up to the rounding of one matmul instead of two) but none of
    its savings: it has the dense parameter count. GPT-2's Conv1D layers get the product transposed.
    """
    from nnsvd.lowrank import factorized_layers
    from nnsvd.lowrank.layers import is_conv1d

    factors = dict(factorized_layers(model))
    config = base_config_dict(model.config.to_dict())
    with torch.device("meta"):
        dense = build(config)
    state = {}
    for name, tensor in model.state_dict().items():
        owner = name.rpartition(".")[0]
        if owner not in factors:
            state[name] = tensor
    for name, layer in factors.items():
        target = dense.get_submodule(name)
        weight = layer.dense_weight().detach()
        state[f"{name}.weight"] = (weight.T if is_conv1d(target) else weight).contiguous()
        if layer.bias is not None:
            state[f"{name}.bias"] = layer.bias.detach()
    _fill_tied(dense, state)
    dense.load_state_dict(state, strict=True, assign=True)
    modeling_nnsvd._restore_buffers(dense, {k: v.clone() for k, v in non_persistent_buffers(model).items()})
    left = modeling_nnsvd._finish(dense)
    if left:
        raise CheckpointError(f"the dense export holds no values for {', '.join(left[:3])}")
    return dense.eval()

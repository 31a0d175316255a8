"""A causal LM compressed by nn-svd: chosen Linear layers replaced by low-rank factor pairs.

This file is copied into every compressed model folder, so that plain transformers opens it:

    AutoModelForCausalLM.from_pretrained(FOLDER, trust_remote_code=True)

It imports only torch and transformers (and Python's standard library; saving again also uses
safetensors, which transformers installs), reads only this folder's files (or the same files of a Hub repository), and does this:

1. ``config.json`` holds the base model's whole configuration, its type under
   ``nnsvd_base_model_type`` (e.g. ``llama``) and, under ``nnsvd_layers``, each factorized layer's
   name, shape [out, in], rank and form. Its ``model_type`` is ``nnsvd``, which transformers does
   not know, so without ``trust_remote_code=True`` loading fails instead of building a model with
   random weights.
2. The base architecture is built with transformers on the meta device (no memory, no random init),
   and each listed layer is replaced by ``LowRankLinear`` (x ↦ A·(B·x) + bias, A: out×r, B: r×in)
   or ``SymmetricLowRankLinear`` (x ↦ B·(Bᵀ·x) + bias, B: n×r).
3. ``model.safetensors`` is loaded strictly (every tensor must fit, none may be missing); tied
   tensors stored once are given to each name; ``nnsvd_buffers.safetensors`` restores the
   non-persistent buffers (rotary frequencies) exactly as they were saved.
4. The model returned is the base class (``LlamaForCausalLM``, ``GPT2LMHeadModel``, …) in eval mode,
   so ``generate`` and every tool that takes a transformers model work on it. Its ``save_pretrained``
   writes this folder's format again (config, this file, the factors).

No pickle is read. The layers' math is that of nn-svd's ``nnsvd.lowrank.layers``, so the logits
equal nn-svd's own reload bit for bit.
"""

from __future__ import annotations

import json
import os
import shutil

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_utils import load_state_dict
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.utils import cached_file

MODEL_TYPE = "nnsvd"
WEIGHTS, BUFFERS = "model.safetensors", "nnsvd_buffers.safetensors"
NNSVD_KEYS = ("nnsvd_base_model_type", "nnsvd_base_architectures", "nnsvd_layers")
HUB_KEYS = ("cache_dir", "force_download", "local_files_only", "token", "revision", "subfolder", "proxies")
AUTO_MAP = {"AutoConfig": "modeling_nnsvd.NNSVDConfig", "AutoModelForCausalLM": "modeling_nnsvd.NNSVDForCausalLM"}


class LowRankLinear(nn.Module):
    """W ≈ A·B: x ↦ A·(B·x) + bias."""

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.A = nn.Parameter(torch.empty(out_features, rank))
        self.B = nn.Parameter(torch.empty(rank, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B), self.A, self.bias)


class SymmetricLowRankLinear(nn.Module):
    """W ≈ B·Bᵀ on a square layer: x ↦ B·(Bᵀ·x) + bias."""

    def __init__(self, features: int, rank: int, bias: bool) -> None:
        super().__init__()
        self.in_features = self.out_features = features
        self.rank = rank
        self.B = nn.Parameter(torch.empty(features, rank))
        self.bias = nn.Parameter(torch.empty(features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.B.T), self.B, self.bias)


class NNSVDConfig(PretrainedConfig):
    """The base model's configuration plus what nn-svd changed (``nnsvd_*``)."""

    model_type = MODEL_TYPE

    def base_config(self) -> PretrainedConfig:
        """The base model's own configuration class, with every saved field."""
        fields = self.to_dict()
        base_type = fields.pop("nnsvd_base_model_type", None)
        if base_type not in CONFIG_MAPPING:
            raise ValueError(f"config.json names base model type {base_type!r}, which this transformers does not know")
        architectures = fields.pop("nnsvd_base_architectures", None)
        for key in (*NNSVD_KEYS, "auto_map", "model_type", "architectures", "transformers_version"):
            fields.pop(key, None)
        config = CONFIG_MAPPING[base_type].from_dict(fields)
        config.architectures = architectures
        return config


def _replace_layers(model: nn.Module, layers: list[dict]) -> None:
    for layer in layers:
        owner_name, _, leaf = layer["name"].rpartition(".")
        owner = model.get_submodule(owner_name)
        old = getattr(owner, leaf)
        out_f, in_f = (int(d) for d in layer["shape"])
        bias = getattr(old, "bias", None) is not None
        if layer["form"] == "symmetric":
            new = SymmetricLowRankLinear(in_f, int(layer["rank"]), bias)
        else:
            new = LowRankLinear(in_f, out_f, int(layer["rank"]), bias)
        setattr(owner, leaf, new)


def _fill_tied(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every name of a shared parameter the tensor stored under one of its names."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for names in groups.values():
        stored = [n for n in names if n in state]
        if len(names) > 1 and len(stored) == 1:
            for name in names:
                state[name] = state[stored[0]]


def _buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """{name: buffer} of the buffers a state dict leaves out (registered with persistent=False)."""
    return {f"{m}.{b}" if m else b: module._buffers[b] for m, module in model.named_modules()
            for b in module._non_persistent_buffers_set if module._buffers.get(b) is not None}


def _restore_buffers(model: nn.Module, buffers: dict[str, torch.Tensor]) -> None:
    """Register each saved non-persistent buffer on its module again."""
    for name, value in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner).register_buffer(leaf, value, persistent=False)


def _finish(model: nn.Module) -> list[str]:
    """Tie the weights as the config says; the names of the tensors still on the meta device (none: complete)."""
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]


def _device(device_map) -> torch.device | None:
    if device_map is None:
        return None
    if device_map == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(device_map, str | int | torch.device):
        return torch.device(device_map)
    raise ValueError("a compressed nn-svd model takes device_map=None, 'auto' or one device, not a per-layer map")


def nnsvd_config_dict(base: PretrainedConfig, layers: list[dict]) -> dict:
    """config.json of a compressed model: the base configuration in full, and the nn-svd keys."""
    fields = base.to_dict()
    fields["nnsvd_base_model_type"] = fields.pop("model_type")
    fields["nnsvd_base_architectures"] = fields.pop("architectures", None) or [type_name_of(base)]
    fields.update(model_type=MODEL_TYPE, architectures=["NNSVDForCausalLM"], auto_map=dict(AUTO_MAP),
                  nnsvd_layers=layers)
    return fields


def type_name_of(config: PretrainedConfig) -> str:
    """The base model's class name when config.architectures does not say (GPT-2: GPT2LMHeadModel)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(config.model_type, "")


def _save_pretrained(model: nn.Module, save_directory, **kwargs):
    """Write this folder's format again: the state dict as it is (tied tensors once), config.json with
    the nn-svd keys, the layer list, the non-persistent buffers and this file."""
    from safetensors.torch import save_file, save_model  # installed with transformers, which saves with it

    if kwargs:
        raise TypeError(f"a compressed nn-svd model's save_pretrained takes only the folder, not {sorted(kwargs)}")
    os.makedirs(save_directory, exist_ok=True)
    save_model(model, os.path.join(save_directory, WEIGHTS), metadata={"format": "pt"})
    layers = [
        {"name": name, "shape": [m.out_features, m.in_features], "rank": m.rank,
         "form": "symmetric" if isinstance(m, SymmetricLowRankLinear) else "lowrank"}
        for name, m in model.named_modules() if isinstance(m, LowRankLinear | SymmetricLowRankLinear)
    ]
    with open(os.path.join(save_directory, "config.json"), "w") as f:
        json.dump(nnsvd_config_dict(model.config, layers), f, indent=2, sort_keys=True)
    with open(os.path.join(save_directory, "nnsvd_layers.json"), "w") as f:
        json.dump(layers, f, indent=1)
    buffers = _buffers(model)
    if buffers:
        save_file({k: v.detach().cpu().contiguous().clone() for k, v in buffers.items()},
                  os.path.join(save_directory, BUFFERS))
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(save_directory)
    shutil.copyfile(__file__, os.path.join(save_directory, "modeling_nnsvd.py"))


class NNSVDForCausalLM(PreTrainedModel):
    """Loads a compressed folder as its base model class (see the module docstring)."""

    config_class = NNSVDConfig

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config=None, **kwargs):
        if model_args:
            raise TypeError("a compressed nn-svd model takes no positional model arguments")
        hub = {k: kwargs.pop(k) for k in HUB_KEYS if k in kwargs}
        dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
        device = _device(kwargs.pop("device_map", None))
        for ignored in ("trust_remote_code", "code_revision", "_from_auto", "_commit_hash", "adapter_kwargs"):
            kwargs.pop(ignored, None)
        if kwargs:
            raise TypeError(f"a compressed nn-svd model does not take {sorted(kwargs)}")
        if config is None:
            config = NNSVDConfig.from_pretrained(pretrained_model_name_or_path, **hub)
        base = config.base_config()
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(base)
        _replace_layers(model, list(config.nnsvd_layers))
        state = load_state_dict(cached_file(pretrained_model_name_or_path, WEIGHTS, **hub))
        _fill_tied(model, state)
        model.load_state_dict(state, strict=True, assign=True)
        wanted = list(_buffers(model))
        if wanted:
            path = cached_file(pretrained_model_name_or_path, BUFFERS, **hub)
            buffers = load_state_dict(path)
            if sorted(buffers) != sorted(wanted):
                raise ValueError(f"{BUFFERS} holds {sorted(buffers)[:3]}, the model needs {sorted(wanted)[:3]}")
            _restore_buffers(model, buffers)
        left = _finish(model)
        if left:
            raise ValueError(f"{pretrained_model_name_or_path} holds no values for {', '.join(left[:3])}")
        if dtype not in (None, "auto"):
            model = model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
        if device is not None:
            model = model.to(device)
        model.save_pretrained = _save_pretrained.__get__(model)
        return model.eval()

    @classmethod
    def _from_config(cls, config, **kwargs):
        raise TypeError("a compressed nn-svd model is loaded with from_pretrained(FOLDER, trust_remote_code=True), "
                        "not built from a config")

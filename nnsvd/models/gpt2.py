"""GPT-2: load a pretrained or random model and tokenizer, save and reload compressed checkpoints.

Plain transformers and safetensors; no Hydra, no W&B. A compressed checkpoint is a directory::

    config.json          GPT-2 configuration (transformers' GPT2Config)
    model.safetensors    state dict of the compressed model (tied wte / lm_head stored once)
    nnsvd_layers.json    [{"name", "shape": [out, in], "rank", "form"}] of each factorized layer
    tokenizer files      whatever tokenizer.save_pretrained writes
    nnsvd_meta.json      optional: what the model is (mode, rank, regularizer, where it was made)

and ``load_compressed(directory)`` turns it back into a model without the experiment suite.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import safetensors
import torch
from safetensors.torch import load_file, save_model
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, PreTrainedTokenizerBase

from nnsvd import hub
from nnsvd.errors import CheckpointError, ModelLoadError
from nnsvd.lowrank import layer_records, rebuild_structure
from nnsvd.models.byte_tokenizer import BYTES, byte_level_tokenizer

GPT2_TARGETS = [
    "transformer.h.*.attn.c_attn",
    "transformer.h.*.attn.c_proj",
    "transformer.h.*.mlp.c_fc",
    "transformer.h.*.mlp.c_proj",
]
"""The four Conv1D layers of every block (48 in gpt2); the tied embedding / lm_head stays dense."""

EOS_TOKEN = "<|endoftext|>"
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
LAYERS_FILE = "nnsvd_layers.json"
META_FILE = "nnsvd_meta.json"

# A Hub repository id: "name" or "owner/name" (huggingface_hub's rule, without the length limit).
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


# ------------------------------------------------------------------- model and tokenizer


def is_hub_name(name_or_path: str) -> bool:
    """Whether ``name_or_path`` means a Hub repository: no such local path, and shaped like a Hub id."""
    return (
        not Path(name_or_path).expanduser().exists()
        and not name_or_path.startswith((".", "~", "/"))
        and bool(_HUB_ID.match(name_or_path))
    )


def _local_source(name_or_path: str, what: str, hint: str) -> Path | None:
    """The local directory meant by name_or_path, or None when it is a Hub id.

    An existing path is local. Anything that cannot be a Hub id ("/abs", "./rel", "~/x",
    "a/b/c") is a local path that does not exist, reported as such with the hint.
    """
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(
                f"could not load {what} '{name_or_path}': it is a file, not a directory; {hint}"
            )
        return path
    if name_or_path.startswith((".", "~", "/")) or not _HUB_ID.match(name_or_path):
        raise ModelLoadError(f"could not load {what} '{name_or_path}': no such local directory; {hint}")
    return None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"


_MODEL_HINT = (
    "set model.name_or_path to a local directory written by save_pretrained, or to a Hub name such as "
    "'gpt2' (needs network)"
)
_TOKENIZER_HINT = "use a local directory holding tokenizer.json or vocab.json + merges.txt, or builtin:bytes"


def _hub_error(what: str, name: str, hint: str, error: BaseException) -> ModelLoadError:
    unreachable = hub.unreachable()
    if unreachable is not None:
        cause = (
            f"the Hugging Face Hub ({hub.endpoint()}) is unreachable ({unreachable}) and it is not in the "
            "local Hugging Face cache"
        )
    elif hub.offline():
        cause = "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache (or the name is wrong)"
    else:
        cause = (
            "the Hugging Face Hub is unreachable (offline?) or the name is wrong, and no local directory of "
            f"that name exists ({_first_line(error)})"
        )
    return ModelLoadError(f"could not load {what} '{name}': {cause}; {hint}")


def load_gpt2(name_or_path: str, pretrained: bool = True, config: Mapping | None = None) -> GPT2LMHeadModel:
    """A GPT-2 language model: pretrained weights from a Hub name or local directory, or a random init.

    pretrained=True: ``GPT2LMHeadModel.from_pretrained(name_or_path)`` ("gpt2", "distilgpt2", or a
    directory written by save_pretrained); ``config`` must then be None.
    pretrained=False: a randomly initialized model of ``GPT2Config(**config)`` (keys such as n_layer,
    n_embd, n_head, n_positions, vocab_size; GPT-2 small defaults otherwise). The init draws from
    torch's global RNG, so the caller's torch.manual_seed fixes it.
    """
    if not pretrained:
        return GPT2LMHeadModel(gpt2_config(config or {}))
    if config:
        raise ValueError("config is only used with pretrained=False; a pretrained model brings its own")
    local = _local_source(name_or_path, "GPT-2 model", _MODEL_HINT)
    try:
        return GPT2LMHeadModel.from_pretrained(local if local is not None else name_or_path)
    except (OSError, ValueError) as e:
        if local is None:
            raise _hub_error("GPT-2 model", name_or_path, _MODEL_HINT, e) from e
        raise ModelLoadError(
            f"could not load a GPT-2 model from directory '{local}': it must hold config.json and "
            f"model.safetensors as written by save_pretrained ({_first_line(e)})"
        ) from e


def gpt2_config(overrides: Mapping) -> GPT2Config:
    """GPT2Config(**overrides), refusing keys GPT2Config does not know (a typo would be silently kept)."""
    known = set(GPT2Config().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown GPT-2 config keys {unknown}; known keys include n_layer, n_embd, n_head, "
            "n_positions, vocab_size"
        )
    vocab = overrides.get("vocab_size", GPT2Config().vocab_size)
    last = {"bos_token_id": vocab - 1, "eos_token_id": vocab - 1}  # GPT-2's end of text is its last token
    return GPT2Config(**{**last, **overrides})


def load_tokenizer(name_or_path: str) -> PreTrainedTokenizerBase:
    """The GPT-2 byte-level BPE tokenizer from a Hub name or a local directory, eos = <|endoftext|>.

    A local directory holds either tokenizer.json or the original vocab.json + merges.txt.
    ``builtin:bytes`` is the byte-level tokenizer of 257 tokens (nnsvd.models.byte_tokenizer),
    which needs no files.
    """
    if name_or_path == BYTES:
        return byte_level_tokenizer()
    local = _local_source(name_or_path, "tokenizer", _TOKENIZER_HINT)
    if local is not None:
        has_files = (local / "tokenizer.json").is_file() or all(
            (local / f).is_file() for f in ("vocab.json", "merges.txt")
        )
        if not has_files:
            raise ModelLoadError(f"could not load a tokenizer from directory '{local}': {_TOKENIZER_HINT}")
    try:
        tokenizer = GPT2TokenizerFast.from_pretrained(local if local is not None else name_or_path)
    except (OSError, ValueError) as e:
        if local is None:
            raise _hub_error("tokenizer", name_or_path, _TOKENIZER_HINT, e) from e
        raise ModelLoadError(f"could not load a tokenizer from directory '{local}' ({_first_line(e)})") from e
    # Recent transformers return an empty tokenizer instead of raising when no file was found.
    vocab = tokenizer.get_vocab()
    if len(vocab) <= 1:
        raise _hub_error("tokenizer", name_or_path, _TOKENIZER_HINT, FileNotFoundError("no vocabulary found"))
    if EOS_TOKEN not in vocab:
        raise ModelLoadError(f"tokenizer '{name_or_path}' has no {EOS_TOKEN} token: it is not GPT-2's BPE")
    tokenizer.eos_token = EOS_TOKEN
    return tokenizer


# ------------------------------------------------------------------ compressed checkpoints


def _normalized(layers: Sequence[Mapping]) -> list[dict]:
    return [
        {"name": s["name"], "shape": [int(d) for d in s["shape"]], "rank": int(s["rank"]), "form": s["form"]}
        for s in layers
    ]


def save_compressed(
    model: GPT2LMHeadModel,
    tokenizer: PreTrainedTokenizerBase,
    directory: str | Path,
    layers: Sequence[Mapping] | None = None,
    meta: Mapping | None = None,
) -> Path:
    """Write a compressed GPT-2 to ``directory`` (created if needed) for load_compressed.

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
    # save_model stores tensors shared by several names (tied wte / lm_head) once.
    save_model(model, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
    model.config.save_pretrained(directory)
    (directory / LAYERS_FILE).write_text(json.dumps(records, indent=1) + "\n")
    if meta is not None:
        (directory / META_FILE).write_text(json.dumps(dict(meta), indent=1, default=str) + "\n")
    tokenizer.save_pretrained(directory)
    return directory


def _fill_tied(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every name of a shared parameter the tensor stored under one of its names."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    for names in groups.values():
        stored = [n for n in names if n in state]
        if len(names) > 1 and len(stored) == 1:
            for name in names:
                state[name] = state[stored[0]]


def _mismatch(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """One line describing missing, unexpected and mis-shaped keys, or None when all match."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {expected[k]}"
        for k in sorted(set(expected) & set(state))
        if tuple(state[k].shape) != expected[k]
    ]
    parts = [
        f"{label} ({len(items)}): {', '.join(items[:3])}{' …' if len(items) > 3 else ''}"
        for label, items in (
            ("missing keys", missing),
            ("unexpected keys", unexpected),
            ("shape mismatches", shapes),
        )
        if items
    ]
    return "; ".join(parts) or None


def load_compressed(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) from a directory written by save_compressed.

    The model is built on the meta device (no random init), its factorized layers are
    restored from nnsvd_layers.json, and the safetensors state dict is loaded strictly.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"compressed checkpoint directory '{directory}' does not exist")
    for name in (CONFIG_FILE, LAYERS_FILE, WEIGHTS_FILE):
        if not (directory / name).is_file():
            raise CheckpointError(
                f"'{directory}' has no {name}: it is not a directory written by save_compressed"
            )
    try:
        config_dict = json.loads((directory / CONFIG_FILE).read_text())
        layers = json.loads((directory / LAYERS_FILE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(
            f"'{directory}' has an unreadable config or layer file ({_first_line(e)})"
        ) from e
    model_type = config_dict.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise CheckpointError(f"{directory / CONFIG_FILE} describes a '{model_type}' model, not GPT-2")
    config = GPT2Config.from_dict(config_dict)
    with torch.device("meta"):
        model = GPT2LMHeadModel(config)
        try:
            rebuild_structure(model, layers)
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise CheckpointError(
                f"{directory / LAYERS_FILE} does not fit the model of config.json ({_first_line(e)})"
            ) from e
    try:
        state = load_file(directory / WEIGHTS_FILE, device=str(torch.device(device)))
    except (OSError, safetensors.SafetensorError) as e:
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE} is unreadable or corrupt ({_first_line(e)})"
        ) from e
    _fill_tied(model, state)
    problem = _mismatch(model, state)
    if problem:
        raise CheckpointError(
            f"{directory / WEIGHTS_FILE} does not match the architecture of config.json and "
            f"{LAYERS_FILE} (corrupt, or saved from another model): {problem}"
        )
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    model.eval()
    return model, load_tokenizer(str(directory))

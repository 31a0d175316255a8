"""GPT-2: load a pretrained or random model and tokenizer, save and reload compressed checkpoints.

Plain transformers and safetensors; no Hydra, no W&B. A compressed checkpoint is a directory
written by ``save_compressed`` (config.json, model.safetensors, nnsvd_layers.json, the tokenizer,
nnsvd_meta.json; see ``nnsvd.models.hf_checkpoint``), and ``load_compressed(directory)`` turns it
back into a GPT-2 and its byte-level BPE tokenizer without the experiment suite.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast, PreTrainedTokenizerBase

from nnsvd.errors import CheckpointError, ModelLoadError
from nnsvd.lowrank import layer_records
from nnsvd.models.byte_tokenizer import BYTES, byte_level_tokenizer
from nnsvd.models.hf_checkpoint import CONFIG_FILE, read_config, rebuild_compressed, save_compressed
from nnsvd.models.sources import first_line, hub_error, local_source

__all__ = [
    "GPT2_TARGETS",
    "CheckpointError",
    "ModelLoadError",
    "gpt2_config",
    "layer_records",
    "load_compressed",
    "load_gpt2",
    "load_tokenizer",
    "save_compressed",
]

GPT2_TARGETS = [
    "transformer.h.*.attn.c_attn",
    "transformer.h.*.attn.c_proj",
    "transformer.h.*.mlp.c_fc",
    "transformer.h.*.mlp.c_proj",
]
"""The four Conv1D layers of every block (48 in gpt2); the tied embedding / lm_head stays dense."""

EOS_TOKEN = "<|endoftext|>"

_MODEL_HINT = (
    "set model.name_or_path to a local directory written by save_pretrained, or to a Hub name such as "
    "'gpt2' (needs network)"
)
_TOKENIZER_HINT = "use a local directory holding tokenizer.json or vocab.json + merges.txt, or builtin:bytes"


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
    local = local_source(name_or_path, "GPT-2 model", _MODEL_HINT)
    try:
        return GPT2LMHeadModel.from_pretrained(local if local is not None else name_or_path)
    except (OSError, ValueError) as e:
        if local is None:
            raise hub_error("GPT-2 model", name_or_path, _MODEL_HINT, e) from e
        raise ModelLoadError(
            f"could not load a GPT-2 model from directory '{local}': it must hold config.json and "
            f"model.safetensors as written by save_pretrained ({first_line(e)})"
        ) from e


def gpt2_config(overrides: Mapping) -> GPT2Config:
    """GPT2Config(**overrides), refusing keys GPT2Config does not know (a typo would be silently kept)."""
    known = set(GPT2Config().to_dict())
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"unknown GPT-2 config keys {unknown}; known keys include n_layer, n_embd, n_head, "
            "n_positions, vocab_size, resid_pdrop, embd_pdrop, attn_pdrop"
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
    local = local_source(name_or_path, "tokenizer", _TOKENIZER_HINT)
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
            raise hub_error("tokenizer", name_or_path, _TOKENIZER_HINT, e) from e
        raise ModelLoadError(f"could not load a tokenizer from directory '{local}' ({first_line(e)})") from e
    # Recent transformers return an empty tokenizer instead of raising when no file was found.
    vocab = tokenizer.get_vocab()
    if len(vocab) <= 1:
        raise hub_error("tokenizer", name_or_path, _TOKENIZER_HINT, FileNotFoundError("no vocabulary found"))
    if EOS_TOKEN not in vocab:
        raise ModelLoadError(f"tokenizer '{name_or_path}' has no {EOS_TOKEN} token: it is not GPT-2's BPE")
    tokenizer.eos_token = EOS_TOKEN
    return tokenizer


# ------------------------------------------------------------------ compressed checkpoints


def load_compressed(
    directory: str | Path, device: str | torch.device = "cpu"
) -> tuple[GPT2LMHeadModel, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) from a directory written by save_compressed.

    The model is built on the meta device (no random init), its factorized layers are
    restored from nnsvd_layers.json, and the safetensors state dict is loaded strictly.
    """
    directory = Path(directory)
    config_dict, _ = read_config(directory)
    model_type = config_dict.get("model_type", "gpt2")
    if model_type != "gpt2":
        raise CheckpointError(f"{directory / CONFIG_FILE} describes a '{model_type}' model, not GPT-2")
    model = rebuild_compressed(directory, lambda config: GPT2LMHeadModel(GPT2Config.from_dict(config)), device)
    return model, load_tokenizer(str(directory))

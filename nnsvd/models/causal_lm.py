"""Any Hugging Face causal language model: load it and its tokenizer, its default targets, and
compressed checkpoints of it (LLaMA, Mistral, Qwen2/3, Gemma, OPT, GPT-NeoX, GPT-2, …).

Plain transformers; no Hydra, no W&B. ``trust_remote_code`` is never set unless the caller asks:
a model whose repository brings its own code fails with one line instead.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from unittest.mock import patch

import torch
from filelock import FileLock
from torch import nn
from transformers import (
    CONFIG_MAPPING,
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedTokenizerBase,
)
from transformers import modeling_gguf_pytorch_utils as gguf_utils
from transformers.utils import logging as hf_logging

from nnsvd.errors import CheckpointError, ConfigError, ModelLoadError
from nnsvd.lowrank import decoder_blocks, is_factorizable
from nnsvd.models import gguf
from nnsvd.models.gpt2 import load_tokenizer as load_bpe_files
from nnsvd.models.hf_checkpoint import CONFIG_FILE, read_config, rebuild_compressed, save_compressed
from nnsvd.models.sources import first_line, hub_error, local_source

__all__ = [
    "DEFAULT_TARGETS",
    "DTYPES",
    "build_from_config",
    "default_targets",
    "export_stock",
    "layer_patterns",
    "load_causal_lm",
    "load_compressed",
    "load_causal_tokenizer",
    "load_gguf",
    "save_compressed",
    "torch_dtype",
]

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

_LLAMA = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "qwen3": _LLAMA,
    "gemma": _LLAMA,
    "opt": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "fc1", "fc2"),
    "gpt_neox": ("attention.query_key_value", "attention.dense", "mlp.dense_h_to_4h", "mlp.dense_4h_to_h"),
    "gpt2": ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"),
}
"""The layers of every decoder block compressed by default, per ``config.model_type``, relative to
the block. Embeddings and the LM head are never among them."""

_MODEL_HINT = (
    "set model.name_or_path to a local directory written by save_pretrained, or to a Hub name such as "
    "'meta-llama/Llama-2-7b-hf' (needs network, or the local Hugging Face cache)"
)
_TOKENIZER_HINT = (
    "set model.tokenizer to a local directory holding tokenizer.json (or tokenizer_config.json with its "
    "vocabulary files, or GPT-2's vocab.json + merges.txt), or to a Hub name"
)


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of ``model.dtype``; anything but float32, bfloat16 and float16 is refused."""
    if name not in DTYPES:
        raise ConfigError(f"model.dtype={name} is not allowed: allowed {', '.join(DTYPES)}")
    return DTYPES[name]


def _remote_code_error(name_or_path: str, error: ValueError) -> ModelLoadError | None:
    if "trust_remote_code" not in str(error):
        return None
    return ModelLoadError(
        f"model.name_or_path={name_or_path} needs the custom code of its repository (trust_remote_code), which "
        "nn-svd never runs unless asked: read that code, then set model.trust_remote_code=true, or use a model "
        "that transformers supports itself"
    )


def _load_error(what: str, name_or_path: str, hint: str, local, error: Exception, message: str) -> ModelLoadError:
    """The one line for a failed from_pretrained: custom code refused, the Hub unreachable (a Hub
    name, no local directory), or ``message``."""
    remote = _remote_code_error(name_or_path, error) if isinstance(error, ValueError) else None
    if remote is not None:
        return remote
    if local is None and isinstance(error, OSError):
        return hub_error(what, name_or_path, hint, error)
    return ModelLoadError(message)


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """transformers' "Loading weights" bar off: stderr is for warnings and errors (a line is logged instead)."""
    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


def _log_loaded(name: str, model: nn.Module, dtype: str, start: float) -> None:
    params = sum(p.numel() for p in model.parameters())
    log.info("loaded %s: %s, %s parameters in %s, in %.1f s", name, type(model).__name__,
             f"{params / 1e9:.2f}B" if params >= 1e9 else f"{params / 1e6:.1f}M", dtype, time.perf_counter() - start)


def load_causal_lm(name_or_path: str, dtype: str = "float32", trust_remote_code: bool = False) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(name_or_path)`` in ``dtype``, from a Hub name or a local
    directory written by save_pretrained. trust_remote_code is passed as given (False: a repository
    with its own code is refused, never prompted for)."""
    dt = torch_dtype(dtype)
    local = local_source(name_or_path, "model", _MODEL_HINT)
    source = str(local) if local is not None else name_or_path
    start = time.perf_counter()
    try:
        with _quiet_loading():
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(
                source, config=config, dtype=dt, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError, KeyError) as e:
        raise _load_error("model", name_or_path, _MODEL_HINT, local, e, (
            f"could not load a causal language model from '{name_or_path}' ({first_line(e)}); it must hold "
            "config.json and the weights as written by save_pretrained, of a model type transformers knows"
        )) from e
    _log_loaded(name_or_path, model, dtype, start)
    return model


def _drop_quantization(model: nn.Module) -> None:
    """A dequantized GGUF model is an ordinary one: no quantization config is saved with it."""
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False


def load_gguf(source: gguf.GGUFSource, dtype: str = "float32",
              cache_dir: str | Path | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model, tokenizer) from a GGUF file through transformers' GGUF support, dequantized to ``dtype``.

    With ``cache_dir``, the dequantized model and tokenizer are kept in ``cache_dir/gguf/`` (safetensors,
    keyed by the file's bytes and the dtype) and read from there next time: same tensors, in ~1 s
    instead of transformers' ~45 s of GGUF parsing.
    """
    torch_dtype(dtype)
    gguf.check_gguf(source)
    local = source.path.expanduser()
    if cache_dir is None or not local.is_file():
        return _read_gguf(source, dtype)
    entry = Path(cache_dir) / "gguf" / f"{local.stem}-{gguf.fingerprint(local, dtype)}"
    entry.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{entry}.lock"):  # parallel jobs of a sweep wait for one conversion
        if entry.is_dir():
            start = time.perf_counter()
            model, tokenizer = load_compressed(entry)
            _log_loaded(f"{local} (its dequantized copy {entry})", model, dtype, start)
            return model, tokenizer
        model, tokenizer = _read_gguf(source, dtype)
        tmp = entry.with_name(f".{entry.name}.{os.getpid()}.tmp")  # atomic: no reader sees half a copy
        save_compressed(model, tokenizer, tmp, [])
        os.replace(tmp, entry)
        log.info("dequantized copy kept at %s", entry)
    return model, tokenizer


def _read_gguf(source: gguf.GGUFSource, dtype: str) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    local = source.path.expanduser()
    folder = str(Path(source.folder).expanduser()) if local.exists() else source.folder
    start = time.perf_counter()
    log.info("reading %s and dequantizing it to %s (about half a minute for 135M parameters on 2 cores)",
             source.file, dtype)
    try:
        # transformers draws a tqdm bar per GGUF tensor, which a log file keeps as one endless line
        with _quiet_loading(), patch.object(gguf_utils, "tqdm", lambda items, **_: items):
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=source.file, dtype=torch_dtype(dtype))
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=source.file)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        if not local.exists() and isinstance(e, OSError):
            raise hub_error("GGUF model", f"{source.folder}/{source.file}", _MODEL_HINT, e) from e
        raise ModelLoadError(f"could not load the GGUF model '{local}' ({first_line(e)})") from e
    _drop_quantization(model)
    _log_loaded(str(local), model, dtype, start)
    return model.eval(), tokenizer


def load_causal_tokenizer(name_or_path: str, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    """``AutoTokenizer.from_pretrained(name_or_path)``, from a Hub name or a local directory.

    A local directory with only GPT-2's original vocab.json + merges.txt is read as GPT-2's
    byte-level BPE (AutoTokenizer cannot tell its class without a config).
    """
    local = local_source(name_or_path, "tokenizer", _TOKENIZER_HINT)
    if local is not None and not any((local / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
        if all((local / f).is_file() for f in ("vocab.json", "merges.txt")):
            return load_bpe_files(str(local))
        raise ModelLoadError(f"could not load a tokenizer from directory '{local}': {_TOKENIZER_HINT}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(local or name_or_path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise _load_error("tokenizer", name_or_path, _TOKENIZER_HINT, local, e,
                          f"could not load a tokenizer from '{name_or_path}' ({first_line(e)})") from e
    if len(tokenizer.get_vocab()) <= 1:  # recent transformers return an empty tokenizer when nothing was found
        raise hub_error("tokenizer", name_or_path, _TOKENIZER_HINT, FileNotFoundError("no vocabulary found"))
    return tokenizer


# --------------------------------------------------------------------------------- targets


def layer_patterns(model: nn.Module) -> list[str]:
    """The model's Linear/Conv1D layers as glob patterns, block indices as ``*``, each once, in order
    (``model.layers.*.self_attn.q_proj``, …, ``lm_head``)."""
    patterns: list[str] = []
    for name, module in model.named_modules():
        if name and is_factorizable(module):
            pattern = re.sub(r"\.\d+(?=\.|$)", ".*", name)
            if pattern not in patterns:
                patterns.append(pattern)
    return patterns


def default_targets(model: nn.Module) -> list[str]:
    """The default targets of the model's ``config.model_type`` (DEFAULT_TARGETS) in every decoder
    block, as glob patterns (``model.layers.*.self_attn.q_proj``, …). A model type without defaults
    raises ConfigError listing the model's layers, to pick model.targets from."""
    model_type = getattr(model.config, "model_type", None)
    leaves = DEFAULT_TARGETS.get(model_type)
    if leaves is None:
        raise ConfigError(
            f"model.targets=null, but model type '{model_type}' has no default targets (defaults exist for "
            f"{', '.join(sorted(DEFAULT_TARGETS))}): set model.targets to the layers to compress; its Linear layers "
            f"are {', '.join(layer_patterns(model))}"
        )
    blocks = decoder_blocks(model)
    return [f"{blocks}.*.{leaf}" for leaf in leaves]


# -------------------------------------------------------------------- compressed checkpoints


def build_from_config(config: Mapping) -> nn.Module:
    """The stock causal-LM architecture of a config.json dict (any model type transformers knows)."""
    config = dict(config)
    model_type = config.pop("model_type", None)
    if model_type is None:
        raise ValueError("config.json has no model_type")
    return AutoModelForCausalLM.from_config(CONFIG_MAPPING[model_type].from_dict(config))


def load_compressed(directory: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """(model in eval mode, tokenizer) from a directory written by save_compressed, for any causal LM
    type that transformers knows. The model is built on the meta device, its factorized layers
    restored from nnsvd_layers.json, the weights loaded strictly and the weights tied as its
    config says; nothing is unpickled and no repository code runs.
    """
    directory = Path(directory)
    config, _ = read_config(directory)
    if "auto_map" in config and config.get("model_type") not in CONFIG_MAPPING:
        raise CheckpointError(
            f"{directory / CONFIG_FILE} describes a '{config.get('model_type')}' model with its own code, which "
            "nn-svd does not run; only model types that transformers knows can be reloaded"
        )
    model = rebuild_compressed(directory, build_from_config, device)
    return model, load_causal_tokenizer(str(directory))


def export_stock(directory: str | Path, out: str | Path, device: str | torch.device = "cpu") -> Path:
    """Write the compressed model in ``directory`` to ``out`` as a stock (dense) transformers folder:
    each factorized layer's product back in the base layer (``export_dense``), with the tokenizer.
    It opens without nn-svd and without remote code, and is as large as the dense model."""
    from nnsvd.models.hf_checkpoint import export_dense

    model, tokenizer = load_compressed(directory, device)
    dense = export_dense(model, build_from_config)
    out = Path(out)
    dense.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


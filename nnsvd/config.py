"""Structured-config schema: the dataclasses that conf/ extends, and the check for keys they do
not declare. Part of the base, with ``errors`` and ``files``: the tasks and the run read these
typed sections, and the schema imports nothing from the layers (``nnsvd.run.overrides``
registers it in Hydra's ConfigStore).

The YAML files under conf/ extend these schemas, so a misspelled key or a value of the
wrong type fails at start with Hydra's own message. The schemas live in their own group,
``schema/<group>``, so they are never offered as options of ``model``, ``data`` or
``regularizer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any

from omegaconf import II, MISSING, OmegaConf


class Mode(Enum):
    dense = "dense"  # train (or load) the dense model and evaluate it
    compress = "compress"  # truncated SVD of a trained dense model (+ optional fine-tuning)
    scratch = "scratch"  # factorized model trained from random init


class WandbMode(Enum):
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class MLPConfig:
    name: str = "mlp"
    in_features: int = 784
    hidden: int = 64
    num_classes: int = 10
    dropout: float = 0.1
    targets: list[str] = field(default_factory=lambda: ["l1", "l2"])


@dataclass
class GPT2ArchConfig:
    n_layer: int = 12
    n_embd: int = 768
    n_head: int = 12
    n_positions: int = 1024
    vocab_size: int = 50257
    resid_pdrop: float = 0.1  # training dropout, GPT2Config's defaults: on the blocks' outputs,
    embd_pdrop: float = 0.1   # on the embeddings,
    attn_pdrop: float = 0.1   # and on the attention weights


@dataclass
class GPT2ModelConfig:
    name: str = "gpt2"
    name_or_path: str = "gpt2"
    pretrained: bool = True
    tokenizer: str = "gpt2"
    config: GPT2ArchConfig = field(default_factory=GPT2ArchConfig)
    targets: list[str] = field(
        default_factory=lambda: [
            "transformer.h.*.attn.c_attn",
            "transformer.h.*.attn.c_proj",
            "transformer.h.*.mlp.c_fc",
            "transformer.h.*.mlp.c_proj",
        ]
    )
    sample_prompt: str = "The meaning of low-rank compression is"
    sample_tokens: int = 30


@dataclass
class CausalLMConfig:
    """Any Hugging Face causal LM, loaded with AutoModelForCausalLM (``model=causal_lm``)."""

    name: str = "causal_lm"
    name_or_path: str | None = None  # a Hub name or a local directory written by save_pretrained (required)
    gguf_file: str | None = None  # a GGUF file inside name_or_path (or name_or_path itself ending in .gguf)
    fallback: str | None = None  # a Hub name used when the local name_or_path / gguf_file is not there
    tokenizer: str | None = None  # null = name_or_path (a GGUF file brings its own)
    dtype: str = "float32"  # float32 | bfloat16 | float16 (checked with one line; factorization stays float64)
    trust_remote_code: bool = False  # run a repository's own code: an explicit opt-in, never a default
    targets: list[str] | None = None  # null = the defaults of the model's config.model_type
    sample_prompt: str = "The meaning of low-rank compression is"
    sample_tokens: int = 30


DATA_ROOT = "${oc.env:NNSVD_DATA_ROOT,./data}"


@dataclass
class MNISTDataConfig:
    name: str = "mnist"
    root: str = DATA_ROOT  # relative paths resolve against the start directory
    val_size: int = 5000
    download: bool = True


@dataclass
class TextDataConfig:
    name: str = "text_files"
    root: str = DATA_ROOT
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None


@dataclass
class RegularizerConfig:
    name: str = "none"
    symmetric: bool = False  # tied W = B·Bᵀ on square targets
    alpha: float = 0.0  # weight of the orthonormal penalty Σ‖FᵀF − I‖²


@dataclass
class TrainConfig:
    epochs: int = 10  # MLP
    steps: int = 0  # language models
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = None
    grad_accum: int = 1
    eval_every: int = 0
    seq_len: int | None = None  # LM tokens per training sequence; null = the model's context length


@dataclass
class EvalConfig:
    batch_size: int = 4096
    max_length: int | None = None  # perplexity window; null = the model's context length
    stride: int | None = None  # null = max_length (non-overlapping windows)
    max_tokens: int | None = None  # cap the evaluated stream for quick runs
    validation: bool = True  # also score the validation split (the test split is always scored)
    tasks: list[str] | None = None  # lm-evaluation-harness task names (language models), scored after perplexity
    num_fewshot: int | None = None  # lm-eval's few-shot examples; null = each task's default
    limit: float | None = None  # lm-eval: the first N documents per task (< 1: that fraction); null = all
    tasks_batch_size: int = 1  # lm-eval's batch size
    include_path: str | None = None  # a folder of your own task YAMLs (lm-eval's include_path)


class CompressMethod(Enum):
    auto = "auto"  # plain truncated SVD, fastest routine that meets the accuracy bar
    svd = "svd"  # plain, exact (torch.linalg.svd)
    gram = "gram"  # plain, exact (eigh of the smaller Gram matrix)
    randomized = "randomized"  # plain, torch.svd_lowrank
    asvd = "asvd"  # data-aware: activation-aware scaling (ASVD)
    whiten = "whiten"  # data-aware: Cholesky whitening of the inputs (SVD-LLM)
    fwsvd = "fwsvd"  # data-aware: Fisher-weighted rows (FWSVD)


class Allocation(Enum):
    uniform = "uniform"  # every target keeps the fraction 1 - ratio of its own weights
    spectrum = "spectrum"  # ranks minimizing the summed truncation loss of the method's spectra
    sensitivity = "sensitivity"  # ranks minimizing the summed task-loss increase, measured per layer (ASVD)
    loss = "loss"  # ranks minimizing the method's truncation loss, normalized within each matrix type (SVD-LLM V2)


class Update(Enum):
    block = "block"  # after each block's closed form, Adam on its factors against the dense block's output
    alternating = "alternating"  # per layer, closed-form A/B updates against the dense layer's output (AdaSVD)


class SpectrumLoss(Enum):
    normalized = "normalized"  # each layer's tail divided by its total: every layer weighs the same
    absolute = "absolute"  # the tail itself, in units of the layer's (weighted) output error


@dataclass
class CompressConfig:
    method: CompressMethod = CompressMethod.auto
    allow_full_rank: bool = False  # admit rank = min(m, n): for tests and analysis
    asvd_alpha: float = 0.5  # asvd: s_j = (mean |x_j|)^alpha
    damp: float = 0.01  # whiten: lambda = damp * mean(diag XᵀX)
    ratio: float | None = None  # fraction of the target layers' weights REMOVED, 0 < ratio < 1 (instead of rank)
    allocation: Allocation = Allocation.uniform  # how a ratio is shared out as per-layer ranks
    spectrum_loss: SpectrumLoss = SpectrumLoss.normalized  # allocation=spectrum: the loss it weighs
    sensitivity_ratios: list[float] = field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    sensitivity_samples: int | None = None  # measure on the first N calibration samples; null = all of them
    sensitivity_seq_len: int | None = None  # LM: on the first L tokens of each; null = whole sequences
    update: Update | None = None  # block | alternating: update the factors after the closed form (LMs)
    update_steps: int = 32  # Adam steps per decoder block (block), or A/B rounds per layer (alternating)
    update_lr: float = 1e-4
    update_holdout: float = 0.25  # fraction of the calibration batches held out of the update and scored
    update_eval_every: int = 8  # score the held-out batches every N steps; the best iterate is kept


@dataclass
class CalibrationConfig:
    """Calibration data for the data-aware methods (asvd, whiten, fwsvd): always from training data."""

    samples: int = 2048  # images (MLP) or sequences (LM)
    seq_len: int | None = None  # LM: tokens per sequence; null = the evaluation window
    batch_size: int = 512
    seed: int = II("seed")  # which samples are drawn; default: the run's seed
    split: str = "train"  # train | validation; test is refused
    sequential: bool = False  # calibrate each stage on the model whose earlier stages are compressed
    fisher: bool | None = None  # collect Fisher (FWSVD's weights); null = when the method needs it


@dataclass
class WandbConfig:
    mode: WandbMode = WandbMode.offline
    project: str = "nn-svd"
    entity: str | None = None
    group: str | None = None  # null: the sweep (multirun) or the run itself
    tags: list[str] = field(default_factory=list)


@dataclass
class CacheConfig:
    dense: bool = True  # reuse a dense model trained with the same model/data/train config and seed
    statistics: bool = True  # keep a language model's dense calibration statistics (Grams, Fisher) for a sweep
    dir: str = "${oc.env:NNSVD_CACHE_DIR,outputs/cache}"


@dataclass
class Config:
    model: Any = MISSING
    data: Any = MISSING
    regularizer: RegularizerConfig = field(default_factory=RegularizerConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    finetune: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=0))
    eval: EvalConfig = field(default_factory=EvalConfig)
    compress: CompressConfig = field(default_factory=CompressConfig)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    rank: int | None = None  # null = dense
    mode: Mode | None = None  # null: dense without a rank, compress with one
    seed: int = 42
    device: str = "auto"  # auto → cuda, then mps, then cpu
    checkpoint: str | None = None
    resume: bool = False
    save: bool | None = None  # write the model to the run directory; null: yes, except for checkpoint= evaluations


def plain(value: Any) -> Any:
    """A typed config (or a section of it) as plain JSON data, as ``OmegaConf.to_container(...,
    enum_to_str=True)`` writes it: dataclasses as dicts in field order, enums as their names.

    The W&B config, model.json and the cache keys are made from this, so they do not depend on
    whether the config reached them typed or not."""
    if is_dataclass(value):
        return {f.name: plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Enum):
        return value.name
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items()}
    return value


# ------------------------------------------------------------- keys the schema does not know


def schema_keys(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key of a composed config, e.g. ``compress.ratio``."""
    keys = []
    for key in node.keys() if OmegaConf.is_dict(node) else ():
        path = f"{prefix}{key}"
        keys.append(path)
        child = node._get_node(key)
        if OmegaConf.is_dict(child):
            keys.extend(schema_keys(child, f"{path}."))
    return keys


def unknown_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted keys that a structured section of ``node`` holds but its dataclass does not declare:
    what ``+key=value`` (or ``++key=value``) adds past the schema. Sections typed ``dict`` or ``Any``
    take any key and are not looked into."""
    kind = OmegaConf.get_type(node)
    if not is_dataclass(kind):
        return []
    declared = {f.name for f in fields(kind)}
    found = []
    for key in node:
        path = f"{prefix}{key}"
        if key not in declared:
            found.append(path)
            continue
        child = node._get_node(key)
        if OmegaConf.is_dict(child):
            found.extend(unknown_keys(child, f"{path}."))
    return found


def check_known_keys(cfg: Any) -> None:
    """Refuse, in one line, a key that no schema declares, naming the nearest known keys.

    Hydra refuses ``rnak=8`` and suggests ``+rnak=8``, which it then accepts: the key would be
    silently ignored and the run would finish as if it had not been given."""
    import difflib

    from nnsvd.errors import ConfigError

    unknown = unknown_keys(cfg)
    if not unknown:
        return
    known = [k for k in schema_keys(cfg) if k not in unknown and not any(k.startswith(f"{u}.") for u in unknown)]
    by_leaf: dict[str, list[str]] = {}  # leaf name → the known keys ending in it
    for k in known:
        by_leaf.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    parts = []
    for key in unknown:
        nearest = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
        for leaf in difflib.get_close_matches(key.rsplit(".", 1)[-1], list(by_leaf), n=3, cutoff=0.6):
            nearest += [k for k in by_leaf[leaf] if k not in nearest]
        hint = f"nearest known keys: {', '.join(nearest[:3])}" if nearest else "no known key is close"
        parts.append(f"'{key}' ({hint})")
    section = unknown[0].rpartition(".")[0]
    listed = sorted(k.rsplit(".", 1)[-1] for k in known if k.rpartition(".")[0] == section)
    raise ConfigError(
        f"unknown config key {'; '.join(parts)}: the schema declares no such key, so a run would ignore it. "
        f"Known keys {'of ' + section if section else 'at the top level'}: {', '.join(listed)}"
    )

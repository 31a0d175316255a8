"""Structured-config schema: dataclasses registered in Hydra's ConfigStore, and the resolver
that names run directories.

The YAML files under conf/ extend these schemas, so a misspelled key or a value of the
wrong type fails at start with Hydra's own message. The schemas live in their own group,
``schema/<group>``, so they are never offered as options of ``model``, ``data`` or
``regularizer``.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
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


# ----------------------------------------------------------------- directory names

NAME_LIMIT = 150  # characters of overrides in a directory name; longer sets are cut and hashed
_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")  # what Hydra's override grammar and shells take unquoted


def _safe(text: str) -> str:
    return _UNSAFE.sub("-", text).strip("-")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _override_item(line: str) -> str:
    """``key=value`` → ``key-value``: brackets and quotes dropped, list commas as ``+``, a path
    value as its last component (``checkpoint=runs/…/12-00-00_rank-8`` → ``checkpoint-12-00-00_rank-8``)."""
    key, sep, value = line.lstrip("+~").partition("=")
    if not sep:
        return _safe(key)
    value = value.strip("'\"")
    if "/" in value:
        parts = [p for p in value.split("/") if p]
        if len(parts) > 1 and parts[-1] == "model.safetensors":
            parts.pop()
        value = parts[-1] if parts else value
    value = re.sub(r"[\[\]{}()'\"]", "", value).replace(",", "+")
    sign = "-" if value.startswith("-") and _is_number(value) else ""  # rank=-3 → rank--3, not rank-3
    return f"{_safe(key)}-{sign}{_safe(value)}"


def override_items(overrides: Sequence[str], exclude: Sequence[str] = ()) -> list[str]:
    """The overrides as safe ``key-value`` items, sorted (like Hydra's override_dirname); keys in
    ``exclude`` and Hydra's own overrides are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    items = []
    for line in overrides:
        key = parser.parse_override(line).key_or_group
        if key in exclude or key.startswith("hydra.") or key.startswith("hydra/"):
            continue
        items.append(_override_item(line))
    return sorted(items)


def override_name(overrides: Sequence[str], exclude: Sequence[str] = ()) -> str:
    """A readable name for a set of command-line overrides that is safe as a directory name and
    as an unquoted Hydra override value: ``rank=8 regularizer=symmetric`` → ``rank-8_regularizer-symmetric``.

    The items of ``override_items`` joined by ``_``. A name longer than NAME_LIMIT is cut at an
    item boundary and ends in a hash of the whole set, so it stays unique.
    """
    items = override_items(overrides, exclude)
    name = "_".join(items)
    if len(name) <= NAME_LIMIT:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:8]
    kept = ""
    for item in items:
        if len(kept) + len(item) + 1 > NAME_LIMIT - len(digest) - 1:
            break
        kept = f"{kept}_{item}" if kept else item
    return f"{kept}_{digest}" if kept else digest


SWEPT_ENV = "NNSVD_SWEPT"  # run.py's record of the keys a multirun command line sweeps (hydra.job.env_set)


def _key(override: str) -> str:
    return override.lstrip("+~").split("=", 1)[0]


def parsed_overrides(args: Sequence[str]) -> list:
    """The command line's ``key=value`` arguments as Hydra Overrides; flags, and arguments Hydra
    cannot parse (it reports those itself), are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    parsed = []
    for arg in args:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            parsed.append(parser.parse_override(arg))
        except HydraException:
            continue
    return parsed


def swept_keys(args: Sequence[str]) -> list[str]:
    """The keys that command-line arguments sweep (``rank=1,2,4``, ``range(…)``, ``glob(…)``), in order."""
    keys = []
    for override in parsed_overrides(args):
        if override.is_sweep_override() and override.key_or_group not in keys:
            keys.append(override.key_or_group)
    return keys


def sweep_record(args: Sequence[str]) -> list[str]:
    """The override that tells every job of a multirun which keys its command line sweeps, so that
    job directories are named by those alone (``hydra.job.env_set``, which reaches every launcher's job)."""
    if not any(a in ("-m", "--multirun") for a in args):
        return []
    keys = swept_keys(args)
    return [f"+hydra.job.env_set.{SWEPT_ENV}='{' '.join(keys)}'"] if keys else []


def job_dirname(prefix: Any, *, _root_: Any) -> str:
    """``${nnsvd.dirname:PREFIX}``: PREFIX, then the job's overrides as ``override_name`` writes them.

    It reads ``hydra.overrides.task`` and ``hydra.job.config.override_dirname.exclude_keys``,
    as Hydra's ``${hydra.job.override_dirname}`` does. In a multirun only the swept keys are named
    (``hydra.sweeper.params`` and the command line's sweeps), the job number keeping the names
    unique: ``3_compress.ratio-0.6_recipe-whiten_uniform``. With no overrides the name is PREFIX alone.
    """
    overrides = list(OmegaConf.select(_root_, "hydra.overrides.task", default=None) or [])
    exclude = OmegaConf.select(_root_, "hydra.job.config.override_dirname.exclude_keys", default=None) or []
    if str(OmegaConf.select(_root_, "hydra.mode", default="")).endswith("MULTIRUN"):
        params = OmegaConf.select(_root_, "hydra.sweeper.params", default=None) or {}
        recorded = OmegaConf.select(_root_, f"hydra.job.env_set.{SWEPT_ENV}", default=None) or ""
        swept = {_key(k) for k in params} | set(str(recorded).split())
        overrides = [o for o in overrides if _key(o) in swept]
    name = override_name(overrides, list(exclude))
    return f"{prefix}_{name}" if name else str(prefix)


# ------------------------------------------------------------- checkpoint=DIR alone


def explicit_model_keys(overrides: Sequence[str]) -> set[str]:
    """The model.* keys set on the command line (``model.hidden=32`` → ``hidden``;
    ``model.config.n_layer=2`` → ``config.n_layer``): a checkpoint must agree with them."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    keys = (parser.parse_override(line).key_or_group for line in overrides)
    return {key[len("model."):] for key in keys if key.startswith("model.")}


# The model options that open each kind of checkpoint (the first: the one checkpoint=DIR alone implies),
# and the model.name values among them: a GPT-2 checkpoint is also a causal LM.
KIND_OPTIONS = {"mlp": ("mlp",), "gpt2": ("gpt2", "gpt2_tiny", "causal_lm"), "causal_lm": ("causal_lm", "smollm2")}
KIND_MODELS = {"mlp": ("mlp",), "gpt2": ("gpt2", "causal_lm"), "causal_lm": ("causal_lm",)}


def checkpoint_overrides(args: Sequence[str], defaults: Mapping[str, str]) -> list[str]:
    """The ``model=`` (and ``data=``) overrides that ``checkpoint=DIR`` on the command line implies.

    run.py adds them before Hydra composes, so ``checkpoint=DIR`` needs nothing else. The kind
    comes from DIR's files (model.json: MLP; config.json + nnsvd_layers.json: GPT-2, or any other
    causal LM by config.json's model_type). Where DIR
    is a run directory, the choices of the run that made it (``.hydra/hydra.yaml``, e.g.
    model=gpt2_tiny with data=text_files) are taken; its data choice also beside a user's own
    model=. Nothing is added for a group the command line sets, for a choice equal to the
    primary config's default (``defaults``), or when DIR is not a readable checkpoint (the run
    then fails with its own message). A sweep over several directories gets the choices they
    share. A ``model=`` that does not fit DIR is refused by the run itself, in one line naming both.
    """
    from nnsvd.checkpoint import CheckpointError, checkpoint_info

    given: dict[str, Any] = {override.key_or_group: override for override in parsed_overrides(args)}
    if "checkpoint" not in given:
        return []
    ckpt = given["checkpoint"]
    paths = list(ckpt.sweep_string_iterator()) if ckpt.is_sweep_override() else [ckpt.value()]
    try:
        infos = [checkpoint_info(str(p)) for p in paths if p is not None]
    except CheckpointError:
        return []
    kinds = {info.kind for info in infos}
    if len(kinds) != 1:
        return []
    kind = kinds.pop()
    chosen = {}
    for group in ("model", "data"):
        options = {info.choices.get(group) for info in infos}
        if len(options) == 1 and None not in options:
            chosen[group] = options.pop()
    if chosen.get("model") not in KIND_OPTIONS[kind]:
        chosen = {"model": KIND_OPTIONS[kind][0]}  # a bare directory, or made by another model option
    if "model" in given:
        chosen = {k: v for k, v in chosen.items() if k != "model"}
        user_model = given["model"].value()
        if user_model not in KIND_OPTIONS[kind]:
            return []  # the run refuses it, naming both
    return [f"{group}={option}" for group, option in chosen.items()
            if group not in given and option != defaults.get(group)]


def register_configs() -> None:
    """Store the schemas in Hydra's ConfigStore and register the ``nnsvd.dirname`` resolver."""
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="schema/model", name="mlp", node=MLPConfig)
    cs.store(group="schema/model", name="gpt2", node=GPT2ModelConfig)
    cs.store(group="schema/model", name="causal_lm", node=CausalLMConfig)
    cs.store(group="schema/data", name="mnist", node=MNISTDataConfig)
    cs.store(group="schema/data", name="text", node=TextDataConfig)
    cs.store(group="schema/regularizer", name="regularizer", node=RegularizerConfig)
    OmegaConf.register_new_resolver("nnsvd.dirname", job_dirname, replace=True)


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

"""Structured-config schema: dataclasses registered in Hydra's ConfigStore.

The YAML files under conf/ extend these schemas, so a misspelled key or a value of the
wrong type fails at start with Hydra's own message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import II, MISSING


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
    steps: int = 0  # GPT-2
    batch_size: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    grad_clip: float | None = None
    grad_accum: int = 1
    eval_every: int = 0
    seq_len: int = 128


@dataclass
class EvalConfig:
    batch_size: int = 4096
    max_length: int | None = None  # perplexity window; null = model's n_positions
    stride: int | None = None  # null = max_length (non-overlapping windows)
    max_tokens: int | None = None  # cap the evaluated stream for quick runs


class CompressMethod(Enum):
    auto = "auto"  # plain truncated SVD, fastest routine that meets the accuracy bar
    svd = "svd"  # plain, exact (torch.linalg.svd)
    gram = "gram"  # plain, exact (eigh of the smaller Gram matrix)
    randomized = "randomized"  # plain, torch.svd_lowrank
    asvd = "asvd"  # data-aware: activation-aware scaling (ASVD)
    whiten = "whiten"  # data-aware: Cholesky whitening of the inputs (SVD-LLM)
    fwsvd = "fwsvd"  # data-aware: Fisher-weighted rows (FWSVD)


@dataclass
class CompressConfig:
    method: CompressMethod = CompressMethod.auto
    allow_full_rank: bool = False  # admit rank = min(m, n): for tests and analysis
    asvd_alpha: float = 0.5  # asvd: s_j = (mean |x_j|)^alpha
    damp: float = 0.01  # whiten: lambda = damp * mean(diag XᵀX)


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


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="base_config", node=Config)
    cs.store(group="model", name="mlp_schema", node=MLPConfig)
    cs.store(group="model", name="gpt2_schema", node=GPT2ModelConfig)
    cs.store(group="data", name="mnist_schema", node=MNISTDataConfig)
    cs.store(group="data", name="text_schema", node=TextDataConfig)
    cs.store(group="regularizer", name="regularizer_schema", node=RegularizerConfig)

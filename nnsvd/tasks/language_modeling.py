"""Causal language modeling: build, train, perplexity, sample, save and load.

``LanguageModelingTask`` serves any Hugging Face causal LM (``model=causal_lm``); ``GPT2Task``
is GPT-2 with its own loading (random init from ``model.config``, GPT-2's BPE tokenizer).
Both calibrate data-aware compression one decoder block at a time.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from nnsvd.config import (
    CalibrationConfig,
    CausalLMConfig,
    Config,
    GPT2ModelConfig,
    TextDataConfig,
    TrainConfig,
    plain,
)
from nnsvd.data.calibration import draw_samples
from nnsvd.data.text import load_text_splits, pack_blocks, tokenize_splits
from nnsvd.errors import CheckpointError, ConfigError
from nnsvd.hub import check_hub
from nnsvd.lowrank import layer_records
from nnsvd.lowrank.regularizers import orthonormal_penalty
from nnsvd.models import causal_lm, gguf, gpt2
from nnsvd.models.hf_checkpoint import save_compressed
from nnsvd.models.sources import is_hub_name
from nnsvd.tasks.base import Task
from nnsvd.training import fit
from nnsvd.training.classification import TrainResult
from nnsvd.training.language_modeling import CausalLMSteps
from nnsvd.training.perplexity import (
    check_eval_memory,
    context_length,
    evaluate_perplexity,
    lm_loss,
    resolve_window,
)
from nnsvd.training.zero_shot import evaluate_tasks

log = logging.getLogger(__name__)


class LanguageModelingTask(Task):
    """A Hugging Face causal LM on WikiText-2 (or local text files). Main metric: test perplexity
    (lower is better)."""

    main_metric = "test_ppl"
    higher_is_better = False
    length_key = "steps"
    calibrates_by_block = True  # data-aware compression runs one decoder block at a time
    supports_sample = True

    def __init__(self, cfg: Config, data_root: Path, device: torch.device, cache_dir: Path | None):
        self.model_cfg: CausalLMConfig | GPT2ModelConfig = cfg.model
        self.data_cfg: TextDataConfig = cfg.data
        self.eval_cfg = cfg.eval
        # null = the model's context length
        self.seq_lens = [("train.seq_len", cfg.train.seq_len), ("finetune.seq_len", cfg.finetune.seq_len)]
        self.device = device
        self.seed = cfg.seed
        self.cache_dir = cache_dir
        self.tokenizer: PreTrainedTokenizerBase | None = None  # a checkpoint brings its own
        self.ids: dict[str, torch.Tensor] = {}
        self._blocks: dict[int, torch.Tensor] = {}
        self._gguf_tokenizer: PreTrainedTokenizerBase | None = None  # read with a GGUF model, for prepare
        self.gguf: gguf.GGUFSource | None = None
        self.source: str | None = cfg.model.name_or_path  # what is loaded: name_or_path, or the fallback
        self.weights: str | None = None  # which weights a pretrained model has: recorded in results.json
        self.zero_shot = None  # lm-eval's TaskManager when eval.tasks is set (nnsvd.training.zero_shot.check_tasks)
        self._check_model_settings()

    def length(self, train: TrainConfig) -> int:
        return train.steps

    # -- what differs between model kinds

    def _check_model_settings(self) -> None:
        """One line for a bad dtype or an unloadable GGUF file, before anything loads; a missing local
        GGUF file with model.fallback set falls back to that Hub model."""
        m = self.model_cfg
        causal_lm.torch_dtype(m.dtype)
        name = m.name_or_path
        if not name:
            if m.gguf_file:
                raise ConfigError(f"model.gguf_file={m.gguf_file} needs model.name_or_path: the folder (or Hub "
                                  "repository) that holds it")
            return  # _model_source says what is missing when the model is built
        self.gguf = gguf.split_source(name, m.gguf_file)
        if self.gguf is not None and m.fallback and not self.gguf.path.expanduser().is_file():
            log.warning("%s is not there: using model.fallback=%s instead (unquantized, from the Hub or its cache)",
                        self.gguf.path, m.fallback)
            self.weights = f"{m.fallback} (model.fallback: {self.gguf.path} not found)"
            self.gguf, self.source = None, m.fallback
            return
        if self.gguf is not None:
            gguf.check_gguf(self.gguf)
            self.weights = f"{self.gguf.path} (GGUF, dequantized to {m.dtype})"
        else:
            self.weights = name

    def _model_source(self) -> str:
        name = self.model_cfg.name_or_path
        if not name:
            raise ConfigError(
                "model=causal_lm needs model.name_or_path: a Hub name (e.g. meta-llama/Llama-2-7b-hf) or a local "
                "directory written by save_pretrained"
            )
        return self.source

    def _tokenizer_source(self) -> str | None:
        return self.model_cfg.tokenizer or self._model_source()

    def _hub_sources(self) -> list[str]:
        """What this run would fetch from the Hugging Face Hub."""
        sources = []
        if self.tokenizer is None and self.model_cfg.name_or_path:  # no checkpoint: the model and tokenizer
            model = self._model_source()                                 # come from model.*
            local_gguf = self.gguf is not None and self.gguf.path.expanduser().exists()
            if self.gguf is not None and not local_gguf:
                sources.append(f"GGUF file '{self.gguf.file}' of '{self.gguf.folder}'")
            elif self.gguf is None and is_hub_name(model):
                sources.append(f"model '{model}'")
            tokenizer = self.model_cfg.tokenizer or (None if self.gguf is not None else model)
            if tokenizer and is_hub_name(tokenizer) and tokenizer != model:
                sources.append(f"tokenizer '{tokenizer}'")
        if self.data_cfg.name == "wikitext2":
            sources.append("dataset WikiText-2")
        return sources

    def _load_model(self) -> nn.Module:
        m = self.model_cfg
        if self.gguf is not None:
            model, self._gguf_tokenizer = causal_lm.load_gguf(self.gguf, m.dtype, self.cache_dir)
            return model
        return causal_lm.load_causal_lm(self._model_source(), m.dtype, m.trust_remote_code)

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        if self.gguf is not None and not self.model_cfg.tokenizer:  # the GGUF file's own
            if self._gguf_tokenizer is None:
                self._gguf_tokenizer = causal_lm.load_gguf(self.gguf, self.model_cfg.dtype, self.cache_dir)[1]
            return self._gguf_tokenizer
        return causal_lm.load_causal_tokenizer(self._tokenizer_source(), self.model_cfg.trust_remote_code)

    def _load_compressed(self, directory: Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
        return causal_lm.load_compressed(directory, device=self.device)

    def targets(self, model: nn.Module) -> list[str]:
        """model.targets, or (null) the default targets of the model's type."""
        given = self.model_cfg.targets
        return list(given) if given is not None else causal_lm.default_targets(model)

    # -- the flow

    def _check_hub(self) -> None:
        sources = self._hub_sources()
        if sources:  # one quick probe instead of minutes of retries when the Hub is unreachable
            check_hub(", ".join(sources))

    def prepare(self) -> None:
        """The tokenizer (unless a checkpoint brought one) and the tokenized text splits."""
        self._check_hub()
        if self.tokenizer is None:
            self.tokenizer = self._load_tokenizer()
        d = self.data_cfg
        splits = load_text_splits(
            d.name,
            train_file=d.train_file,
            validation_file=d.validation_file,
            test_file=d.test_file,
            cache_dir=None if self.cache_dir is None else str(self.cache_dir / "datasets"),
        )
        self.ids = tokenize_splits(splits, self.tokenizer)

    # -- model

    def build(self) -> nn.Module:
        """The dense model; checks the lengths against its context length."""
        self._check_hub()
        model = self._load_model()
        self._check_lengths(model)
        return model.to(self.device)

    def _check_lengths(self, model: nn.Module) -> None:
        limit, key = context_length(model.config)
        for setting, seq_len in self.seq_lens:
            if seq_len is not None and not 1 <= seq_len <= limit:
                raise ConfigError(
                    f"{setting}={seq_len} is out of range: allowed 1 ≤ {setting} ≤ {limit} (the model's {key}), "
                    f"or null for {limit}"
                )
        max_length, _ = resolve_window(self.eval_cfg.max_length, self.eval_cfg.stride, limit, key)
        check_eval_memory(model, self.eval_cfg.batch_size, max_length, self.device)

    # -- training and evaluation

    def _train_blocks(self, seq_len: int) -> torch.Tensor:
        if seq_len not in self._blocks:
            self._blocks[seq_len] = pack_blocks(self.ids["train"], seq_len)
        return self._blocks[seq_len]

    def _perplexity(self, model: nn.Module, split: str) -> dict:
        e = self.eval_cfg
        return evaluate_perplexity(
            model,
            self.ids[split],
            max_length=e.max_length,
            stride=e.stride,
            batch_size=e.batch_size,
            max_tokens=e.max_tokens,
            device=self.device,
            desc=f"evaluating {split}",
        )

    def train(
        self,
        model: nn.Module,
        train_cfg: TrainConfig,
        *,
        alpha: float,
        log_fn: Callable[[dict], None],
        desc: str,
        lr_key: str,
        should_stop: Callable[[], bool] | None = None,
        resume_state: dict | None = None,
    ) -> TrainResult:
        t = train_cfg
        seq_len = t.seq_len or context_length(model.config)[0]
        log.info("%s: %d sequences of %d tokens a step", desc, t.batch_size * t.grad_accum, seq_len)
        recipe = CausalLMSteps(
            self._train_blocks(seq_len),
            steps=t.steps,
            batch_size=t.batch_size,
            lr=t.lr,
            weight_decay=t.weight_decay,
            warmup_steps=t.warmup_steps,
            grad_clip=t.grad_clip or 0.0,
            grad_accum=t.grad_accum,
            eval_every=t.eval_every,
            eval_fn=lambda m: self._perplexity(m, "validation")["ppl"],
            penalty_fn=orthonormal_penalty,
            alpha=alpha,
            log_every=max(1, t.steps // 50),
            device=self.device,
            seed=self.seed,
            lr_key=lr_key,
        )
        return fit(model, recipe, log=log_fn, should_stop=should_stop, resume_state=resume_state)

    def evaluate(self, model: nn.Module) -> dict:
        test = self._perplexity(model, "test")
        metrics = {"test_ppl": test["ppl"], "test_nll": test["nll"], "test_tokens": test["tokens"]}
        if self.eval_cfg.validation:
            val = self._perplexity(model, "validation")
            metrics.update(val_ppl=val["ppl"], val_tokens=val["tokens"])
        if self.zero_shot is not None:
            metrics.update(evaluate_tasks(model, self.tokenizer, plain(self.eval_cfg), self.zero_shot, self.device, self.seed))
        return metrics

    def calibration_batches(self, cal: CalibrationConfig, model: nn.Module) -> list[torch.Tensor]:
        """``cal.samples`` sequences of ``cal.seq_len`` tokens (null: the evaluation window) from the
        training stream (never test), drawn with ``cal.seed``, in batches."""
        limit, key = context_length(model.config)
        seq_len = cal.seq_len or resolve_window(self.eval_cfg.max_length, self.eval_cfg.stride, limit, key)[0]
        if not 1 <= seq_len <= limit:
            raise ConfigError(
                f"calibration.seq_len={seq_len} is out of range: allowed 1 ≤ calibration.seq_len ≤ {limit} "
                f"(the model's {key})"
            )
        stream = self.ids["train" if cal.split == "train" else "validation"]
        blocks = pack_blocks(stream, seq_len)
        idx = draw_samples(len(blocks), cal, unit=f"sequences of {seq_len} tokens")
        return list(blocks[idx].to(self.device).split(cal.batch_size))

    @staticmethod
    def calibration_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return lm_loss(model, batch)

    @torch.inference_mode()
    def sample(self, model: nn.Module) -> str:
        """Greedy continuation of model.sample_prompt (deterministic), for a look at the model; at most
        model.sample_tokens new tokens, and no more than the model's context holds."""
        prompt = self.model_cfg.sample_prompt
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(self.device)
        context, _ = context_length(model.config)
        ids = ids[:, -(context - 1):]
        was_training = model.training
        model.eval()
        out = model.generate(
            ids,
            max_new_tokens=min(self.model_cfg.sample_tokens, context - ids.shape[1]),
            do_sample=False,
            pad_token_id=self.tokenizer.eos_token_id,
        )
        model.train(was_training)
        return self.tokenizer.decode(out[0], skip_special_tokens=True)

    # -- checkpoints

    def save(self, model: nn.Module, directory: Path, meta: Mapping | None = None) -> Path:
        save_compressed(model, self.tokenizer, directory, layer_records(model), meta=meta)
        return Path(directory)

    def load(self, path: str | Path) -> tuple[nn.Module, dict]:
        """A model this run saved (dense cache, interrupted state), used with this run's tokenizer."""
        model, _ = self._load_compressed(Path(path))
        if model.config.vocab_size < len(self.tokenizer):
            raise ConfigError(
                f"checkpoint={path} has vocab_size={model.config.vocab_size} but model.tokenizer has "
                f"{len(self.tokenizer)} tokens; use the tokenizer saved with it"
            )
        self._check_lengths(model)
        return model, {"layers": layer_records(model)}

    def open_checkpoint(self, path: str | Path, explicit: set[str]) -> tuple[nn.Module, dict]:
        """The user's checkpoint=: its config.json, layers and tokenizer are used (no Hub call);
        model.config.* keys given on the command line (``explicit``) must agree with it."""
        model, tokenizer = self._load_compressed(Path(path) if Path(path).is_dir() else Path(path).parent)
        saved = model.config.to_dict()
        given = self._architecture()
        diff = [
            f"model.config.{key}={saved.get(key)!r} in the checkpoint but {given[key]!r} here"
            for key in sorted(k[len("config."):] for k in explicit if k.startswith("config."))
            if key in given and saved.get(key) != given[key]
        ]
        if diff:
            raise CheckpointError(f"checkpoint={path} is of another architecture: {', '.join(diff)}")
        self.tokenizer = tokenizer
        self._check_lengths(model)
        return model, {"layers": layer_records(model)}

    def _architecture(self) -> dict:
        """The model.config.* settings a checkpoint's config.json is checked against: none, the
        checkpoint's own config.json is the architecture."""
        return {}


class GPT2Task(LanguageModelingTask):
    """GPT-2 (``model=gpt2``, ``model=gpt2_tiny``): pretrained from a Hub name or local directory, or a
    random init from model.config; GPT-2's byte-level BPE tokenizer; model.targets as configured."""

    model_cfg: GPT2ModelConfig

    def _check_model_settings(self) -> None:
        m = self.model_cfg
        self.weights = m.name_or_path if m.pretrained else None

    def _hub_sources(self) -> list[str]:
        m, sources = self.model_cfg, []
        if self.tokenizer is None:  # no checkpoint: the model and tokenizer come from model.*
            if m.pretrained and is_hub_name(m.name_or_path):
                sources.append(f"model '{m.name_or_path}'")
            if is_hub_name(m.tokenizer):
                sources.append(f"tokenizer '{m.tokenizer}'")
        if self.data_cfg.name == "wikitext2":
            sources.append("dataset WikiText-2")
        return sources

    def _load_model(self) -> nn.Module:
        m = self.model_cfg
        return gpt2.load_gpt2(m.name_or_path, pretrained=m.pretrained, config=None if m.pretrained else plain(m.config))

    def _load_tokenizer(self) -> PreTrainedTokenizerBase:
        return gpt2.load_tokenizer(self.model_cfg.tokenizer)

    def _load_compressed(self, directory: Path) -> tuple[nn.Module, PreTrainedTokenizerBase]:
        return gpt2.load_compressed(directory, device=self.device)

    def targets(self, model: nn.Module) -> list[str]:
        return list(self.model_cfg.targets)

    def _architecture(self) -> dict:
        return plain(self.model_cfg.config)

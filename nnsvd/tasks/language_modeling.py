"""GPT-2 causal language modeling: build, train, perplexity, sample, save and load."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from nnsvd.calibration_data import draw_samples
from nnsvd.data.text import load_text_splits, pack_blocks, tokenize_splits
from nnsvd.errors import CheckpointError, ConfigError
from nnsvd.hub import check_hub
from nnsvd.lowrank import layer_records
from nnsvd.models.gpt2 import is_hub_name, load_compressed, load_gpt2, load_tokenizer, save_compressed
from nnsvd.perplexity import evaluate_perplexity, resolve_window
from nnsvd.regularizers import orthonormal_penalty
from nnsvd.train import TrainResult
from nnsvd.train_lm import train_causal_lm

log = logging.getLogger(__name__)


class LanguageModelingTask:
    """GPT-2 on WikiText-2 (or local text files). Main metric: test perplexity (lower is better)."""

    main_metric = "test_ppl"
    higher_is_better = False
    length_key = "steps"

    def __init__(self, cfg: Mapping, data_root: Path, device: torch.device, cache_dir: Path | None):
        self.model_cfg = cfg["model"]
        self.data_cfg = cfg["data"]
        self.eval_cfg = cfg["eval"]
        # null = the model's n_positions
        self.seq_lens = [(f"{phase}.seq_len", cfg[phase]["seq_len"]) for phase in ("train", "finetune")]
        self.device = device
        self.seed = cfg["seed"]
        self.cache_dir = cache_dir
        self.tokenizer: PreTrainedTokenizerBase | None = None  # a checkpoint brings its own
        self.ids: dict[str, torch.Tensor] = {}
        self._blocks: dict[int, torch.Tensor] = {}

    def _hub_sources(self) -> list[str]:
        """What this run would fetch from the Hugging Face Hub."""
        m, sources = self.model_cfg, []
        if self.tokenizer is None:  # no checkpoint: the model and tokenizer come from model.*
            if m["pretrained"] and is_hub_name(m["name_or_path"]):
                sources.append(f"model '{m['name_or_path']}'")
            if is_hub_name(m["tokenizer"]):
                sources.append(f"tokenizer '{m['tokenizer']}'")
        if self.data_cfg["name"] == "wikitext2":
            sources.append("dataset WikiText-2")
        return sources

    def _check_hub(self) -> None:
        sources = self._hub_sources()
        if sources:  # one quick probe instead of minutes of retries when the Hub is unreachable
            check_hub(", ".join(sources))

    def prepare(self) -> None:
        """The tokenizer (unless a checkpoint brought one) and the tokenized text splits."""
        self._check_hub()
        if self.tokenizer is None:
            self.tokenizer = load_tokenizer(self.model_cfg["tokenizer"])
        d = self.data_cfg
        splits = load_text_splits(
            d["name"],
            train_file=d["train_file"],
            validation_file=d["validation_file"],
            test_file=d["test_file"],
            cache_dir=None if self.cache_dir is None else str(self.cache_dir / "datasets"),
        )
        self.ids = tokenize_splits(splits, self.tokenizer)

    # -- model

    def build(self) -> nn.Module:
        """The dense model (pretrained or random init); checks lengths against n_positions."""
        m = self.model_cfg
        self._check_hub()
        model = load_gpt2(m["name_or_path"], pretrained=m["pretrained"], config=None if m["pretrained"] else m["config"])
        self._check_lengths(model.config.n_positions)
        return model.to(self.device)

    def _check_lengths(self, n_positions: int) -> None:
        for key, seq_len in self.seq_lens:
            if seq_len is not None and not 1 <= seq_len <= n_positions:
                raise ConfigError(
                    f"{key}={seq_len} is out of range: allowed 1 ≤ {key} ≤ {n_positions} (the model's n_positions), "
                    f"or null for {n_positions}"
                )
        resolve_window(self.eval_cfg["max_length"], self.eval_cfg["stride"], n_positions)

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
            max_length=e["max_length"],
            stride=e["stride"],
            batch_size=e["batch_size"],
            max_tokens=e["max_tokens"],
            device=self.device,
        )

    def train(
        self,
        model: nn.Module,
        train_cfg: Mapping,
        *,
        alpha: float,
        log_fn: Callable[[dict], None],
        desc: str,
        lr_key: str,
        should_stop: Callable[[], bool] | None = None,
        resume_state: dict | None = None,
    ) -> TrainResult:
        t = train_cfg
        seq_len = t["seq_len"] or model.config.n_positions
        log.info("%s: %d sequences of %d tokens a step", desc, t["batch_size"] * t["grad_accum"], seq_len)
        out = train_causal_lm(
            model,
            self._train_blocks(seq_len),
            steps=t["steps"],
            batch_size=t["batch_size"],
            lr=t["lr"],
            weight_decay=t["weight_decay"],
            warmup_steps=t["warmup_steps"],
            grad_clip=t["grad_clip"] or 0.0,
            grad_accum=t["grad_accum"],
            eval_every=t["eval_every"],
            eval_fn=lambda m: self._perplexity(m, "validation")["ppl"],
            penalty_fn=orthonormal_penalty,
            alpha=alpha,
            log_fn=lambda metrics, step: log_fn({"step": step, **metrics}),
            log_every=max(1, t["steps"] // 50),
            should_stop=should_stop,
            device=self.device,
            seed=self.seed,
            resume_state=resume_state,
            lr_key=lr_key,
        )
        return TrainResult(
            train_s=out["train_s"], epochs=out["steps"], history=out["history"], interrupted=out["interrupted"],
            resume_state=out["resume_state"],
        )

    def evaluate(self, model: nn.Module) -> dict:
        test, val = self._perplexity(model, "test"), self._perplexity(model, "validation")
        return {
            "test_ppl": test["ppl"],
            "test_nll": test["nll"],
            "test_tokens": test["tokens"],
            "val_ppl": val["ppl"],
            "val_tokens": val["tokens"],
        }

    def calibration_batches(self, cal: Mapping, model: nn.Module) -> list[torch.Tensor]:
        """``cal.samples`` sequences of ``cal.seq_len`` tokens (null: the evaluation window) from the
        training stream (never test), drawn with ``cal.seed``, in batches."""
        n_positions = model.config.n_positions
        seq_len = cal["seq_len"] or resolve_window(self.eval_cfg["max_length"], self.eval_cfg["stride"], n_positions)[0]
        if not 1 <= seq_len <= n_positions:
            raise ConfigError(
                f"calibration.seq_len={seq_len} is out of range: allowed 1 ≤ calibration.seq_len ≤ {n_positions} "
                "(the model's n_positions)"
            )
        stream = self.ids["train" if cal["split"] == "train" else "validation"]
        blocks = pack_blocks(stream, seq_len)
        idx = draw_samples(len(blocks), cal, unit=f"sequences of {seq_len} tokens")
        return list(blocks[idx].to(self.device).split(cal["batch_size"]))

    @staticmethod
    def calibration_loss(model: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return model(input_ids=batch, labels=batch).loss

    @torch.inference_mode()
    def sample(self, model: nn.Module) -> str:
        """Greedy continuation of model.sample_prompt (deterministic), for a look at the model; at most
        model.sample_tokens new tokens, and no more than the model's context holds."""
        prompt = self.model_cfg["sample_prompt"]
        ids = self.tokenizer(prompt, return_tensors="pt").input_ids.to(self.device)
        ids = ids[:, -(model.config.n_positions - 1):]
        was_training = model.training
        model.eval()
        out = model.generate(
            ids,
            max_new_tokens=min(self.model_cfg["sample_tokens"], model.config.n_positions - ids.shape[1]),
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
        model, tokenizer = load_compressed(path, device=self.device)
        if model.config.vocab_size < len(self.tokenizer):
            raise ConfigError(
                f"checkpoint={path} has vocab_size={model.config.vocab_size} but model.tokenizer has "
                f"{len(self.tokenizer)} tokens; use the tokenizer saved with it"
            )
        self._check_lengths(model.config.n_positions)
        return model, {"layers": layer_records(model)}

    def open_checkpoint(self, path: str | Path, explicit: set[str]) -> tuple[nn.Module, dict]:
        """The user's checkpoint=: its config.json, layers and tokenizer are used (no Hub call);
        model.config.* keys given on the command line (``explicit``) must agree with it."""
        model, tokenizer = load_compressed(Path(path) if Path(path).is_dir() else Path(path).parent, device=self.device)
        saved = model.config.to_dict()
        given = self.model_cfg.get("config") or {}
        diff = [
            f"model.config.{key}={saved.get(key)!r} in the checkpoint but {given[key]!r} here"
            for key in sorted(k[len("config."):] for k in explicit if k.startswith("config."))
            if key in given and saved.get(key) != given[key]
        ]
        if diff:
            raise CheckpointError(f"checkpoint={path} is of another architecture: {', '.join(diff)}")
        self.tokenizer = tokenizer
        self._check_lengths(model.config.n_positions)
        return model, {"layers": layer_records(model)}

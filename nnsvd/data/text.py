"""Language-modelling text: WikiText-2 (Hub or local files) tokenized into one token stream per split.

Plain datasets + torch; no Hydra, no W&B. The pipeline is the one of transformers' run_clm:
load line-level text → tokenize every line in order (cached by datasets) → concatenate →
cut into equal blocks for training, or score the stream with a sliding window for perplexity.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from pathlib import Path

import datasets
import pyarrow.compute as pc
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from nnsvd import hub
from nnsvd.errors import DataError

log = logging.getLogger(__name__)


@contextmanager
def _quiet_datasets():
    """datasets' bars off (a log file would keep every redraw of them); a line is logged instead."""
    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def load_text_splits(
    kind: str,
    *,
    train_file: str | Path | None = None,
    validation_file: str | Path | None = None,
    test_file: str | Path | None = None,
    cache_dir: str | Path | None = None,
) -> datasets.DatasetDict:
    """DatasetDict with splits train / validation / test and one "text" column, one row per line.

    kind="wikitext2": the Hub's wikitext-2-raw-v1 (needs network or a warm datasets cache).
    kind="text_files": the three local files (e.g. wiki.{train,valid,test}.raw). Lines keep
    their trailing newline, so a split's rows joined with "" equal its file.
    """
    cache = None if cache_dir is None else str(cache_dir)
    if kind == "wikitext2":
        try:
            with _quiet_datasets():
                return datasets.load_dataset("wikitext", "wikitext-2-raw-v1", cache_dir=cache)
        except (OSError, ValueError) as e:  # ConnectionError is an OSError
            unreachable = hub.unreachable()
            cause = (
                f"the Hub ({hub.endpoint()}) is unreachable ({unreachable}) and it is not in the local cache"
                if unreachable is not None
                else f"unreachable or offline? ({type(e).__name__}: {str(e).strip().splitlines()[0]})"
            )
            raise DataError(
                f"could not load WikiText-2 from the Hugging Face Hub: {cause}; use data=text_files with "
                "data.train_file / data.validation_file / data.test_file pointing at local wiki.*.raw files"
            ) from e
    if kind == "text_files":
        files = {"train": train_file, "validation": validation_file, "test": test_file}
        for split, path in files.items():
            if path is None:
                raise DataError(f"data.{split}_file is not set: data=text_files needs all three files")
            if not Path(path).is_file():
                raise DataError(f"data.{split}_file: no such file: {path}")
        data_files = {split: str(path) for split, path in files.items()}
        with _quiet_datasets():
            return datasets.load_dataset("text", data_files=data_files, cache_dir=cache, keep_linebreaks=True)
    raise ValueError(f"data kind {kind!r} is unknown; allowed: wikitext2, text_files")


def _tokenize_batch(batch: dict, tokenizer: PreTrainedTokenizerBase) -> dict:
    # verbose=False: lines longer than model_max_length are fine, they become part of a stream.
    return {"input_ids": tokenizer(batch["text"], return_attention_mask=False, verbose=False)["input_ids"]}


def tokenize_splits(
    dsd: datasets.DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    *,
    num_proc: int | None = None,
    batch_size: int = 1000,
) -> dict[str, Tensor]:
    """{split: 1-D LongTensor}: each split's lines tokenized in order and concatenated.

    Tokenization runs through Dataset.map, so datasets caches it next to the loaded data
    (keyed by the data's and the tokenizer's fingerprints) and a second call reads the cache
    instead of tokenizing again. Tokenizing line by line equals tokenizing the joined text
    except where a BPE merge would have crossed a line boundary (as in run_clm).
    """
    streams = {}
    start = time.perf_counter()
    for split, ds in dsd.items():
        with _quiet_datasets():
            tokenized = ds.map(
            _tokenize_batch,
                fn_kwargs={"tokenizer": tokenizer},
                batched=True,
                batch_size=batch_size,
                num_proc=num_proc,
                remove_columns=ds.column_names,
                desc=f"tokenizing {split}",
            )
        ids = tokenized.with_format("arrow")[:]["input_ids"]
        # a copy: the arrow buffer is read-only (and may be memory-mapped from the cache)
        streams[split] = torch.tensor(pc.list_flatten(ids).to_numpy(zero_copy_only=False), dtype=torch.long)
    log.info("tokenized in %.1f s (or read from the datasets cache): %s", time.perf_counter() - start,
             ", ".join(f"{split} {len(ids):,} tokens" for split, ids in streams.items()))
    return streams


def pack_blocks(ids: Tensor, block_size: int) -> Tensor:
    """(N, block_size) consecutive blocks of a 1-D token stream, N = len(ids) // block_size.

    The remainder is dropped (run_clm's group_texts).
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D token stream, got shape {tuple(ids.shape)}")
    if block_size < 1:
        raise ValueError(f"block_size={block_size} must be ≥ 1")
    n = ids.numel() // block_size
    if n == 0:
        raise ValueError(f"the stream has {ids.numel()} tokens, fewer than one block of {block_size}")
    return ids[: n * block_size].reshape(n, block_size)

"""A byte-level tokenizer for GPT-2 models: one token per UTF-8 byte, plus <|endoftext|>.

GPT-2's own BPE has 50,257 tokens, so in a small GPT-2 the embedding and LM head hold most of
the parameters and most of the compute, and compressing the blocks barely moves perplexity.
With 257 tokens the blocks carry the modeling. The tokenizer is GPT-2's byte-level BPE with no
merges (bytes map to the same printable symbols as in GPT-2), so it saves and reloads as a
plain ``tokenizer.json`` like any other; ``model.tokenizer=builtin:bytes`` selects it.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import bytes_to_unicode

BYTES = "builtin:bytes"
EOS_TOKEN = "<|endoftext|>"


def byte_level_tokenizer() -> PreTrainedTokenizerFast:
    """Token id b for byte b (0–255) and 256 for <|endoftext|>; decode(encode(text)) == text."""
    symbols = bytes_to_unicode()
    vocab = {symbols[b]: b for b in range(256)}
    vocab[EOS_TOKEN] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS_TOKEN, model_max_length=10**9)

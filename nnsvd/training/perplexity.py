"""Perplexity of a causal language model on a token stream, by the strided sliding window.

The method of https://huggingface.co/docs/transformers/perplexity: windows of at most
``max_length`` tokens start at 0, s, 2s, … (s = stride); each window scores only the tokens
that no earlier window scored, so every scored token sees up to max_length − s tokens of
context it did not have to predict itself. Windows of equal length are batched together.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from nnsvd.errors import ConfigError
from nnsvd.lowrank.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Window:
    """Tokens [begin, end) go in; the targets are [end − trg_len, end) minus the window's first token."""

    begin: int
    end: int
    trg_len: int

    @property
    def length(self) -> int:
        return self.end - self.begin

    @property
    def first_target(self) -> int:
        """Offset in the window of the first scored token (≥ 1: position 0 has no context)."""
        return max(self.length - self.trg_len, 1)


def strided_windows(n: int, max_length: int, stride: int) -> list[Window]:
    """The windows covering a stream of n tokens, as in the HF guide's loop (the last one may be shorter)."""
    windows, prev_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        windows.append(Window(begin, end, end - prev_end))
        prev_end = end
        if end == n:
            break
    return windows


def context_length(config) -> tuple[int, str]:
    """(the model's context length, the config key it comes from): ``max_position_embeddings``,
    which GPT-2's config calls ``n_positions``; ``n_ctx`` or ``seq_length`` for configs without it."""
    aliases = getattr(config, "attribute_map", {})
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value, aliases.get(key, key)
    raise ValueError(
        f"{type(config).__name__} has no max_position_embeddings or n_positions: the model's context length is unknown"
    )


def resolve_window(
    max_length: int | None, stride: int | None, n_positions: int, limit: str = "n_positions"
) -> tuple[int, int]:
    """(max_length, stride) with their defaults (n_positions; max_length) applied and checked.

    ``n_positions`` is the model's context length; ``limit`` names it in the errors."""
    max_length = n_positions if max_length is None else max_length
    stride = max_length if stride is None else stride
    if not 2 <= max_length <= n_positions:
        raise ConfigError(
            f"eval.max_length={max_length} is out of range: allowed 2 ≤ eval.max_length ≤ {n_positions} "
            f"(the model's {limit})"
        )
    if not 1 <= stride <= max_length:
        raise ConfigError(
            f"eval.stride={stride} is out of range: allowed 1 ≤ eval.stride ≤ eval.max_length ({max_length})"
        )
    return max_length, stride


def lm_loss(model: nn.Module, batch: Tensor) -> Tensor:
    """The causal LM's mean next-token loss on a batch of sequences, −(1/N)·Σ_t log p(x_t | x_<t)
    over the N = batch·(L − 1) predicted tokens: the model's own loss with labels = inputs.

    A ``loss_fn`` for the engine's calibration and sensitivity passes (``loss_fn(model, batch)``)."""
    return model(input_ids=batch, labels=batch, use_cache=False).loss


def _autocast(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA devices that support it; a no-op context elsewhere."""
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)


def _group_windows(windows: list[Window], batch_size: int) -> list[list[Window]]:
    """Runs of at most batch_size consecutive windows sharing length and first target."""
    batches: list[list[Window]] = []
    for w in windows:
        last = batches[-1] if batches else None
        if (
            last
            and len(last) < batch_size
            and (last[0].length, last[0].first_target) == (w.length, w.first_target)
        ):
            last.append(w)
        else:
            batches.append([w])
    return batches


def _window_nll(model: nn.Module, inputs: Tensor, first_target: int) -> Tensor:
    """Σ over the batch of −log p(x_t | x_<t) for window positions t ≥ first_target.

    Only the hidden states that predict targets go through the (large) output layer
    (``logits_to_keep``); the model's own head computes them, softcapping and all.
    """
    keep = inputs.shape[1] - first_target + 1  # positions first_target − 1 … last; the last predicts nothing
    logits = model(input_ids=inputs, use_cache=False, logits_to_keep=keep).logits[:, :-1].float()
    targets = inputs[:, first_target:]
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")


def evaluate_perplexity(
    model: nn.Module,
    ids: Tensor,
    *,
    max_length: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    max_tokens: int | None = None,
    device: torch.device | str | None = None,
    desc: str = "perplexity",
) -> dict[str, float | int]:
    """{"ppl", "nll", "tokens"} of a Hugging Face causal LM on a 1-D token stream.

    nll = (1/N)·Σ_t −log p(x_t | window context) over the N scored tokens (token-weighted,
    not a mean of window means); ppl = exp(nll). max_length defaults to the model's context
    length (max_position_embeddings; n_positions for GPT-2), stride to max_length (disjoint
    windows). max_tokens keeps the first max_tokens tokens of the stream. The stream's first token, which has no context, and
    (when stride = max_length) the first token of each window are not scored. The ids go
    to ``device`` (default: the model's); the model itself is not moved. Progress is logged as
    ``desc`` (windows done, tokens/s, time left).
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be a 1-D token stream, got shape {tuple(ids.shape)}")
    max_length, stride = resolve_window(max_length, stride, *context_length(model.config))
    if batch_size < 1:
        raise ValueError(f"eval.batch_size={batch_size} must be ≥ 1")
    if max_tokens is not None:
        if max_tokens < 2:
            raise ValueError(f"eval.max_tokens={max_tokens} must be ≥ 2 (or null for the whole stream)")
        ids = ids[:max_tokens]
    if ids.numel() < 2:
        raise ValueError(f"the stream has {ids.numel()} token(s); at least 2 are needed to score one")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    ids = ids.to(device)

    batches = _group_windows(strided_windows(ids.numel(), max_length, stride), batch_size)

    was_training = model.training
    model.eval()
    nll_sum, tokens = 0.0, 0
    windows = sum(len(batch) for batch in batches)
    with torch.inference_mode(), _autocast(device), Progress(desc, windows, "windows", log, rate_unit="tokens") as p:
        for batch in batches:
            inputs = torch.stack([ids[w.begin : w.end] for w in batch])
            first = batch[0].first_target
            nll_sum += float(_window_nll(model, inputs, first))
            tokens += inputs.shape[0] * (inputs.shape[1] - first)
            p.update(len(batch), inputs.numel())
    model.train(was_training)
    nll = nll_sum / tokens
    return {"ppl": math.exp(nll), "nll": nll, "tokens": tokens}


def estimate_eval_memory(config, batch_size: int, max_length: int, dtype_bytes: int) -> int:
    """Peak memory of one evaluation batch beyond the weights, from the shapes, as an upper estimate:

    - logits: batch·L·vocab in float32, twice (the head's output and cross-entropy's log-softmax),
      plus the head's own dtype copy when that is not float32;
    - attention scores: batch·heads·L² in the model's dtype, as an eager (or math-kernel) attention makes them;
    - the block's activations: batch·L·(4·hidden + 3·intermediate) in the model's dtype.
    """
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", 0)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", 1)
    inner = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    tokens = batch_size * max_length
    logits = tokens * config.vocab_size * (8 + (0 if dtype_bytes == 4 else dtype_bytes))
    scores = batch_size * heads * max_length * max_length * dtype_bytes
    activations = tokens * (4 * hidden + 3 * inner) * dtype_bytes
    return logits + scores + activations


def measure_free_memory(device: torch.device) -> int | None:
    """Bytes free for a new allocation on ``device``: CUDA's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type == "cpu":
        import psutil

        return psutil.virtual_memory().available
    return None


def check_eval_memory(model: nn.Module, batch_size: int, max_length: int, device: torch.device | str) -> None:
    """One line, before any evaluation, for a window and batch whose estimate does not fit the free memory."""
    device = torch.device(device)
    free = measure_free_memory(device)
    dtype_bytes = next(model.parameters()).element_size()
    need = estimate_eval_memory(model.config, batch_size, max_length, dtype_bytes)
    if free is not None and need > free:
        raise ConfigError(
            f"eval.batch_size={batch_size} with eval.max_length={max_length} needs about {need / 2**30:.1f} GiB to "
            f"evaluate (logits over a {model.config.vocab_size}-token vocabulary and attention of {max_length}-token "
            f"windows), but {device.type} has {free / 2**30:.1f} GiB free: lower eval.batch_size or eval.max_length"
        )

"""Perplexity of a causal language model over token windows."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compressor.progress import progress

__all__ = ["PerplexityResult", "perplexity", "strided_windows"]


@dataclass(frozen=True)
class PerplexityResult:
    """``ppl = exp(nll / tokens)``; ``nll`` is the summed negative log-likelihood in nats."""

    ppl: float
    nll: float
    tokens: int
    windows: int


def strided_windows(ids: torch.Tensor, ctx: int, stride: int | None = None, max_tokens: int | None = None):
    """Windows over a token stream with the positions each window scores.

    Args:
        ids: (T,) int64 token ids.
        ctx: window length.
        stride: step between window starts; ``None`` = ``ctx`` (non-overlapping;
            each window scores positions 1..ctx-1). With a smaller stride, each
            window after the first scores only its last ``stride`` tokens,
            so every token is scored once with up to ``ctx - stride`` tokens of context.
        max_tokens: use only the first ``max_tokens`` tokens.

    Returns:
        list of ``(window (ctx,), first_scored_position)``.
    """
    if ctx < 2:
        raise ValueError(f"context length {ctx} is too short: use at least 2")
    ids = ids[:max_tokens] if max_tokens else ids
    stride = stride or ctx
    if not 0 < stride <= ctx:
        raise ValueError(f"stride={stride} must be in 1..ctx ({ctx})")
    if ids.numel() < ctx:
        raise ValueError(f"the text has {ids.numel()} tokens, fewer than one window of {ctx}: use a longer text or a shorter --ctx")
    out = []
    for start in range(0, ids.numel() - ctx + 1, stride):
        first = 1 if start == 0 or stride == ctx else ctx - stride
        out.append((ids[start : start + ctx], first))
    return out


@torch.no_grad()
def perplexity(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    ctx: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    quiet: bool = False,
) -> PerplexityResult:
    """Perplexity of ``model`` on a token stream.

    Args:
        model: causal LM returning ``.logits`` (B, L, V).
        ids: (T,) int64 token ids, tokenized once from the evaluation text.
        ctx, stride, max_tokens: see :func:`strided_windows`. The default is the
            project protocol: consecutive non-overlapping windows, each scored
            on positions 1..ctx-1.
        batch_size: windows per forward pass.

    Returns:
        :class:`PerplexityResult` (NLL summed in float64).
    """
    if getattr(model.config, "max_position_embeddings", None) and ctx > model.config.max_position_embeddings:
        raise ValueError(f"ctx={ctx} exceeds the model's max_position_embeddings={model.config.max_position_embeddings}")
    windows = strided_windows(ids, ctx, stride, max_tokens)
    device = next(model.parameters()).device
    nll, tokens = 0.0, 0
    batches = [windows[i : i + batch_size] for i in range(0, len(windows), batch_size)]
    was_training = model.training
    model.eval()
    for batch in progress(batches, "perplexity", quiet=quiet):
        x = torch.stack([w for w, _ in batch]).to(device)  # (B, L)
        logits = model(input_ids=x, use_cache=False).logits.float()  # (B, L, V)
        for j, (_, first) in enumerate(batch):
            pred = logits[j, first - 1 : -1]  # predicts positions first..L-1
            target = x[j, first:]
            nll += F.cross_entropy(pred, target.to(pred.device), reduction="sum").double().item()
            tokens += target.numel()
    model.train(was_training)
    return PerplexityResult(ppl=math.exp(nll / tokens), nll=nll, tokens=tokens, windows=len(windows))

"""Token windows for scoring a text, and the perplexity result: shared by :mod:`~compressor.eval.perplexity`
and :mod:`~compressor.eval.compare`."""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PerplexityResult", "strided_windows"]


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

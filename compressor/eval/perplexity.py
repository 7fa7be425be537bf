"""Perplexity of a causal language model over token windows."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

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

    Under ``accelerate launch`` the windows are split over the processes and the
    per-window sums gathered in order (see :func:`compressor.eval.compare.score_windows`);
    every process returns the same result.

    Args:
        model: causal LM returning ``.logits`` (B, L, V).
        ids: (T,) int64 token ids, tokenized once from the evaluation text.
        ctx, stride, max_tokens: see :func:`strided_windows`. The default is the
            project protocol: consecutive non-overlapping windows, each scored
            on positions 1..ctx-1.
        batch_size: windows per forward pass.

    Returns:
        :class:`PerplexityResult` (NLL summed in float64).

    Raises:
        ValueError: ``ctx`` beyond the model's ``max_position_embeddings``, or a text shorter than one window.
    """
    from compressor.eval.compare import score_windows

    return score_windows(model, ids, ctx=ctx, stride=stride, max_tokens=max_tokens, batch_size=batch_size,
                         quiet=quiet).ppl

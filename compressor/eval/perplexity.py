"""Perplexity of a causal language model over token windows."""

from __future__ import annotations

import torch
from torch import nn

from compressor.eval.compare import score_windows
from compressor.eval.windows import PerplexityResult, strided_windows

__all__ = ["PerplexityResult", "perplexity", "strided_windows"]


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

    return score_windows(model, ids, ctx=ctx, stride=stride, max_tokens=max_tokens, batch_size=batch_size,
                         quiet=quiet).ppl

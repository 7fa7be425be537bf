"""Perplexity and KL divergence to a base model, scored in lockstep window by window."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from compressor.core.progress import progress
from compressor.eval.distributed import gather_in_order, is_main_process, split_for_process
from compressor.eval.windows import PerplexityResult, strided_windows
from compressor.export.placement import input_device

__all__ = ["WindowScores", "check_context", "score_windows", "token_kl"]


@dataclass(frozen=True)
class WindowScores:
    """What :func:`score_windows` measured.

    Attributes:
        ppl: the model's :class:`PerplexityResult` (identical to :func:`~compressor.eval.perplexity.perplexity`).
        base_ppl: the base model's, when a base was given.
        kl: mean over scored tokens of KL(p_base || p_model) in nats; None without a base.
        top1_agree: fraction of scored tokens whose most likely next token is the same in both models.
        token_nll: float32 (tokens,) per-token negative log-likelihood of the model, in scoring order
            (when ``keep_tokens``); ``base_token_nll`` likewise for the base.
        token_kl: float32 (tokens,) per-token KL to the base (when ``keep_tokens`` and a base was given).
    """

    ppl: PerplexityResult
    base_ppl: PerplexityResult | None = None
    kl: float | None = None
    top1_agree: float | None = None
    token_nll: torch.Tensor | None = None
    base_token_nll: torch.Tensor | None = None
    token_kl: torch.Tensor | None = None


def token_kl(base_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Per-position KL(p_base || p) of two next-token distributions.

    Args:
        base_logits: (T, V) float logits of the base model.
        logits: (T, V) float logits of the compared model (same vocabulary).

    Returns:
        (T,) float32 KL in nats, ``sum_v p_base (log p_base - log p)``.
    """
    if base_logits.shape != logits.shape:
        raise ValueError(f"logits of shape {tuple(logits.shape)} do not match the base's {tuple(base_logits.shape)}: "
                         "compare models that share a tokenizer and vocabulary")
    lp_base = F.log_softmax(base_logits.float(), dim=-1)  # (T, V)
    lp = F.log_softmax(logits.float().to(lp_base.device), dim=-1)  # (T, V)
    return F.kl_div(lp, lp_base, log_target=True, reduction="none").sum(-1)  # (T,)


def check_context(model: nn.Module, ctx: int, name: str = "the model") -> None:
    """Raise ``ValueError`` when ``ctx`` exceeds the model's ``max_position_embeddings``."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    if limit and ctx > limit:
        raise ValueError(f"ctx={ctx} exceeds the max_position_embeddings={limit} of {name}: use --ctx {limit} or less")


@torch.no_grad()
def score_windows(
    model: nn.Module,
    ids: torch.Tensor,
    *,
    base: nn.Module | None = None,
    ctx: int = 512,
    stride: int | None = None,
    max_tokens: int | None = None,
    batch_size: int = 4,
    keep_tokens: bool = False,
    quiet: bool = False,
) -> WindowScores:
    """Perplexity of ``model`` and, with ``base``, its KL divergence to the base, on the same windows.

    Both models run on one batch of windows at a time, so at most one batch of
    full-vocabulary logits of each is held (about ``2 * batch_size * ctx * V``
    floats); nothing is cached across windows.

    Under ``accelerate launch`` each process scores a contiguous share of the windows;
    the per-window sums (float64 NLL, KL, top-1 agreements, token counts) are gathered
    in window order and added up identically on every process, so the result matches
    one process up to the float rounding of different batch shapes.

    Args:
        model: causal LM returning ``.logits`` (B, L, V).
        ids: (T,) int64 token ids.
        base: the reference model (same vocabulary), or None for perplexity only.
        ctx, stride, max_tokens: see :func:`~compressor.eval.perplexity.strided_windows`.
        batch_size: windows per forward pass.
        keep_tokens: also return per-token NLL (and KL) tensors.
        quiet: no progress bar.

    Returns:
        :class:`WindowScores`; sums accumulate in float64.
    """
    for m, name in ((model, "the model"), (base, "the base model")):
        if m is not None:
            check_context(m, ctx, name)
    windows = strided_windows(ids, ctx, stride, max_tokens)
    share = split_for_process(list(enumerate(windows)))  # [(window index, (window (L,), first))]
    models = [model] if base is None else [model, base]
    training = [m.training for m in models]
    for m in models:
        m.eval()
    records = []
    batches = [share[i : i + batch_size] for i in range(0, len(share), batch_size)]
    desc = "perplexity + KL" if base is not None else "perplexity"
    for batch in progress(batches, desc, quiet=quiet or not is_main_process()):
        records.extend(_score_batch(model, base, [w for _, w in batch], keep_tokens))
    for m, was in zip(models, training):
        m.train(was)
    records = gather_in_order(records)  # one record per window, in window order
    if len(records) != len(windows):
        raise RuntimeError(f"gathered {len(records)} window scores for {len(windows)} windows")
    nll, base_nll, kl, agree, tokens = (sum(r[k] for r in records) for k in range(5))
    cat = (lambda k: torch.cat([r[5][k] for r in records]) if keep_tokens else None)  # noqa: E731
    result = PerplexityResult(ppl=math.exp(nll / tokens), nll=nll, tokens=tokens, windows=len(windows))
    if base is None:
        return WindowScores(ppl=result, token_nll=cat("nll"))
    base_result = PerplexityResult(ppl=math.exp(base_nll / tokens), nll=base_nll, tokens=tokens, windows=len(windows))
    return WindowScores(ppl=result, base_ppl=base_result, kl=kl / tokens, top1_agree=agree / tokens,
                        token_nll=cat("nll"), base_token_nll=cat("base_nll"), token_kl=cat("kl"))


def _score_batch(model: nn.Module, base: nn.Module | None, batch: list, keep_tokens: bool) -> list[tuple]:
    """Per window of ``batch`` (``[(window (L,), first scored position)]``): ``(nll, base_nll, kl, agree,
    tokens, kept)`` with float64 sums, int counts and, when ``keep_tokens``, float32 per-token tensors."""
    x = torch.stack([w for w, _ in batch])  # (B, L)
    logits = model(input_ids=x.to(input_device(model)), use_cache=False).logits  # (B, L, V)
    base_logits = base(input_ids=x.to(input_device(base)), use_cache=False).logits if base is not None else None
    out = []
    for j, (_, first) in enumerate(batch):
        target = x[j, first:]  # (n,)
        pred = logits[j, first - 1 : -1].float()  # (n, V): predicts positions first..L-1
        t_nll = F.cross_entropy(pred, target.to(pred.device), reduction="none")  # (n,)
        kept = {"nll": t_nll.float().cpu()} if keep_tokens else None
        if base_logits is None:
            out.append((t_nll.double().sum().item(), 0.0, 0.0, 0, target.numel(), kept))
            continue
        bpred = base_logits[j, first - 1 : -1].float()  # (n, V)
        b_nll = F.cross_entropy(bpred, target.to(bpred.device), reduction="none")  # (n,)
        t_kl = token_kl(bpred, pred)  # (n,)
        agree = int((bpred.argmax(-1) == pred.argmax(-1).to(bpred.device)).sum())
        if keep_tokens:
            kept |= {"base_nll": b_nll.float().cpu(), "kl": t_kl.float().cpu()}
        out.append((t_nll.double().sum().item(), b_nll.double().sum().item(), t_kl.double().sum().item(), agree,
                    target.numel(), kept))
    return out

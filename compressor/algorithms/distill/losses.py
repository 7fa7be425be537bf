"""Logit distillation losses: pure functions on (..., V) logits.

Every divergence here takes the student's and the teacher's raw logits of the
same shape ``(..., V)`` (any float dtype; the softmax runs in at least float32)
and an optional token ``mask`` of shape ``(...)`` (bool, or 0/1 numbers: True
= the token counts). ``p`` is the teacher's distribution, ``q`` the student's,
both at temperature ``T``:

    p = softmax(z_teacher / T),   q = softmax(z_student / T)

and each divergence is multiplied by ``T**2`` (Hinton et al., arXiv 1503.02531,
section 2: the soft targets' gradients scale as 1/T**2, so the product keeps
their magnitude independent of T). At T = 1 the factor is 1.

Reductions over tokens (``reduction=``): ``"mean"`` averages over the tokens
the mask keeps (0 when it keeps none), ``"sum"`` adds them, ``"none"`` returns
the per-token values with shape ``(...)`` (masked tokens set to 0).

The ground-truth term is the usual next-token cross entropy at T = 1 with
``ignore_index`` (default -100) for tokens without a label; ``distill_loss``
mixes it in as ``alpha * CE + (1 - alpha) * divergence``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

KINDS = ("forward_kl", "reverse_kl", "jsd", "topk_kl")
REDUCTIONS = ("mean", "sum", "none")
IGNORE_INDEX = -100


# ---------------------------------------------------------------- helpers


def _check_pair(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> None:
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "differ: both must be (..., V) over the same tokens and the same vocabulary"
        )
    if student_logits.ndim < 1:
        raise ValueError("logits must have a vocabulary dimension: shape (..., V)")


def _check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0 (1.0 leaves the logits unchanged)")


def _log_softmax(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(logits / T) in at least float32: (..., V) -> (..., V)."""
    dtype = torch.promote_types(logits.dtype, torch.float32)
    return F.log_softmax(logits.to(dtype) / temperature, dim=-1)


def reduce_tokens(per_token: torch.Tensor, mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Reduce per-token losses ``(...)`` over the tokens ``mask`` keeps.

    Args:
        per_token: float tensor ``(...)``, one loss per token.
        mask: ``None`` (all tokens) or bool/0-1 tensor of the same shape.
        reduction: ``"mean"`` (over kept tokens; 0 when none is kept), ``"sum"``,
            or ``"none"`` (per-token values, masked ones zeroed).

    Returns:
        A 0-d tensor for ``"mean"``/``"sum"``, else ``(...)``; dtype of ``per_token``.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction={reduction!r}: use one of {REDUCTIONS}")
    if mask is None:
        if reduction == "none":
            return per_token
        return per_token.sum() if reduction == "sum" else per_token.mean()
    if mask.shape != per_token.shape:
        raise ValueError(
            f"mask shape {tuple(mask.shape)} must equal the token shape {tuple(per_token.shape)} "
            "(the logits' shape without the vocabulary dimension)"
        )
    keep = mask.to(torch.bool)
    masked = torch.where(keep, per_token, torch.zeros_like(per_token))
    if reduction == "none":
        return masked
    total = masked.sum()
    if reduction == "sum":
        return total
    return total / keep.sum().clamp_min(1).to(per_token.dtype)


# ---------------------------------------------------------------- divergences


def forward_kl(student_logits, teacher_logits, *, temperature: float = 1.0, mask=None, reduction: str = "mean"):
    """T**2 * KL(p_teacher || q_student) per token, reduced over tokens.

    KL(p || q) = sum_v p_v (log p_v - log q_v), the classic KD term
    (Hinton et al., arXiv 1503.02531, eq. 2 with the T**2 factor of section 2.1);
    mass-covering for the student.

    Args:
        student_logits, teacher_logits: ``(..., V)``, same shape, any float dtype.
        temperature: T > 0. mask: ``(...)`` or None. reduction: see module docstring.

    Returns:
        float32 (float64 for float64 inputs) scalar, or ``(...)`` for ``"none"``.
    """
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    log_q = _log_softmax(student_logits, temperature)  # (..., V)
    log_p = _log_softmax(teacher_logits, temperature)  # (..., V)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2  # (...)
    return reduce_tokens(per_token, mask, reduction)


def reverse_kl(student_logits, teacher_logits, *, temperature: float = 1.0, mask=None, reduction: str = "mean"):
    """T**2 * KL(q_student || p_teacher) per token, reduced over tokens.

    Mode-seeking; the objective of MiniLLM (Gu et al., arXiv 2306.08543, eq. 1).
    Same arguments, shapes and dtypes as :func:`forward_kl`.
    """
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    log_q = _log_softmax(student_logits, temperature)
    log_p = _log_softmax(teacher_logits, temperature)
    per_token = (log_q.exp() * (log_q - log_p)).sum(-1) * temperature**2
    return reduce_tokens(per_token, mask, reduction)


def jsd(student_logits, teacher_logits, *, beta: float = 0.5, temperature: float = 1.0, mask=None,
        reduction: str = "mean"):
    """T**2 * generalized Jensen-Shannon divergence JSD(beta) per token.

    With m = beta * p + (1 - beta) * q (GKD, Agarwal et al., arXiv 2306.13649, section 3):

        JSD(beta) = beta * KL(p || m) + (1 - beta) * KL(q || m)

    beta = 0.5 is the symmetric JSD (bounded by log 2). Limits: as beta -> 0,
    JSD(beta) / beta -> KL(p || q) (forward KL); as beta -> 1,
    JSD(beta) / (1 - beta) -> KL(q || p) (reverse KL). At beta = 0 or 1 the
    divergence itself is identically 0, so those values are refused: use
    :func:`forward_kl` or :func:`reverse_kl`.

    Args:
        beta: mixing weight, 0 < beta < 1. Others as :func:`forward_kl`.
    """
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    _check_beta(beta)
    log_q = _log_softmax(student_logits, temperature)
    log_p = _log_softmax(teacher_logits, temperature)
    per_token = _jsd_per_token(log_q, log_p, beta) * temperature**2
    return reduce_tokens(per_token, mask, reduction)


def _check_beta(beta: float) -> None:
    if not 0.0 < beta < 1.0:
        raise ValueError(
            f"beta={beta}: the generalized JSD needs 0 < beta < 1 (it is identically 0 at the ends); "
            "for the limits use kind='forward_kl' (beta -> 0) or kind='reverse_kl' (beta -> 1)"
        )


def _jsd_per_token(log_q: torch.Tensor, log_p: torch.Tensor, beta: float) -> torch.Tensor:
    """JSD(beta) from log-probabilities (..., V) -> (...)."""
    # log m = logsumexp(log beta + log p, log(1-beta) + log q), stable for tiny probabilities
    log_m = torch.logaddexp(log_p + torch.log(torch.tensor(beta, dtype=log_p.dtype)),
                            log_q + torch.log(torch.tensor(1.0 - beta, dtype=log_q.dtype)))  # (..., V)
    kl_pm = (log_p.exp() * (log_p - log_m)).sum(-1)
    kl_qm = (log_q.exp() * (log_q - log_m)).sum(-1)
    return beta * kl_pm + (1.0 - beta) * kl_qm


def topk_kl(student_logits, teacher_logits, *, k: int, renormalize: bool = True, temperature: float = 1.0,
            mask=None, reduction: str = "mean"):
    """T**2 * KL over the teacher's top-k tokens (OSTQuant's KL-Top, arXiv 2501.13987, section 4.3).

    For each token, S = the indices of the teacher's k largest logits.

    * ``renormalize=True`` (default, KL-Top as OSTQuant uses it): both
      distributions are re-softmaxed over S alone, p' = softmax(z_t[S] / T),
      q' = softmax(z_s[S] / T), and the loss is KL(p' || q'). The rest of the
      vocabulary (mostly noise with limited calibration data) is ignored.
    * ``renormalize=False``: the full-vocabulary p and q are kept and only the
      terms of S are summed: sum_{v in S} p_v (log p_v - log q_v). This is a
      truncated sum, not a divergence (it can be negative).

    With k = V both equal :func:`forward_kl`.

    Args:
        k: 1 <= k <= V. Others as :func:`forward_kl`.
    """
    _check_pair(student_logits, teacher_logits)
    _check_temperature(temperature)
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k={k} must be in [1, {vocab}] (the vocabulary size)")
    top = teacher_logits.topk(k, dim=-1).indices  # (..., k)
    if renormalize:
        return forward_kl(student_logits.gather(-1, top), teacher_logits.gather(-1, top),
                          temperature=temperature, mask=mask, reduction=reduction)
    log_q = _log_softmax(student_logits, temperature).gather(-1, top)  # (..., k)
    log_p = _log_softmax(teacher_logits, temperature).gather(-1, top)
    per_token = (log_p.exp() * (log_p - log_q)).sum(-1) * temperature**2
    return reduce_tokens(per_token, mask, reduction)


def cross_entropy(student_logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = IGNORE_INDEX,
                  reduction: str = "mean") -> torch.Tensor:
    """Ground-truth cross entropy -log softmax(z)[label] at T = 1, over tokens whose label != ignore_index.

    Args:
        student_logits: ``(..., V)`` float. labels: ``(...)`` int64 class ids or ``ignore_index``.
        reduction: ``"mean"`` over labelled tokens (0 when none), ``"sum"``, ``"none"``.

    Returns:
        float32 (float64 for float64 logits) scalar, or ``(...)`` for ``"none"``.
    """
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} must equal the logits' token shape "
            f"{tuple(student_logits.shape[:-1])}; shift labels before calling if needed"
        )
    keep = labels != ignore_index
    log_q = _log_softmax(student_logits, 1.0)
    safe = torch.where(keep, labels, torch.zeros_like(labels))
    per_token = -log_q.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (...)
    return reduce_tokens(per_token, keep, reduction)


def divergence(student_logits, teacher_logits, *, kind: str = "forward_kl", temperature: float = 1.0,
               mask=None, reduction: str = "mean", beta: float = 0.5, k: int | None = None,
               renormalize: bool = True):
    """Dispatch on ``kind`` in :data:`KINDS` to the divergence functions above (same shapes)."""
    common = dict(temperature=temperature, mask=mask, reduction=reduction)
    if kind == "forward_kl":
        return forward_kl(student_logits, teacher_logits, **common)
    if kind == "reverse_kl":
        return reverse_kl(student_logits, teacher_logits, **common)
    if kind == "jsd":
        return jsd(student_logits, teacher_logits, beta=beta, **common)
    if kind == "topk_kl":
        if k is None:
            raise ValueError("kind='topk_kl' needs k (the number of teacher tokens kept), e.g. k=64")
        return topk_kl(student_logits, teacher_logits, k=k, renormalize=renormalize, **common)
    raise ValueError(f"kind={kind!r}: use one of {KINDS}")


def distill_loss(student_logits, teacher_logits, *, kind: str = "forward_kl", temperature: float = 1.0,
                 alpha: float = 0.0, labels=None, ignore_index: int = IGNORE_INDEX, mask=None,
                 beta: float = 0.5, k: int | None = None, renormalize: bool = True) -> torch.Tensor:
    """``alpha * CE(student, labels) + (1 - alpha) * divergence(student, teacher)``, token means.

    The divergence (T**2-scaled, see module docstring) is averaged over the tokens
    ``mask`` keeps; the cross entropy (T = 1) over tokens with a label. This is
    the naive reference: it materializes the (..., V) log-probabilities of both
    models; :func:`compressor.algorithms.distill.chunked.chunked_distill_loss` computes the same
    value from hidden states chunk by chunk.

    Args:
        student_logits, teacher_logits: ``(..., V)`` float, same shape.
        alpha: weight of the ground-truth term, 0 <= alpha <= 1; needs ``labels`` when > 0.
        labels: ``(...)`` int64 or None. mask: ``(...)`` or None.
        kind, beta, k, renormalize: see :func:`divergence`.

    Returns:
        0-d float tensor (float32, or float64 for float64 logits).
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1] (the weight of the ground-truth cross entropy)")
    if alpha > 0 and labels is None:
        raise ValueError(f"alpha={alpha} > 0 mixes in the ground-truth cross entropy: pass labels, or use alpha=0")
    loss = divergence(student_logits, teacher_logits, kind=kind, temperature=temperature, mask=mask,
                      beta=beta, k=k, renormalize=renormalize)
    if alpha == 0.0:
        return loss
    ce = cross_entropy(student_logits, labels, ignore_index=ignore_index)
    return alpha * ce + (1.0 - alpha) * loss

"""Plackett-Luce distillation (PLD) for classifiers: a list-wise loss over the teacher's ranking.

Bassam, Zhu and Bian, "PLD: A Choice-Theoretic List-Wise Knowledge
Distillation", arXiv 2506.12542. The student's logits s (B, C) are read as
Plackett-Luce worths: the probability of choosing the classes in the order
pi = (pi_1, ..., pi_C) is

    P(pi | s) = prod_k  exp(s_{pi_k}) / sum_{l >= k} exp(s_{pi_l})

(Plackett 1975, Luce 1959). PLD's target is the "teacher-optimal" permutation
pi*: the true label first, then the other classes by descending teacher logit
(without labels: all classes by descending teacher logit). Each position k is
weighted by the teacher's confidence in the class placed there,
alpha_k = softmax(t / T)_{pi*_k}:

    L = sum_k alpha_k * ( -s_{pi*_k} + logsumexp_{l >= k} s_{pi*_l} )

The weighting by the teacher's softmax mass follows the paper's abstract
("weighting each ranked choice by its own confidence") and a secondary summary
of its loss; the equation itself could not be read here, so whether the paper
applies a temperature to alpha or to s is not confirmed: ``temperature`` here
acts on the teacher's softmax only. ``weighted=False`` gives the plain
Plackett-Luce negative log-likelihood (ListMLE, Xia et al. 2008) of pi*.
"""

from __future__ import annotations

import torch

from compressor.algorithms.distill.losses import reduce_tokens


def teacher_permutation(teacher_logits: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """PLD's target order pi* (B, C) int64: ``labels`` (B,) first (if given), then descending teacher logit.

    Args:
        teacher_logits: ``(B, C)`` float. labels: ``(B,)`` int64 class ids in [0, C), or None.
    """
    if teacher_logits.ndim != 2:
        raise ValueError(f"teacher logits must be (B, C), got {tuple(teacher_logits.shape)}")
    scores = teacher_logits.detach().to(torch.promote_types(teacher_logits.dtype, torch.float32)).clone()
    if labels is not None:
        if labels.shape != scores.shape[:1]:
            raise ValueError(f"labels shape {tuple(labels.shape)} must be (B,) = ({scores.shape[0]},)")
        if labels.min() < 0 or labels.max() >= scores.shape[1]:
            raise ValueError(f"labels must be class ids in [0, {scores.shape[1]}); no ignore_index for PLD")
        scores.scatter_(1, labels.unsqueeze(1), float("inf"))  # the true label ranks first
    return scores.argsort(dim=1, descending=True, stable=True)  # (B, C)


def plackett_luce_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       labels: torch.Tensor | None = None, *, top_k: int | None = None, weighted: bool = True,
                       temperature: float = 1.0, reduction: str = "mean") -> torch.Tensor:
    """PLD loss (arXiv 2506.12542): weighted PL negative log-likelihood of the teacher-optimal order.

    Args:
        student_logits: ``(B, C)`` float, gets the gradient.
        teacher_logits: ``(B, C)`` float, constants.
        labels: ``(B,)`` int64 or None (then pi* is the teacher's own ranking).
        top_k: keep only the first ``top_k`` positions of pi* (partial ranking; the
            normalizers still run over all classes not yet chosen); None = all C.
        weighted: weight position k by softmax(teacher / T)[pi*_k] (PLD); False = plain PL NLL.
        temperature: T > 0 of the teacher's confidence weights.
        reduction: ``"mean"`` over the batch, ``"sum"`` or ``"none"`` (B,).

    Returns:
        0-d tensor (or (B,)), float32, or float64 for float64 logits.
    """
    if student_logits.shape != teacher_logits.shape or student_logits.ndim != 2:
        raise ValueError(
            f"student {tuple(student_logits.shape)} and teacher {tuple(teacher_logits.shape)} logits "
            "must both be (B, C)"
        )
    if not temperature > 0:
        raise ValueError(f"temperature={temperature} must be > 0")
    classes = student_logits.shape[1]
    k = classes if top_k is None else top_k
    if not 1 <= k <= classes:
        raise ValueError(f"top_k={top_k} must be in [1, {classes}] or None (the full ranking)")
    dtype = torch.promote_types(student_logits.dtype, torch.float32)
    order = teacher_permutation(teacher_logits, labels)  # (B, C)
    s = student_logits.to(dtype).gather(1, order)  # (B, C) student scores in teacher order
    # logsumexp over the classes not yet chosen: reverse cumulative log-sum-exp
    tail = s.flip(1).logcumsumexp(dim=1).flip(1)  # (B, C), tail[:, k] = log sum_{l >= k} exp(s_l)
    nll = (tail - s)[:, :k]  # (B, k) -log P(choose pi*_k | remaining)
    if weighted:
        with torch.no_grad():
            conf = torch.softmax(teacher_logits.to(dtype) / temperature, dim=1).gather(1, order)[:, :k]
        nll = nll * conf
    return reduce_tokens(nll.sum(1), None, reduction)

"""Chunked logit distillation: the loss from hidden states without the full (T, V) logits.

In the spirit of Cut Cross-Entropy (Wijmans et al., arXiv 2411.09009): the
logits z = h @ W.T are never stored for all tokens. The tokens are cut into
chunks of ``chunk_size``; for each chunk the student's and the teacher's
(chunk, V) logits are computed, reduced to per-token losses and dropped. The
backward pass recomputes each chunk's logits (CCE section 4.2: recompute rather
than store) and turns the analytic gradient with respect to the student's
logits into gradients for the student's hidden states and head weight:

    dL/dh_c = G_c @ W_s,   dL/dW_s += G_c.T @ h_c,   G_c = dL/dz_c  (chunk, V)

Peak extra memory is therefore O(chunk_size * V) instead of O(T * V) for each
of the naive path's saved tensors (a chunk costs about three (chunk, V)
buffers: the log-softmax is taken in place). Only token chunking is done (each chunk
spans the whole vocabulary, so the log-sum-exp is exact, no online merge);
V = 49152 with chunk_size 128 is 24 MiB per float32 buffer.

Gradients with respect to the student's logits, per token, with
s = z_s / T, q = softmax(s), p = softmax(z_t / T), D the divergence and
dD/dz_s = (dD/ds) / T:

* forward KL(p || q):   dD/ds = q - p
* reverse KL(q || p):   dD/ds = q * (f - D),  f = log q - log p
* JSD(beta), m = beta p + (1 - beta) q:  with g = (1 - beta)(log q - log m),
  dD/ds = q * (g - sum_v q_v g_v)   (dD/dq_v = g_v, then the softmax Jacobian)
* cross entropy at T = 1:  dCE/dz_s = softmax(z_s) - onehot(label)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from compressor.algorithms.distill.losses import IGNORE_INDEX, _check_beta, _check_temperature, distill_loss

CHUNKED_KINDS = ("forward_kl", "reverse_kl", "jsd")


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum_v a[i, v] * b[i, v] for (c, V) inputs, as a batched matmul: no (c, V) temporary."""
    return (a.unsqueeze(1) @ b.unsqueeze(2)).reshape(-1)  # (c,)


def _log_softmax_(z: torch.Tensor, temperature: float) -> torch.Tensor:
    """log softmax(z / T) written into z (c, V) and returned; z must be a buffer this module owns."""
    if temperature != 1.0:
        z.div_(temperature)
    return z.sub_(z.logsumexp(-1, keepdim=True))


def _chunk_terms(zs: torch.Tensor, zt: torch.Tensor, kind: str, temperature: float, beta: float,
                 want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token divergence D (c,) and, if asked, dD/dz_s (c, V) for one chunk of raw logits (c, V).

    Overwrites ``zs`` and ``zt`` (in-place log-softmax) so a chunk costs about
    three (c, V) buffers; the gradient is returned in one of them.
    """
    log_q = _log_softmax_(zs, temperature)  # (c, V)
    log_p = _log_softmax_(zt, temperature)  # (c, V)
    grad = None
    if kind == "forward_kl":
        p = log_p.exp()
        div = _rowdot(p, log_p.sub_(log_q))  # (c,) sum p (log p - log q)
        if want_grad:
            grad = log_q.exp_().sub_(p)  # q - p
    elif kind == "reverse_kl":
        q = log_q.exp()
        f = log_q.sub_(log_p)  # (c, V) log q - log p
        div = _rowdot(q, f)  # (c,)
        if want_grad:
            grad = f.sub_(div.unsqueeze(-1)).mul_(q)  # q * (f - D)
    else:  # jsd, GKD arXiv 2306.13649 section 3
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))  # (c, V)
        p = log_p.exp()
        div = beta * _rowdot(p, log_p.sub_(log_m))
        del p
        q = log_q.exp()
        g = log_q.sub_(log_m)  # (c, V) log q - log m
        del log_m
        div = div + (1.0 - beta) * _rowdot(q, g)
        if want_grad:
            g.mul_(1.0 - beta)  # dD/dq
            grad = g.sub_(_rowdot(q, g).unsqueeze(-1)).mul_(q)  # q * (g - sum q g)
    if grad is not None and temperature != 1.0:
        grad.div_(temperature)
    return div, grad


def _ce_terms(zs: torch.Tensor, labels: torch.Tensor, want_grad: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token cross entropy (c,) at T = 1 and, if asked, dCE/dz (c, V); labels already made safe (>= 0).

    Leaves ``zs`` unchanged (allocates its own (c, V) buffer).
    """
    log_q = F.log_softmax(zs, dim=-1)
    ce = -log_q.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    grad = None
    if want_grad:
        grad = log_q.exp_()
        grad[torch.arange(len(labels), device=labels.device), labels] -= 1.0
    return ce, grad


def _chunk_logits(h: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (h @ weight.T).to(dtype)  # (c, V)


class _ChunkedDistill(torch.autograd.Function):
    """Scalar loss sum_i w_kd[i] D_i + w_ce[i] CE_i over token chunks; grads for the student only."""

    @staticmethod
    def forward(ctx, hs, ws, ht, wt, w_kd, w_ce, labels, kind, temperature, beta, chunk_size):
        dtype = torch.promote_types(hs.dtype, torch.float32)
        total = torch.zeros((), dtype=dtype, device=hs.device)
        use_ce = bool((w_ce != 0).any())
        with torch.no_grad():
            for start in range(0, hs.shape[0], chunk_size):
                sl = slice(start, start + chunk_size)
                zs = _chunk_logits(hs[sl], ws, dtype)  # (c, V)
                zt = _chunk_logits(ht[sl], wt, dtype)  # (c, V)
                if use_ce:  # before the divergence, which overwrites zs
                    ce, _ = _ce_terms(zs, labels[sl], want_grad=False)
                    total += (w_ce[sl] * ce).sum()
                div, _ = _chunk_terms(zs, zt, kind, temperature, beta, want_grad=False)
                del zs, zt
                total += (w_kd[sl] * div).sum()
        ctx.save_for_backward(hs, ws, ht, wt, w_kd, w_ce, labels)
        ctx.config = (kind, temperature, beta, chunk_size, use_ce)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        hs, ws, ht, wt, w_kd, w_ce, labels = ctx.saved_tensors
        kind, temperature, beta, chunk_size, use_ce = ctx.config
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dtype = torch.promote_types(hs.dtype, torch.float32)
        grad_h = torch.empty_like(hs) if need_h else None  # (N, D)
        grad_w = torch.zeros(ws.shape, dtype=dtype, device=ws.device) if need_w else None  # (V, D)
        scale = grad_out.to(dtype)
        with torch.no_grad():
            for start in range(0, hs.shape[0], chunk_size):
                sl = slice(start, start + chunk_size)
                zs = _chunk_logits(hs[sl], ws, dtype)
                zt = _chunk_logits(ht[sl], wt, dtype)
                g_ce = _ce_terms(zs, labels[sl], want_grad=True)[1] if use_ce else None  # before zs is overwritten
                _, g = _chunk_terms(zs, zt, kind, temperature, beta, want_grad=True)  # (c, V), in zs or zt
                del zs, zt
                g.mul_((w_kd[sl] * scale).unsqueeze(-1))
                if g_ce is not None:
                    g.add_(g_ce.mul_((w_ce[sl] * scale).unsqueeze(-1)))
                    del g_ce
                if need_h:
                    grad_h[sl] = (g @ ws.to(dtype)).to(hs.dtype)  # (c, D)
                if need_w:
                    grad_w.addmm_(g.T, hs[sl].to(dtype))  # (V, D)
        if grad_w is not None:
            grad_w = grad_w.to(ws.dtype)
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None


def _flatten_inputs(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, mask, labels):
    if student_head_weight.ndim != 2 or teacher_head_weight.ndim != 2:
        raise ValueError("head weights must be 2-D (V, D) like nn.Linear.weight of the lm_head")
    if student_head_weight.shape[0] != teacher_head_weight.shape[0]:
        raise ValueError(
            f"student vocabulary {student_head_weight.shape[0]} != teacher vocabulary {teacher_head_weight.shape[0]}: "
            "logit distillation needs the same tokenizer; slice the larger head to the shared vocabulary"
        )
    if student_hidden.shape[-1] != student_head_weight.shape[1]:
        raise ValueError(
            f"student hidden width {student_hidden.shape[-1]} != student head input width "
            f"{student_head_weight.shape[1]}: pass the final-norm hidden states that feed this lm_head"
        )
    if teacher_hidden.shape[-1] != teacher_head_weight.shape[1]:
        raise ValueError(
            f"teacher hidden width {teacher_hidden.shape[-1]} != teacher head input width "
            f"{teacher_head_weight.shape[1]}: pass the final-norm hidden states that feed this lm_head"
        )
    tokens = student_hidden.shape[:-1]
    if teacher_hidden.shape[:-1] != tokens:
        raise ValueError(
            f"student tokens {tuple(tokens)} != teacher tokens {tuple(teacher_hidden.shape[:-1])}: "
            "both hidden states must cover the same (..., T) positions"
        )
    for name, extra in (("mask", mask), ("labels", labels)):
        if extra is not None and extra.shape != tokens:
            raise ValueError(f"{name} shape {tuple(extra.shape)} must equal the token shape {tuple(tokens)}")
    hs = student_hidden.reshape(-1, student_hidden.shape[-1])  # (N, D)
    ht = teacher_hidden.reshape(-1, teacher_hidden.shape[-1]).detach()  # (N, Dt)
    return hs, ht, (None if mask is None else mask.reshape(-1)), (None if labels is None else labels.reshape(-1))


def chunked_distill_loss(student_hidden: torch.Tensor, student_head_weight: torch.Tensor,
                         teacher_hidden: torch.Tensor, teacher_head_weight: torch.Tensor, *,
                         kind: str = "forward_kl", temperature: float = 1.0, chunk_size: int = 256,
                         mask: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                         alpha: float = 0.0, ignore_index: int = IGNORE_INDEX, beta: float = 0.5) -> torch.Tensor:
    """The distillation loss of :func:`~compressor.algorithms.distill.losses.distill_loss`, computed in token chunks.

    Equals ``distill_loss(student_hidden @ student_head_weight.T, teacher_hidden @ teacher_head_weight.T,
    kind=..., ...)`` (divergence mean over masked tokens, times T**2, mixed with alpha * CE) and its
    gradients, without holding both (T, V) logit matrices: extra memory is a few (chunk_size, V)
    buffers plus one (V, D) gradient accumulator.

    Args:
        student_hidden: ``(..., T, D)`` float, the student's final-norm hidden states (gets a gradient).
        student_head_weight: ``(V, D)``, the student's lm_head weight (gets a gradient if it requires one).
            A bias is not supported (Llama-family heads have none).
        teacher_hidden: ``(..., T, Dt)``; teacher_head_weight: ``(V, Dt)``. Treated as constants (no gradient).
        kind: ``"forward_kl"``, ``"reverse_kl"`` or ``"jsd"`` (top-k KL is not chunked yet).
        temperature: T > 0; the divergence is multiplied by T**2.
        chunk_size: tokens per chunk, >= 1; need not divide T.
        mask: ``(..., T)`` bool/0-1, tokens that count in the divergence (None: all).
        labels: ``(..., T)`` int64 next-token ids or ``ignore_index``; needed when alpha > 0.
        alpha: weight of the ground-truth cross entropy, 0 <= alpha <= 1.
        beta: JSD mixing weight, 0 < beta < 1.

    Returns:
        0-d tensor, float32 (float64 for float64 inputs); bf16/fp16 logits are upcast per chunk.
    """
    if kind not in CHUNKED_KINDS:
        raise ValueError(f"kind={kind!r} is not chunked: use one of {CHUNKED_KINDS}, or distill_loss on logits")
    _check_temperature(temperature)
    if kind == "jsd":
        _check_beta(beta)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int, e.g. 256")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must be in [0, 1] (the weight of the ground-truth cross entropy)")
    if alpha > 0 and labels is None:
        raise ValueError(f"alpha={alpha} > 0 mixes in the ground-truth cross entropy: pass labels, or use alpha=0")
    hs, ht, mask, labels = _flatten_inputs(student_hidden, student_head_weight, teacher_hidden,
                                           teacher_head_weight, mask, labels)
    dtype = torch.promote_types(hs.dtype, torch.float32)
    keep = torch.ones(hs.shape[0], dtype=torch.bool, device=hs.device) if mask is None else mask.to(torch.bool)
    w_kd = keep.to(dtype) * ((1.0 - alpha) * temperature**2 / keep.sum().clamp_min(1).to(dtype))  # (N,)
    if alpha > 0:
        has_label = labels != ignore_index
        w_ce = has_label.to(dtype) * (alpha / has_label.sum().clamp_min(1).to(dtype))  # (N,)
        safe = torch.where(has_label, labels, torch.zeros_like(labels))
    else:
        w_ce = torch.zeros_like(w_kd)
        safe = torch.zeros(hs.shape[0], dtype=torch.long, device=hs.device)
    return _ChunkedDistill.apply(hs, student_head_weight, ht, teacher_head_weight.detach(), w_kd, w_ce, safe,
                                 kind, float(temperature), float(beta), chunk_size)


def naive_distill_loss(student_hidden: torch.Tensor, student_head_weight: torch.Tensor,
                       teacher_hidden: torch.Tensor, teacher_head_weight: torch.Tensor, **kwargs) -> torch.Tensor:
    """Reference for :func:`chunked_distill_loss`: materialize both (..., T, V) logits and call ``distill_loss``.

    Same arguments (``chunk_size`` is accepted and ignored); the teacher's logits
    are computed under ``no_grad``. Memory O(T * V) for each saved tensor.
    """
    kwargs.pop("chunk_size", None)
    student_logits = student_hidden @ student_head_weight.T  # (..., T, V)
    with torch.no_grad():
        teacher_logits = teacher_hidden @ teacher_head_weight.T  # (..., T, V)
    return distill_loss(student_logits, teacher_logits, **kwargs)

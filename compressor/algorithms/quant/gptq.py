"""GPTQ (Frantar et al., arXiv 2210.17323): second-order error feedback while rounding.

Maths in :func:`gptq_quantize` (pure, testable on an 8x6 matrix); statistics
collection and application in :class:`compressor.passes.gptq.GPTQPass`, a thin
adapter the sequential pipeline drives block by block.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from compressor.algorithms.hessian import inverse_cholesky, one_cpu_thread
from compressor.core.gguf_blocks import Grid
from compressor.core import floats
from compressor.core.scheme import (
    QParams,
    QuantScheme,
    cast_params,
    compute_qparams,
    dequantize,
    global_scale,
    num_groups,
)

__all__ = ["ACTORDER", "GPTQResult", "gptq_quantize", "gptq_on_grid", "refit_scales"]

log = logging.getLogger(__name__)

ACTORDER = ("none", "static", "group")


@dataclass(frozen=True)
class GPTQResult:
    """Output of :func:`gptq_quantize`.

    Attributes:
        weight: (N, K) dequantized weight on the grid, in the requested dtype.
        codes: (N, K) int8 integer codes.
        qparams: scale / zero point (N, G) in the requested dtype.
        g_idx: (K,) int32 group of each column when ``actorder="group"``, else None.
        loss: sum of the per-column losses ``(w - q)^2 / [H^-1]_jj / 2`` (eq. 3 of the paper).
    """

    weight: torch.Tensor
    codes: torch.Tensor
    qparams: QParams
    g_idx: torch.Tensor | None
    loss: float


def _column_params(w: torch.Tensor, scheme: QuantScheme, dtype: torch.dtype,
                   gscale: torch.Tensor | None = None) -> QParams:
    """Scale / zero point for a (N, c) slice treated as one group, rounded to ``dtype`` (E4M3 / E8M0 scales
    stay float32; NVFP4 uses the whole matrix's global scale ``gscale``)."""
    single = QuantScheme(**{**scheme.to_dict(), "group_size": -1})
    qp = cast_params(compute_qparams(w, single, gscale=gscale), scheme, dtype)
    zp = None if qp.zero_point is None else qp.zero_point.float()
    return QParams(qp.scale.float(), zp, qp.global_scale)


def _fq_column(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor | None, scheme: QuantScheme,
               gscale: torch.Tensor | None = None):
    """Quantize one column (N,) with per-row scale / zero point (N,): (codes, dequantized); float schemes give
    the grid values as codes (``w ≈ value * scale / gscale``)."""
    if scheme.is_float:
        eff = scale if gscale is None else scale / gscale
        v = floats.round_to_grid(scheme.element, w / eff)
        return v, v * eff
    q = w / scale
    if zp is not None:
        q = q + zp
    q = torch.clamp(torch.round(q), scheme.qmin, scheme.qmax)
    deq = (q - zp) * scale if zp is not None else q * scale
    return q, deq


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scheme: QuantScheme,
    *,
    block_size: int = 128,
    dampening: float = 0.01,
    actorder: str = "none",
    dtype: torch.dtype | None = None,
    cross: torch.Tensor | None = None,
    cross_weight: float = 0.25,
    refit: bool = False,
    mask: torch.Tensor | None = None,
    gscale: torch.Tensor | None = None,
) -> GPTQResult:
    """Quantize a weight matrix with GPTQ.

    Args:
        weight: (N, K) float weight.
        hessian: (K, K) ``2 X X^T / n`` of the layer inputs (float32 or float64).
        scheme: bits, group size (or -1), symmetry, observer (``mse`` searches clipping per group).
        block_size: columns updated lazily together (the paper's B = 128).
        dampening: ``lambda`` as a fraction of the mean Hessian diagonal (the paper's 1%).
        actorder: ``"none"``; ``"static"`` (columns processed by decreasing Hessian
            diagonal, groups fixed in natural order, so the export needs no g_idx);
            ``"group"`` (groups formed along the processing order; ``g_idx`` exported).
        dtype: dtype of the returned weight and parameters (default ``weight.dtype``).
        cross: optional (K, K) ``2 (X - X~) X~^T / n`` with ``X`` the full-precision
            model's inputs of the layer and ``X~`` the compressed model's (the
            ``hessian`` is then that of ``X~``). Turns on asymmetric calibration
            (GPTAQ / "GPTQv2", Li et al., ICML 2025, arXiv 2504.02692): the
            rounding also absorbs the error the earlier layers left in the inputs.
        cross_weight: the scale ``alpha`` of the asymmetric term (0.25 in the
            authors' reference code).
        refit: after rounding, re-solve each row's group scales for the codes
            chosen (:func:`refit_scales`); never increases the layer's output error.
        mask: optional (N, K) bool, True = kept: a pruned layer's mask. Pruned
            weights get the code of exact zero (the zero point, or 0 when
            symmetric) and their whole value is fed back into the remaining
            columns, as SparseGPT does for its joint sparse + quantized mode
            (arXiv 2301.00774, Sec. 3.5); group parameters see the kept weights only.
        gscale: NVFP4 only: a float32 (1,) global scale to use instead of the matrix's own (one shared by the
            linears a runtime fuses, :func:`compressor.core.scheme.shared_global_scales`).

    Returns:
        :class:`GPTQResult`.
    """
    return _gptq(weight, hessian, scheme, block_size, dampening, actorder, dtype, cross, cross_weight, refit, mask,
                 gscale)


def _gptq(weight, hessian, scheme, block_size, dampening, actorder, dtype, cross=None, cross_weight=0.25,
          refit=False, mask=None, gscale=None) -> GPTQResult:
    if actorder not in ACTORDER:
        raise ValueError(f"actorder={actorder!r}: use one of {ACTORDER}")
    if weight.ndim != 2 or hessian.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"shapes do not fit: weight {tuple(weight.shape)}, hessian {tuple(hessian.shape)}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight has NaN/inf entries: fix or reload the checkpoint before quantizing")
    if not 0 <= dampening < 1:
        raise ValueError(f"dampening={dampening}: use a fraction in [0, 1), e.g. 0.01")
    if cross is not None and cross.shape != hessian.shape:
        raise ValueError(f"cross {tuple(cross.shape)} must have the Hessian's shape {tuple(hessian.shape)}")
    if mask is not None:
        if mask.shape != weight.shape or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool tensor shaped like the weight {tuple(weight.shape)}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")
        if scheme.float_zero_point:
            raise ValueError("a pruned layer needs a grid with an exact zero: use symmetric or zero_point='int'")
    if refit and scheme.is_float:
        raise ValueError(f"refit re-solves free float scales; {scheme.describe()} stores its scales on a grid of "
                         "their own: set refit: false")
    dtype = dtype or weight.dtype
    n, k = weight.shape
    width = scheme.group_width(k)
    W = weight.detach().to(torch.float32).clone()  # (N, K)
    H = hessian.detach().to(torch.float32)  # (K, K), read only: copied below when it must change
    keep = None if mask is None else mask.to(W.device)
    if keep is not None:
        W = W.masked_fill(~keep, 0.0)

    dead = torch.diag(H) == 0
    if dead.any():
        H = H.clone()
        H[dead, dead] = 1.0
    W[:, dead] = 0.0

    if gscale is None:
        gscale = global_scale(W, scheme)  # NVFP4: one per matrix, from the (masked) original weight
    static_qp = None
    if actorder == "static" or scheme.group_size == -1:
        # parameters fixed up front from the original weight, natural groups
        static_qp = cast_params(compute_qparams(W, scheme, gscale=gscale), scheme, dtype)
        static_qp = QParams(static_qp.scale.float(),
                            None if static_qp.zero_point is None else static_qp.zero_point.float(), gscale)

    dev = W.device
    perm, Hinv, P = _sweep_factors(H, dead, actorder != "none", dampening, cross, cross_weight)
    W = W[:, perm]
    if keep is not None:
        keep = keep[:, perm]

    natural_group = torch.arange(k, device=dev) // width  # (K,)
    col_group = natural_group[perm] if static_qp is not None else natural_group  # group of each processed column
    groups = num_groups(k, width)
    scale = torch.zeros(n, groups, device=dev) if static_qp is None else static_qp.scale
    zp = None if scheme.symmetric else (torch.zeros(n, groups, device=dev) if static_qp is None else static_qp.zero_point)

    # lazy batch updates: blocks aligned to groups so a group's parameters see all earlier updates
    step = block_size if static_qp is not None else width * max(1, block_size // width)
    codes = torch.zeros(n, k, device=dev)
    loss = torch.zeros(n, device=dev)
    _column_loop(W, Hinv, scheme, dtype, static_qp, col_group, scale, zp, codes, loss, width, step, P, keep,
                 gscale=gscale)
    del W, Hinv, P  # (N, K) and 2 x (K, K) float32 that the refit below must not hold on to

    inv = torch.argsort(perm)
    codes = floats.encode(scheme.element, codes[:, inv]) if scheme.is_float else codes[:, inv].to(torch.int8)
    g_idx = None
    if actorder == "group":
        g_idx = col_group[inv].to(torch.int32)  # processing position // width, in natural column order
    qp = cast_params(QParams(scale, None if zp is None else zp, gscale), scheme, dtype)
    if refit and not scheme.float_zero_point:
        W_orig = weight.detach().float() if mask is None else weight.detach().float().masked_fill(~mask, 0.0)
        target = hessian.detach().to(torch.float32)
        if cross is not None:
            target = target + cross_weight * cross.detach().to(torch.float32)
        W_orig = W_orig.masked_fill(dead[None, :], 0.0) if dead.any() else W_orig  # no (N, K) copy otherwise
        qp = refit_scales(W_orig, codes, qp, scheme, hessian,
                          target=target, g_idx=g_idx)
    deq = dequantize(codes, qp, scheme, g_idx).to(dtype)
    return GPTQResult(weight=deq, codes=codes, qparams=qp, g_idx=g_idx, loss=float(loss.sum()))


def refit_scales(
    weight: torch.Tensor,
    codes: torch.Tensor,
    qparams: QParams,
    scheme: QuantScheme,
    hessian: torch.Tensor,
    *,
    target: torch.Tensor | None = None,
    g_idx: torch.Tensor | None = None,
) -> QParams:
    """Least-squares group scales for fixed integer codes and zero points.

    With the codes ``q`` and zero points ``z`` fixed, a row's dequantized weight
    ``sum_g s_g (q - z)|_g`` is linear in its group scales ``s``, so the scales
    minimising the layer's output error ``(w - w^) H (w - w^)^T`` solve a G x G
    system per row. GPTQ chose the codes against the scales fixed before
    rounding; re-solving them afterwards removes the error left in each group's
    overall magnitude. A row keeps its old scales when the new ones are not all
    positive and finite or, once rounded to the scale dtype, do not lower its error.

    Args:
        weight: (N, K) float full-precision weight.
        codes: (N, K) integer codes.
        qparams: scale / zero point (N, G); the zero points are kept.
        scheme: the scheme (integer zero points or symmetric).
        hessian: (K, K) ``2 X~ X~^T / n`` of the compressed model's inputs.
        target: (K, K) ``2 X X~^T / n`` when the reference output comes from other
            inputs ``X`` (asymmetric calibration); default ``hessian``.
        g_idx: (K,) group of each column, or None for natural groups.

    Returns:
        :class:`QParams` with the new scales in the old scales' dtype.
    """
    if scheme.float_zero_point:
        raise ValueError("refit_scales needs integer zero points: use zero_point='int' or a symmetric scheme")
    n, k = weight.shape
    width = scheme.group_width(k)
    cols = g_idx.long() if g_idx is not None else torch.arange(k, device=weight.device) // width  # (K,)
    g = qparams.scale.shape[1]
    # the (N, K) x (K, K) products run in float32 (twice the speed of float64 on a CPU; the codes are exact
    # in float32 and H is float32 already), their (N, G, G) / (N, G) group sums and the solve in float64
    H = hessian.float()
    T = H if target is None else target.float()
    A = codes.float()  # (N, K): the dequantized weight is A * scale[cols]
    if qparams.zero_point is not None:
        A = A - qparams.zero_point.float()[:, cols]

    natural = g_idx is None and k == g * width

    def group_sums(X):  # (N, K) float32 -> (N, G) float64: the sum over each group's columns
        if natural:
            return X.view(n, g, width).sum(-1).double()
        return torch.zeros(n, g, device=X.device).index_add_(1, cols, X).double()

    M = torch.empty(n, g, g, dtype=torch.float64, device=weight.device)  # per row: A_g^T H A_h
    for j in range(g):
        members = (cols == j).nonzero().squeeze(1)
        M[:, j, :] = group_sums((A[:, members] @ H[members, :]).mul_(A))
    rhs = group_sums((weight.float() @ T).mul_(A))  # (N, G): A_g^T T^T w
    old = qparams.scale.double()
    diag = torch.diagonal(M, dim1=1, dim2=2)
    empty = diag <= 0  # groups whose codes all sit on the zero point: keep their scale
    ridge = torch.where(empty, torch.ones_like(diag), 1e-9 * diag)
    b = torch.where(empty, old, rhs)
    new = torch.empty_like(old)
    for r in range(0, n, 256):  # a few rows' (G, G) systems at a time: at N = 4096, G = 112, M alone is 0.4 GB
        system = M[r : r + 256].clone()
        system.diagonal(dim1=1, dim2=2).add_(ridge[r : r + 256])
        new[r : r + 256] = torch.linalg.solve(system, b[r : r + 256].unsqueeze(-1)).squeeze(-1)
    new = torch.where(empty, old, new.to(qparams.scale.dtype).double())

    def err(s):  # (N,) output error up to a per-row constant
        return torch.einsum("ng,ngh,nh->n", s, M, s) - 2 * (s * rhs).sum(1)

    ok = torch.isfinite(new).all(1) & (new > 0).all(1) & (err(new) < err(old))
    scale = torch.where(ok[:, None], new, old).to(qparams.scale.dtype)
    return QParams(scale, qparams.zero_point)


def gptq_on_grid(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    grid: Grid,
    *,
    block_size: int = 128,
    dampening: float = 0.01,
    actorder: bool = True,
    cross: torch.Tensor | None = None,
    cross_weight: float = 0.25,
) -> tuple[torch.Tensor, float]:
    """GPTQ's codes on a grid fixed beforehand (e.g. a llama.cpp block format's scales and mins).

    The column sweep and error feedback of :func:`gptq_quantize`, but each weight rounds onto
    ``grid.step * q - grid.offset`` of its group (``grid.width`` consecutive columns), with ``q`` clamped to
    ``[grid.qmin, grid.qmax]``; the grid itself never moves, so any processing order keeps the groups.

    Args:
        weight: (N, K) float weight.
        hessian: (K, K) ``2 X X^T / n`` of the layer inputs.
        grid: :class:`~compressor.core.gguf_blocks.Grid` with (N, K / width) step and offset.
        block_size: lazy-update block width (columns).
        dampening: fraction of the mean Hessian diagonal added to the diagonal.
        actorder: process columns by decreasing Hessian diagonal.
        cross: optional (K, K) GPTAQ cross term (see :func:`gptq_quantize`).
        cross_weight: its scale ``alpha``.

    Returns:
        ``(codes, loss)``: (N, K) int64 codes in natural column order, and the summed per-column losses.
    """
    n, k = weight.shape
    if hessian.shape != (k, k) or grid.step.shape != (n, k // grid.width) or k % grid.width:
        raise ValueError(f"shapes do not fit: weight {tuple(weight.shape)}, hessian {tuple(hessian.shape)}, "
                         f"grid {tuple(grid.step.shape)} of width {grid.width}")
    if not torch.isfinite(weight).all():
        raise ValueError("weight has NaN/inf entries: fix or reload the checkpoint before quantizing")
    W = weight.detach().float().clone()
    H = hessian.detach().float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    perm, Hinv, P = _sweep_factors(H, dead, actorder, dampening, cross, cross_weight)
    W = W[:, perm]
    col_group = (torch.arange(k, device=W.device) // grid.width)[perm]
    zero_step = grid.step == 0
    step = torch.where(zero_step, torch.ones_like(grid.step), grid.step)

    def fq(w, g):
        q = torch.round((w + grid.offset[:, g]) / step[:, g]).clamp(grid.qmin, grid.qmax)
        deq = torch.where(zero_step[:, g], -grid.offset[:, g], step[:, g] * q - grid.offset[:, g])
        return q, deq

    codes = torch.zeros(n, k, device=W.device)
    loss = torch.zeros(n, device=W.device)
    _column_loop(W, Hinv, None, None, True, col_group, None, None, codes, loss, grid.width, block_size, P, fq=fq)
    return codes[:, torch.argsort(perm)].long(), float(loss.sum())


def _sweep_factors(H: torch.Tensor, dead: torch.Tensor, reorder: bool, dampening: float,
                   cross: torch.Tensor | None, cross_weight: float):
    """``(perm, Hinv, P)`` of a column sweep: the processing order (decreasing Hessian diagonal when
    ``reorder``), the upper Cholesky factor of the reordered, dampened ``H^-1`` (K, K), and GPTAQ's extra
    feedback ``P`` (K, K) from ``cross`` (None without one). ``H`` (K, K) float32 already has its ``dead``
    columns' diagonal set to 1."""
    k = H.shape[0]
    perm = torch.argsort(torch.diag(H), descending=True) if reorder else torch.arange(k, device=H.device)
    Hinv = inverse_cholesky(H, dampening, perm if reorder else None)
    P = None
    if cross is not None:
        C = cross.detach().to(torch.float32).clone()
        C[:, dead] = 0.0
        C = C[perm][:, perm]
        # the extra feedback of GPTAQ: each processed column w also moves the later ones by w P[j, :]
        P = cross_weight * torch.triu(C @ Hinv.t(), diagonal=1) @ Hinv
    return perm, Hinv, P


def _column_loop(W, Hinv, scheme, dtype, static_qp, col_group, scale, zp, codes, loss, width, step, P=None,
                 keep=None, fq=None, gscale=None) -> None:
    """GPTQ's column sweep (in place on W, scale, zp, codes, loss), processed order.

    ``P`` (K, K), when given, adds GPTAQ's asymmetric term: column ``w`` also
    moves the later columns by ``w P[j, :]``. ``keep`` (N, K) bool, when given,
    forces the pruned weights to the grid's exact zero. ``fq(w, g)`` (N,) column, group
    -> (codes, dequantized), when given, rounds onto a fixed grid instead of ``scale``/``zp``. ``gscale`` is
    NVFP4's global scale (float schemes' codes are their grid values).

    The per-column steps (thousands of (N,)-sized ops) run on one CPU thread (:func:`one_cpu_thread`); the
    deferred block updates, large matrix products, on all of them.
    """
    k = W.shape[1]
    for i1 in range(0, k, step):
        i2 = min(i1 + step, k)
        W1 = W[:, i1:i2].clone()  # (N, B)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        with one_cpu_thread(W.device):
            _block_columns(W1, Err1, Hinv1, i1, i2, scheme, dtype, static_qp, col_group, scale, zp, codes, loss,
                           width, P, keep, fq, gscale)
        if i2 < k:  # deferred update of the remaining columns, in place (no (N, K) temporary)
            W[:, i2:].addmm_(Err1, Hinv[i1:i2, i2:], alpha=-1)
            if P is not None:
                W[:, i2:].addmm_(W1, P[i1:i2, i2:])


def _block_columns(W1, Err1, Hinv1, i1, i2, scheme, dtype, static_qp, col_group, scale, zp, codes, loss, width, P,
                   keep, fq, gscale, sub: int = 16) -> None:
    """Columns ``i1:i2`` of :func:`_column_loop`, one by one, in place on the block ``W1`` (N, B) and ``Err1``.

    The block is held transposed (B, N), so a column is one contiguous row, and swept in sub-blocks of ``sub``
    columns: a column's rank-1 feedback reaches the rest of its sub-block at once, the later sub-blocks through
    one matrix product per sub-block (the same sums as eq. 4 column by column, grouped as the paper groups its
    blocks; with groups that cross a sub-block, no sub-blocks, so a group's parameters see every update).
    """
    b = i2 - i1
    if static_qp is None and width % sub and sub % width:
        sub = b
    Wt = W1.t().contiguous()  # (B, N)
    Et = torch.empty_like(Wt)
    Qt = torch.empty_like(Wt)
    Pre = torch.empty_like(Wt) if P is not None else None  # each column before its rounding
    P1 = None if P is None else P[i1:i2, i1:i2]
    for s1 in range(0, b, sub):
        s2 = min(s1 + sub, b)
        for i in range(s1, s2):
            col = i1 + i
            g = int(col_group[col])
            if static_qp is None and col % width == 0:
                group = Wt[i : i + width].t()  # (N, width)
                if keep is not None:  # pruned entries drifted with the feedback; they will be zero
                    group = group.masked_fill(~keep[:, col : col + group.shape[1]], 0.0)
                qp = _column_params(group, scheme, dtype, gscale)
                scale[:, g] = qp.scale[:, 0]
                if zp is not None:
                    zp[:, g] = qp.zero_point[:, 0]
            w = Wt[i]
            if fq is not None:
                q, deq = fq(w, g)
            else:
                q, deq = _fq_column(w, scale[:, g], None if zp is None else zp[:, g], scheme, gscale)
            if keep is not None:
                kept = keep[:, col]
                q = torch.where(kept, q, 0.0 if zp is None else zp[:, g])
                deq = torch.where(kept, deq, 0.0)
            Qt[i] = q
            d = Hinv1[i, i]
            loss += (w - deq) ** 2 / d**2 / 2
            err = (w - deq) / d
            if Pre is not None:
                Pre[i] = w  # before the update below changes the column itself
            Wt[i:s2].addr_(Hinv1[i, i:s2], err, alpha=-1)  # eq. 4 within the sub-block (rank 1, in place)
            if P1 is not None:
                Wt[i:s2].addr_(P1[i, i:s2], Pre[i])
            Et[i] = err
        if s2 < b:  # the sub-block's feedback on the rest of the block
            Wt[s2:].addmm_(Hinv1[s1:s2, s2:].t(), Et[s1:s2], alpha=-1)
            if P1 is not None:
                Wt[s2:].addmm_(P1[s1:s2, s2:].t(), Pre[s1:s2])
    W1.copy_(Wt.t())
    Err1.copy_(Et.t())
    codes[:, i1:i2] = Qt.t()

"""OSTQuant's learnable transforms and one transformed decoder block (arXiv 2501.13987).

:class:`Transforms` holds the parameters (Cayley-parametrized rotations, log-scales,
learned clip ratios); :func:`block_state` builds one block's transformed weights from
them, differentiably; :func:`ste_weight` and :class:`InputQuant` fake-quantize weights
and linear inputs during training. :mod:`compressor.algorithms.transforms.ostquant`
trains them and fuses the result.
"""

from __future__ import annotations

import torch
from torch import nn

from compressor.core.arch import DecoderLayout
from compressor.core.fake_quant import (
    activation_static_scales,
    fake_quant_float_per_token,
    fake_quant_per_token,
    round_ste,
    straight_through,
)
from compressor.core.scheme import QuantScheme, compute_qparams, fake_quant, grouped, params_from_range

__all__ = ["cayley", "Transforms", "block_state", "ste_weight", "InputQuant", "CLIP_SITE", "CLIP_SITES", "CLIP_FLOOR"]

_LINEARS = DecoderLayout.LINEARS
# learned clip ratios: one per block and input (q/k/v share theirs, gate/up too), kept in [CLIP_FLOOR, 1]
CLIP_SITES = ("qkv", "o", "gate_up", "down")
CLIP_SITE = {"q": 0, "k": 0, "v": 0, "o": 1, "gate": 2, "up": 2, "down": 3}
CLIP_FLOOR = 0.5


def cayley(x: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``(I + A)⁻¹(I − A)`` with ``A = X − Xᵀ``; x (..., n, n) float → (..., n, n), I at x = 0."""
    a = x - x.transpose(-1, -2)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device).expand_as(a)
    return torch.linalg.solve(eye + a, eye - a)


# ---------------------------------------------------------------- the learnable transforms


class Transforms(nn.Module):
    """R1, per-block R2 and the per-block log-scales; ``s_*`` vectors are ``exp`` of the parameters.

    Shapes: R1 (d, d); R2 (L, hd, hd); attn / ffn (L, d); ov (L, kv·hd);
    ud (L, inter); qk (L, kv, hd/2); the optional learned clip ratios
    (L, 4), one per block and :data:`CLIP_SITES` entry. A disabled transform
    has no parameter.
    """

    def __init__(self, r1: torch.Tensor, r2: torch.Tensor | None, n_blocks: int, d: int, n_kv: int, hd: int,
                 inter: int, *, scales: dict[str, bool], clip_init: float | None = None):
        super().__init__()
        self.register_buffer("r1_base", r1.clone())  # float64
        self.r1_skew = nn.Parameter(torch.zeros(d, d))
        self.register_buffer("r2_base", None if r2 is None else r2.expand(n_blocks, hd, hd).clone())
        self.r2_skew = None if r2 is None else nn.Parameter(torch.zeros(n_blocks, hd, hd))
        shapes = {"attn": (n_blocks, d), "ffn": (n_blocks, d), "ov": (n_blocks, n_kv * hd), "ud": (n_blocks, inter),
                  "qk": (n_blocks, n_kv, hd // 2)}
        self.log_scale = nn.ParameterDict({k: nn.Parameter(torch.zeros(shapes[k])) for k, on in scales.items() if on})
        self.clip = None if clip_init is None else nn.Parameter(torch.full((n_blocks, len(CLIP_SITES)), clip_init))

    def clip_ratio(self, i: int, site: int) -> torch.Tensor:
        """Block i's clip ratio of input ``site`` (index into :data:`CLIP_SITES`): a 0-d float32 in [CLIP_FLOOR, 1]."""
        return self.clip[i, site].clamp(CLIP_FLOOR, 1.0)

    def r1(self, dtype: torch.dtype) -> torch.Tensor:
        """(d, d) orthogonal."""
        return self.r1_base.to(dtype) @ cayley(self.r1_skew.to(dtype))

    def r2(self, dtype: torch.dtype) -> torch.Tensor | None:
        """(L, hd, hd) orthogonal, or None."""
        if self.r2_skew is None:
            return None
        return self.r2_base.to(dtype) @ cayley(self.r2_skew.to(dtype))

    def scale(self, name: str, i: int, dtype: torch.dtype) -> torch.Tensor | None:
        """Block i's positive scale vector ``name`` (see the shapes above), or None when off."""
        p = self.log_scale[name] if name in self.log_scale else None
        return None if p is None else p[i].to(dtype).exp()


def block_state(m: dict[str, nn.Module], t: Transforms, i: int, r1: torch.Tensor, r2: torch.Tensor | None,
                 dims: tuple[int, int, int], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Block i's transformed weights (see the module docstring), keyed by layout key + ``.weight`` / ``.bias``.

    ``m`` maps layout keys to the block's modules, whose weights are the
    norm-folded originals. Differentiable in ``t``; computed in ``dtype``.
    """
    n_heads, n_kv, hd = dims
    groups = n_heads // n_kv
    w = {k: m[k].weight.detach().to(dtype) for k in _LINEARS}
    b = {k: m[k].bias.detach().to(dtype) for k in _LINEARS if m[k].bias is not None}
    s_attn, s_ffn = t.scale("attn", i, dtype), t.scale("ffn", i, dtype)
    s_ov, s_ud, s_qk = t.scale("ov", i, dtype), t.scale("ud", i, dtype), t.scale("qk", i, dtype)
    d = r1.shape[0]
    out: dict[str, torch.Tensor] = {}

    def reader(key: str, s_in: torch.Tensor | None) -> torch.Tensor:  # W R1 diag(1/s)
        x = w[key] @ r1
        return x if s_in is None else x / s_in[None, :]

    wq, wk, wv = reader("q", s_attn), reader("k", s_attn), reader("v", s_attn)
    bq, bk, bv = b.get("q"), b.get("k"), b.get("v")
    if s_qk is not None:
        sk = torch.cat([s_qk, s_qk], dim=-1)  # (kv, hd): RoPE pairs dim j with j + hd/2
        sq = sk.repeat_interleave(groups, dim=0)  # (H, hd)
        wq = (wq.reshape(n_heads, hd, d) * sq[..., None]).reshape(n_heads * hd, d)
        wk = (wk.reshape(n_kv, hd, d) / sk[..., None]).reshape(n_kv * hd, d)
        bq = None if bq is None else bq * sq.reshape(-1)
        bk = None if bk is None else bk / sk.reshape(-1)
    wv = wv.reshape(n_kv, hd, d)
    if r2 is not None:
        wv = r2.T @ wv  # v_h ← v_h R2
        bv = None if bv is None else (bv.reshape(n_kv, hd) @ r2).reshape(-1)
    if s_ov is not None:
        wv = wv * s_ov.reshape(n_kv, hd, 1)
        bv = None if bv is None else bv * s_ov
    wv = wv.reshape(n_kv * hd, d)
    wo = w["o"].reshape(-1, n_heads, hd)  # (d, H, hd)
    if r2 is not None:
        wo = wo @ r2
    if s_ov is not None:
        wo = wo / s_ov.reshape(n_kv, hd).repeat_interleave(groups, dim=0)[None]
    wo = r1.T @ wo.reshape(-1, n_heads * hd)
    o_transform = m["o"]._modules.get("input_transform")
    if o_transform is not None:
        wo = o_transform(wo)  # W ← W Q; x ← x Q online
    wg, wu = reader("gate", s_ffn), reader("up", s_ffn)
    bu = b.get("up")
    if s_ud is not None:
        wu = wu * s_ud[:, None]
        bu = None if bu is None else bu * s_ud
    wd = w["down"] if s_ud is None else w["down"] / s_ud[None, :]
    transform = m["down"]._modules.get("input_transform")
    if transform is not None:
        wd = transform(wd)  # rows x ↦ x H4: W ← W H4
    wd = r1.T @ wd
    new_w = {"q": wq, "k": wk, "v": wv, "o": wo, "gate": wg, "up": wu, "down": wd}
    new_b = {"q": bq, "k": bk, "v": bv, "up": bu, "gate": b.get("gate"),
             "o": None if "o" not in b else b["o"] @ r1, "down": None if "down" not in b else b["down"] @ r1}
    for k in _LINEARS:
        out[f"{k}.weight"] = new_w[k]
        if m[k].bias is not None:
            out[f"{k}.bias"] = new_b[k]
    one = torch.ones(d, dtype=dtype, device=r1.device)
    out["attn_norm.weight"] = one if s_attn is None else s_attn
    out["mlp_norm.weight"] = one if s_ffn is None else s_ffn
    return out


# ---------------------------------------------------------------- training-time quantizers


def ste_weight(w: torch.Tensor, scheme: QuantScheme, range_grad: bool = False) -> torch.Tensor:
    """Min-max RTN fake quantization of w (N, K) → (N, K), differentiable.

    The rounding is straight-through. With ``range_grad`` the gradient also
    flows through each group's scale, i.e. its min / max (integer grids only); without, the
    quantization error is a constant (identity gradient). Float grids (FP8, NVFP4, MXFP4) round to
    their values with their format's scales (NVFP4: the matrix's own global scale).
    """
    if not range_grad:
        with torch.no_grad():
            q = fake_quant(w.detach(), compute_qparams(w.detach(), scheme), scheme)
        return w + (q - w).detach()
    n, k = w.shape
    wg, _ = grouped(w, scheme.group_width(k))  # (N, G, W)
    qp = params_from_range(wg.amin(dim=2), wg.amax(dim=2), scheme)  # scale (N, G) differentiable; zp rounded
    scale = qp.scale.unsqueeze(-1)
    zp = 0.0 if qp.zero_point is None else qp.zero_point.unsqueeze(-1)
    q = torch.clamp(round_ste(wg / scale + zp), scheme.qmin, scheme.qmax)  # as scheme.quantize, ties included
    return ((q - zp) * scale).reshape(n, -1)[:, :k]


class InputQuant:
    """Removable forward pre-hook: per-token fake quantization of a linear's input (see ``ste_weight``).

    With ``clip`` (a callable returning a 0-d tensor that requires grad) the
    clip ratio is learned: the quantizer then always lets the gradient through
    its scale (``range_grad``), the only way the ratio gets one.
    """

    def __init__(self, bits: int, symmetric: bool, clip_ratio: float, range_grad: bool = False, clip=None,
                 fmt: str | None = None):
        self.bits, self.symmetric, self.clip_ratio, self.range_grad = bits, symmetric, clip_ratio, range_grad
        self.clip, self.fmt = clip, fmt

    def __call__(self, module: nn.Module, args: tuple):
        x = args[0]
        if self.fmt is not None:  # a float grid; static scales stand in as the batch's own largest |x|
            gs, static = activation_static_scales(self.fmt, x.detach().abs().amax())
            return (straight_through(x, fake_quant_float_per_token(x, self.fmt, gs, static)),) + tuple(args[1:])
        if self.clip is not None:
            q = fake_quant_per_token(x, self.bits, symmetric=self.symmetric, clip_ratio=self.clip(), range_grad=True)
            return (q,) + tuple(args[1:])
        q = fake_quant_per_token(x, self.bits, symmetric=self.symmetric, clip_ratio=self.clip_ratio,
                                 range_grad=self.range_grad)
        return (q if self.range_grad and x.requires_grad else straight_through(x, q),) + tuple(args[1:])


# ---------------------------------------------------------------- the whole procedure

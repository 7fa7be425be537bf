"""OSTQuant: learned orthogonal and scaling transforms, trained under fake quantization (arXiv 2501.13987).

QuaRot's Hadamard rotations (:mod:`compressor.algorithms.transforms.rotate`) are fixed.
OSTQuant starts from them and *learns*, on calibration data, an equivalent
transform of every pair of layers that share an activation:

* ``R1`` (d, d): the global orthogonal rotation of the residual stream
  (embedding, every reader and writer of the residual, ``lm_head``);
* ``R2`` (hd, hd) per block: the per-head rotation of values / o_proj input;
* scaling vectors, one per equivalent pair and block (all in the rotated basis):

  - ``s_attn`` (d): norm → q/k/v. The RMSNorm weight becomes ``s_attn`` and
    the readers' columns are divided by it;
  - ``s_ffn`` (d): norm → gate/up, the same way;
  - ``s_ov`` (kv·hd): value → output. v_proj's rows are multiplied by it,
    o_proj's columns of every head of the group divided;
  - ``s_ud`` (inter): up → down. up_proj's rows are multiplied by it and
    down_proj's columns divided (SiLU(gate) · up is linear in up);
  - ``s_qk`` (kv·hd/2): query → key. q rows are multiplied and k rows divided,
    equal on the two halves of a head that RoPE rotates together, so
    ``RoPE(q ⊙ s) = RoPE(q) ⊙ s`` and every score ``q kᵀ`` is unchanged.

The online Hadamard R4 before down_proj (and R3 on queries / keys after RoPE)
stay fixed, as in the paper. With ``W`` the norm-folded weights, ``H4`` the
R4 matrix and ``g(h)`` the kv head of query head h, the transformed block is::

    norms                 s_attn, s_ffn
    W_q,h  ← diag(s_qk,g(h)) W_q,h R1 diag(1/s_attn)
    W_k,g  ← diag(1/s_qk,g)  W_k,g R1 diag(1/s_attn)
    W_v,g  ← diag(s_ov,g) R2ᵀ W_v,g R1 diag(1/s_attn)
    W_o,h  ← R1ᵀ W_o,h R2 diag(1/s_ov,g(h))
    W_gate ← W_gate R1 diag(1/s_ffn)
    W_up   ← diag(s_ud) W_up R1 diag(1/s_ffn)
    W_down ← R1ᵀ W_down diag(1/s_ud) H4

Orthogonality is kept by the Cayley parametrization ``R = R0 (I + A)⁻¹(I − A)``
with ``A = X − Xᵀ`` skew-symmetric (X learned, starting at 0, so training
starts from the Hadamard init R0). Scales are ``exp(θ)`` (θ starts at 0).

Training (paper §4): the calibration sequences run through the transformed
model with its weights fake-quantized per output channel by min-max RTN
(straight-through gradients), its linear inputs per token and its keys /
values per head, and the loss is **KL-Top**: the KL divergence of the
full-precision model's next-token distribution restricted to its top-k logits
(k = 1000 by default) from the quantized model's distribution over the same k
tokens. Only the transforms learn. Afterwards they are fused into the weights
(float64), so the full-precision function is unchanged and the weight and
activation passes that follow quantize the transformed model.

QSUR (paper §3), the quantization space utilization rate of an activation,
is the volume of the ellipsoid its distribution fills over the volume of the
hypercube a per-token grid must cover. :func:`qsur` reports its
dimension-normalized form (see there); the pass reports it per layer before
rotation, after the Hadamard init and after training.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from compressor.algorithms.distill.losses import forward_kl
from compressor.runtime.activations import (
    KV_CHILD, LEARNED_CLIP, KVQuantizer, QKRotation, _check_bits, _check_clip, _check_group,
    _round_ste, _straight_through, _wrapped_attention,
    attach_kv_quantizer, attach_qk_rotation, attention_modules, fake_quant_per_token, qk_rotations,
)
from compressor.core.scheme import QuantScheme, _grouped, _params_from_range, compute_qparams, fake_quant
from compressor.core.progress import progress
from compressor.recipe import Pass, PassConfig, register_pass
from compressor.runtime.online import OnlineHadamard, attach_input_transform, online_transforms
from compressor.algorithms.transforms.rotate import _fold_norm, _fresh_decoder, _get, _heads, _r3_targets, _rotation, _untie

__all__ = ["qsur", "kl_top", "cayley", "OSTQuantConfig", "OSTQuantPass", "ostquant_model"]

log = logging.getLogger(__name__)

_LINEARS = ("q", "k", "v", "o", "gate", "up", "down")
# learned clip ratios: one per block and input (q/k/v share theirs, gate/up too), kept in [CLIP_FLOOR, 1]
CLIP_SITES = ("qkv", "o", "gate_up", "down")
_CLIP_SITE = {"q": 0, "k": 0, "v": 0, "o": 1, "gate": 2, "up": 2, "down": 3}
CLIP_FLOOR = 0.5


# ---------------------------------------------------------------- metrics and losses


def qsur(x: torch.Tensor) -> float:
    """Dimension-normalized quantization space utilization rate of activations ``x`` (OSTQuant §3).

    With the second-moment matrix ``M = xᵀx / n`` (eigenvalues λ_i), the data
    fill an ellipsoid with semi-axes ∝ √λ_i, and a per-token grid must cover
    the hypercube whose half-side is the largest per-channel spread
    ``max_j √M_jj``. The paper's QSUR is the ratio of the two volumes; this
    returns its d-th root divided by that of the ball-in-cube ratio::

        qsur = exp(mean_i log √λ_i) / max_j √M_jj    ∈ (0, 1]

    so 1 means an isotropic distribution (M ∝ I), an orthogonal transform can
    at best equalize the diagonal (qsur = geomean(√λ) / √mean(λ)), and only a
    scaling changes the eigenvalues. The uncentred moment is used because a
    symmetric per-token grid covers |x|, means included.

    Args:
        x: (n, d) float activations, n ≥ d rows (tokens) for a full-rank M.

    Returns:
        The ratio as a float (eigenvalues below 1e-12 · max are clamped there).
    """
    if x.ndim != 2:
        raise ValueError(f"qsur expects (tokens, channels), got shape {tuple(x.shape)}")
    x = x.double()
    m = x.T @ x / x.shape[0]  # (d, d)
    lam = torch.linalg.eigvalsh(m)
    lam = lam.clamp(min=max(lam.max().item(), 1e-300) * 1e-12)
    return math.exp(0.5 * lam.log().mean().item()) / math.sqrt(m.diagonal().max().item())


def kl_top(student: torch.Tensor, top_values: torch.Tensor, top_index: torch.Tensor, *,
           temperature: float = 1.0) -> torch.Tensor:
    """KL-Top (OSTQuant §4) against a teacher's precomputed top-k logits.

    :func:`compressor.algorithms.distill.losses.topk_kl` with ``renormalize=True``, for a
    teacher kept only as its top-k values and indices (the full-precision
    logits of every calibration token would not fit in memory).

    Args:
        student: (..., V) float logits of the quantized model.
        top_values: (..., k) float logits of the full-precision model at its top-k tokens.
        top_index: (..., k) int64 indices of those tokens.
        temperature: both distributions use logits / temperature (the loss is scaled by T²).

    Returns:
        Scalar float32: the mean over positions of T² Σ_k p (log p − log q), with p
        and q the softmax of the teacher's and the student's logits over the k tokens.
    """
    return forward_kl(torch.gather(student, -1, top_index), top_values, temperature=temperature)


def cayley(x: torch.Tensor) -> torch.Tensor:
    """Orthogonal ``(I + A)⁻¹(I − A)`` with ``A = X − Xᵀ``; x (..., n, n) float → (..., n, n), I at x = 0."""
    a = x - x.transpose(-1, -2)
    eye = torch.eye(x.shape[-1], dtype=x.dtype, device=x.device).expand_as(a)
    return torch.linalg.solve(eye + a, eye - a)


# ---------------------------------------------------------------- the learnable transforms


class _Transforms(nn.Module):
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


def _block_state(m: dict[str, nn.Module], t: _Transforms, i: int, r1: torch.Tensor, r2: torch.Tensor | None,
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


def _ste_weight(w: torch.Tensor, scheme: QuantScheme, range_grad: bool = False) -> torch.Tensor:
    """Min-max RTN fake quantization of w (N, K) → (N, K), differentiable.

    The rounding is straight-through. With ``range_grad`` the gradient also
    flows through each group's scale, i.e. its min / max; without, the
    quantization error is a constant (identity gradient).
    """
    if not range_grad:
        with torch.no_grad():
            q = fake_quant(w.detach(), compute_qparams(w.detach(), scheme), scheme)
        return w + (q - w).detach()
    n, k = w.shape
    wg, _ = _grouped(w, scheme.group_width(k))  # (N, G, W)
    qp = _params_from_range(wg.amin(dim=2), wg.amax(dim=2), scheme)  # scale (N, G) differentiable; zp rounded
    scale = qp.scale.unsqueeze(-1)
    zp = 0.0 if qp.zero_point is None else qp.zero_point.unsqueeze(-1)
    q = torch.clamp(_round_ste(wg / scale + zp), scheme.qmin, scheme.qmax)  # as scheme.quantize, ties included
    return ((q - zp) * scale).reshape(n, -1)[:, :k]


class _InputQuant:
    """Removable forward pre-hook: per-token fake quantization of a linear's input (see ``_ste_weight``).

    With ``clip`` (a callable returning a 0-d tensor that requires grad) the
    clip ratio is learned: the quantizer then always lets the gradient through
    its scale (``range_grad``), the only way the ratio gets one.
    """

    def __init__(self, bits: int, symmetric: bool, clip_ratio: float, range_grad: bool = False, clip=None):
        self.bits, self.symmetric, self.clip_ratio, self.range_grad = bits, symmetric, clip_ratio, range_grad
        self.clip = clip

    def __call__(self, module: nn.Module, args: tuple):
        x = args[0]
        if self.clip is not None:
            q = fake_quant_per_token(x, self.bits, symmetric=self.symmetric, clip_ratio=self.clip(), range_grad=True)
            return (q,) + tuple(args[1:])
        q = fake_quant_per_token(x, self.bits, symmetric=self.symmetric, clip_ratio=self.clip_ratio,
                                 range_grad=self.range_grad)
        return (q if self.range_grad and x.requires_grad else _straight_through(x, q),) + tuple(args[1:])


# ---------------------------------------------------------------- the whole procedure


@dataclass(frozen=True, kw_only=True)
class OSTQuantConfig(PassConfig):
    """Learned orthogonal + scaling transforms (OSTQuant), trained under fake quantization.

    The transforms cover the whole model, so ``targets``/``ignore`` do not
    apply; during training every linear of the decoder blocks is
    fake-quantized (``lm_head`` stays in full precision).

    Attributes:
        seed: seeds the Hadamard signs of R1 / R2 and the order of the training sequences.
        r1_init: ``"hadamard"`` (randomized Hadamard, QuaRot) or ``"random"`` (random orthogonal).
        rotate_ov: learn a per-block R2 on values / o_proj input.
        r3: online Hadamard on queries and keys after RoPE (fixed; for a quantized KV cache).
        online_o: fixed online Hadamard on the o_proj input, mixing the heads
            (as ``rotate``'s ``online_o``; exported like R4).
        smooth_norm: learn ``s_attn`` / ``s_ffn`` (norm → q/k/v, norm → gate/up).
        smooth_ov: learn ``s_ov`` (value → output).
        smooth_up_down: learn ``s_ud`` (up → down).
        smooth_qk: learn ``s_qk`` (query → key); skipped, with a log line, on
            models whose attention normalizes q and k per head (Qwen3).
        weight: the weight grid fake-quantized during training (min-max RTN;
            the weight pass that follows quantizes for real), or null to train
            with full-precision weights. Use the scheme of an ``rtn`` pass that
            follows; before ``gptq``, null (SpinQuant, arXiv 2405.16406, learns
            its rotations for GPTQ with 16-bit weights, since GPTQ handles the
            weight error itself).
        bits, symmetric, clip_ratio: per-token linear-input quantization during
            training (``bits: null`` for weight-only); use the settings of the
            ``quantize_activations`` pass that follows.
        kv_bits, kv_symmetric, kv_group_size: per-head KV quantization during
            training (``kv_bits: null`` for none).
        steps: optimizer steps (one batch each).
        batch_size: sequences per step.
        samples: calibration sequences used (the first ones; teacher top-k
            logits are kept for all of them, samples × seq_len × top_k × 8 bytes).
        lr: Adam learning rate of the rotations' skew parameters. Adam moves
            every one of the d² entries by about ``lr`` a step, so the rotation
            as a whole moves fast: on SmolLM2 (d = 576) 2e-3 and 4e-4 made the
            loss rise and the model worse than its Hadamard start; 1e-4 lowers it.
        lr_scale: Adam learning rate of the log-scales. On SmolLM2 at A4KV4 with
            fp weights, 5e-3 made KL-Top rise (0.67 → 1.39 in 40 steps); 1e-3 lowers it.
        range_grad: the training quantizers (weights, linear inputs, KV) let the
            gradient through their scales, i.e. each group's / token's min and
            max, with only the rounding straight-through (LSQ-style). Without it
            the quantization error is a constant to the gradient, so training
            cannot see that a transform which shrinks the range shrinks the
            error (docs/ostquant.md, "Gradients through the grid").
        learn_clip: learn one clip ratio per block and linear input (q/k/v
            share one, gate/up another; 4 per block), starting at
            ``clip_ratio`` and kept in [0.5, 1], with the transforms. The
            ratios are left on the linears (``learned_clip`` attribute), and a
            ``quantize_activations`` pass with the same ``bits`` / ``symmetric``
            uses them instead of its own ``clip_ratio``; they are exported per
            config group. On SmolLM2 at W4A4KV4 this is the largest gain
            (docs/ostquant.md, "Learned clip ratios"). Nothing to learn when
            ``bits`` is null.
        lr_clip: Adam learning rate of the clip ratios (3e-2 beat 1e-2 on SmolLM2).
        top_k: tokens of the KL-Top loss.
        temperature: softmax temperature of the KL-Top loss.
        qsur_samples: calibration sequences for the QSUR report (0: no report).
    """

    targets: tuple[str, ...] = field(default=(), init=False)
    ignore: tuple[str, ...] = field(default=(), init=False)
    seed: int = 0
    r1_init: str = "hadamard"
    rotate_ov: bool = True
    r3: bool = True
    online_o: bool = False
    smooth_norm: bool = True
    smooth_ov: bool = True
    smooth_up_down: bool = True
    smooth_qk: bool = True
    weight: QuantScheme | None = field(default_factory=lambda: QuantScheme(bits=4, group_size=-1, symmetric=False))
    bits: int | None = 4
    symmetric: bool = True
    clip_ratio: float = 1.0
    kv_bits: int | None = 4
    kv_symmetric: bool = False
    kv_group_size: int | None = None
    steps: int = 100
    batch_size: int = 1
    samples: int = 32
    lr: float = 1e-4  # 2e-3 and 4e-4 raised KL-Top on SmolLM2 at A4KV4 (docs/ostquant.md)
    lr_scale: float = 1e-3  # 5e-3 raised KL-Top on SmolLM2 (docs/ostquant.md)
    range_grad: bool = False
    learn_clip: bool = True
    lr_clip: float = 3e-2
    top_k: int = 1000
    temperature: float = 1.0
    qsur_samples: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.r1_init not in ("hadamard", "random"):
            raise ValueError(f"ostquant.r1_init={self.r1_init!r}: use 'hadamard' or 'random'")
        for name in ("rotate_ov", "r3", "online_o", "smooth_norm", "smooth_ov", "smooth_up_down", "smooth_qk",
                     "symmetric", "kv_symmetric", "range_grad", "learn_clip"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ostquant.{name} must be true or false, got {getattr(self, name)!r}")
        for name, low in (("seed", 0), ("steps", 1), ("batch_size", 1), ("samples", 1), ("top_k", 2),
                          ("qsur_samples", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"ostquant.{name} must be an integer >= {low}, got {v!r}")
        for name in ("lr", "lr_scale", "lr_clip", "temperature"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"ostquant.{name} must be a positive number, got {v!r}")
        if self.bits is not None:
            _check_bits(self.bits, "ostquant.bits")
        if self.learn_clip and self.bits is not None and self.clip_ratio < CLIP_FLOOR:
            raise ValueError(f"ostquant.clip_ratio={self.clip_ratio} is below the learned clip's floor {CLIP_FLOOR}: "
                             f"start learn_clip at a ratio in [{CLIP_FLOOR}, 1], or set learn_clip: false")
        _check_clip(self.clip_ratio, "ostquant.clip_ratio")
        if self.kv_bits is not None:
            _check_bits(self.kv_bits, "ostquant.kv_bits")
        if self.weight is not None and (self.weight.float_zero_point or self.weight.observer != "minmax"):
            raise ValueError("ostquant.weight: training fake-quantizes with a min-max grid and an integer zero point; "
                             "use observer: minmax, zero_point: int (the weight pass after it may differ)")


def ostquant_model(model: nn.Module, ids: torch.Tensor, config: OSTQuantConfig | None = None, *,
                   quiet: bool = False) -> dict:
    """Fold norms, learn OSTQuant's transforms on ``ids`` and fuse them into ``model`` (in place).

    The full-precision function is unchanged (up to float round-off); the
    fused model carries an online Hadamard before every down_proj (R4) and,
    with ``config.r3``, on queries and keys after RoPE, like ``rotate``.

    Args:
        model: a Hugging Face causal LM of a family in :data:`compressor.core.arch.LAYOUTS`, fp32,
            neither rotated nor quantized; sdpa or eager attention when ``r3`` or ``kv_bits``.
        ids: int64 (S, L) calibration token ids; the first ``config.samples`` rows train.
        config: the settings (defaults: W4 per-channel asymmetric, A4 per token, KV4).
        quiet: no progress bar (the loss is logged ~20 times either way).

    Returns:
        ``{"method", "steps", "loss_first", "loss_last", "seconds", "qsur", "r3", "r4", "smooth_qk", ...}``;
        ``qsur`` maps ``original`` / ``init`` / ``trained`` to per-layer QSUR lists
        (``[{"layer", "input", "qsur"}]``) when ``qsur_samples`` > 0.

    Raises:
        ValueError: unsupported architecture / attention implementation / size,
            a rotated or quantized model, bad calibration ids or non-finite weights.
    """
    c = config or OSTQuantConfig()
    layout, blocks_name, blocks, emb, head = _fresh_decoder(model, "ostquant")
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.ndim != 2:
        raise ValueError("ostquant needs calibration token ids, an int64 (S, L) tensor")
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"ostquant: {bad[0]} holds NaN/inf; the checkpoint is corrupt, reload or re-download it")
    config_ = model.config
    d = config_.hidden_size
    n_heads, n_kv, hd = _heads(config_)
    body_name = getattr(model, "base_model_prefix", "model")
    body = getattr(model, body_name, None)
    if not isinstance(body, nn.Module) or not blocks_name.startswith(body_name + "."):
        raise ValueError(f"ostquant: {type(model).__name__} keeps its blocks at {blocks_name}, not under "
                         f"{body_name!r}; this layout is not supported")
    mods = []
    for i, block in enumerate(blocks):
        where = f"{blocks_name}.{i}"
        mods.append({k: _get(block, getattr(layout, k), where) for k in
                     ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")})
    m0 = mods[0]
    if m0["v"].out_features != n_kv * hd or m0["o"].in_features != n_heads * hd or hd % 2:
        raise ValueError(f"ostquant: v_proj/o_proj widths ({m0['v'].out_features}, {m0['o'].in_features}) do not match "
                         f"{n_kv} kv heads / {n_heads} heads of {hd}")
    inter = m0["down"].in_features
    smooth_qk = c.smooth_qk
    if smooth_qk and any(hasattr(b_, "q_norm") or hasattr(getattr(b_, "self_attn", None), "q_norm") for b_ in blocks):
        log.info("ostquant: the attention normalizes queries and keys per head (q_norm/k_norm), which would undo a "
                 "query/key scaling; smooth_qk is skipped")
        smooth_qk = False
    # checks that can fail come before any weight changes
    r1_0 = _rotation(c.r1_init, d, c.seed)  # (d, d) float64
    r2_0 = _rotation(c.r1_init, hd, c.seed + 1) if c.rotate_ov else None
    OnlineHadamard(inter)
    if c.online_o:
        OnlineHadamard(n_heads * hd)
    attention = _r3_targets(model, hd) if c.r3 else []
    if c.kv_bits is not None:
        kv_targets = [a for _, a in attention_modules(model)]
        if not kv_targets:
            raise ValueError("ostquant: kv_bits needs transformers attention modules; set kv_bits: null")
        for a in kv_targets:
            _wrapped_attention(a, "quantize the KV cache during ostquant training")
            _check_group(c.kv_group_size, hd)
    else:
        kv_targets = []
    samples = ids[: c.samples]
    start = time.perf_counter()
    report: dict[str, list] = {}
    qsur_ids = ids[: c.qsur_samples]
    linear_names = {f"{blocks_name}.{i}.{getattr(layout, k)}": (i, k) for i in range(len(blocks)) for k in ("q", "o", "up", "down")}
    if c.qsur_samples:
        report["original"] = _qsur_report(model, qsur_ids, linear_names)

    # 1. teacher top-k on the untouched model
    top_values, top_index = _teacher_topk(model, samples, c.top_k, quiet)

    # 2. fold norms (function unchanged) and attach the fixed online transforms
    untied = _untie(model, emb, head)
    with torch.no_grad():
        for i, m in enumerate(mods):
            _fold_norm(m["attn_norm"], [m["q"], m["k"], m["v"]], f"{blocks_name}.{i}.{layout.attn_norm}")
            _fold_norm(m["mlp_norm"], [m["gate"], m["up"]], f"{blocks_name}.{i}.{layout.mlp_norm}")
        _fold_norm(_get(model, layout.final_norm, type(model).__name__), [head], layout.final_norm)
    for m in mods:
        attach_input_transform(m["down"], OnlineHadamard(inter).to(m["down"].weight.device))
        if c.online_o:
            attach_input_transform(m["o"], OnlineHadamard(m["o"].in_features).to(m["o"].weight.device))
    for attn in attention:
        attach_qk_rotation(attn, QKRotation(hd).to(next(attn.parameters()).device))
    dev = emb.weight.device
    t = _Transforms(r1_0, r2_0, len(blocks), d, n_kv, hd, inter,
                    scales={"attn": c.smooth_norm, "ffn": c.smooth_norm, "ov": c.smooth_ov, "ud": c.smooth_up_down,
                            "qk": smooth_qk},
                    clip_init=float(c.clip_ratio) if c.learn_clip and c.bits is not None else None).to(dev)
    dims = (n_heads, n_kv, hd)
    prefix = {i: f"{blocks_name[len(body_name) + 1:]}.{i}." for i in range(len(blocks))}
    names = {k: getattr(layout, k) for k in ("attn_norm", "q", "k", "v", "o", "mlp_norm", "gate", "up", "down")}

    def state(dtype: torch.dtype, quantize: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        r1, r2 = t.r1(dtype), t.r2(dtype)
        params = {}
        for i, m in enumerate(mods):
            for key, value in _block_state(m, t, i, r1, None if r2 is None else r2[i], dims, dtype).items():
                k, attr = key.split(".")
                if quantize and c.weight is not None and attr == "weight" and k in _LINEARS:
                    value = _ste_weight(value, c.weight, c.range_grad)
                params[f"{prefix[i]}{names[k]}.{attr}"] = value
        return params, r1

    if c.qsur_samples:
        with torch.no_grad():
            params, r1 = state(torch.float32, False)
            report["init"] = _qsur_report(model, qsur_ids, linear_names, body=(body, params, r1, emb))

    # 3. train under fake quantization
    hooks = []
    losses: list[float] = []
    failed: BaseException | None = None
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    impl = model.config._attn_implementation
    try:
        if c.bits is not None:
            for i, m in enumerate(mods):
                for k in _LINEARS:
                    clip = None if t.clip is None else (lambda i=i, s=_CLIP_SITE[k]: t.clip_ratio(i, s))
                    hooks.append(m[k].register_forward_pre_hook(
                        _InputQuant(c.bits, c.symmetric, c.clip_ratio, c.range_grad, clip)))
        for a in kv_targets:
            attach_kv_quantizer(a, KVQuantizer(c.kv_bits, symmetric=c.kv_symmetric, group_size=c.kv_group_size,
                                               range_grad=c.range_grad))
        _train(t, state, body, emb, head, samples, top_values, top_index, c, quiet, losses)
    except BaseException as err:  # NaN loss, Ctrl-C: fuse what was learned so far, so the model stays exact
        failed = err
    finally:
        for h in hooks:
            h.remove()
        for a in kv_targets:
            a._modules.pop(KV_CHILD, None)
        if not qk_rotations(model):
            model.config._attn_implementation = impl if not impl.startswith("compressor_kvquant:") else impl.split(":", 1)[1]
        for p in frozen:
            p.requires_grad_(True)

    # 4. fuse in float64
    with torch.no_grad():
        params, r1 = state(torch.float64, False)
        full = dict(body.named_parameters())
        for name, value in params.items():
            full[name].data.copy_(value.to(full[name].dtype))
        emb.weight.data.copy_((emb.weight.detach().double() @ r1.to(dev)).to(emb.weight.dtype))
        head.weight.data.copy_((head.weight.detach().double() @ r1.to(head.weight.device)).to(head.weight.dtype))
        clips = None
        if t.clip is not None:  # rounded so that memory, export and reload hold the same ratio
            clips = [[round(t.clip_ratio(i, s).item(), 4) for s in range(len(CLIP_SITES))] for i in range(len(mods))]
            for i, m in enumerate(mods):
                for k in _LINEARS:
                    setattr(m[k], LEARNED_CLIP, {"bits": c.bits, "symmetric": c.symmetric,
                                                 "clip_ratio": clips[i][_CLIP_SITE[k]]})
    seconds = time.perf_counter() - start
    if failed is not None:
        model.rotation_info = {"method": "ostquant", "failed_at_step": len(losses) + 1, "seed": c.seed}
        log.error("ostquant stopped at step %d of %d; the transforms learned so far are fused, so the model still "
                  "computes the full-precision function (rotated, like rotate's)", len(losses) + 1, c.steps)
        raise failed
    if c.qsur_samples:
        report["trained"] = _qsur_report(model, qsur_ids, linear_names)
    info = {
        "method": "ostquant", "r1": c.r1_init, "hidden_size": d, "r2": hd if c.rotate_ov else None,
        "r3": hd if c.r3 else None, "r4": inter, "online_o": n_heads * hd if c.online_o else None, "seed": c.seed,
        "untied_embeddings": untied,
        "folded_norms": 2 * len(blocks) + 1, "online": len(online_transforms(model)) + len(qk_rotations(model)),
        "smooth_qk": smooth_qk, "steps": c.steps, "loss_first": losses[0], "loss_last": losses[-1],
        "losses": losses, "seconds": round(seconds, 1), "qsur": report,
        "clip_ratios": None if clips is None else {"sites": list(CLIP_SITES), "per_block": clips},
    }
    means = {k: _qsur_means(v) for k, v in report.items()}
    model.rotation_info = {**{k: v for k, v in info.items() if k not in ("losses", "qsur", "clip_ratios")},
                           "qsur_mean": means}
    if clips is not None:
        flat = [r for row in clips for r in row]
        model.rotation_info["clip_mean"] = {s: round(sum(row[j] for row in clips) / len(clips), 4)
                                            for j, s in enumerate(CLIP_SITES)}
        log.info("ostquant: learned clip ratios in [%.3f, %.3f], mean per input %s", min(flat), max(flat),
                 model.rotation_info["clip_mean"])
    if report:
        log.info("ostquant: mean QSUR over the block inputs %s", means)
    log.info("ostquant: KL-Top %.4f -> %.4f over %d steps in %.0f s", losses[0], losses[-1], c.steps, seconds)
    return info


def _qsur_means(rows: list[dict]) -> dict[str, float]:
    """Mean QSUR over the blocks, per input kind (``qkv``, ``o``, ``gate_up``, ``down``) and over all (``all``)."""
    kinds: dict[str, list[float]] = {}
    for r in rows:
        kinds.setdefault(r["input"], []).append(r["qsur"])
    out = {k: round(sum(v) / len(v), 6) for k, v in kinds.items()}
    out["all"] = round(sum(r["qsur"] for r in rows) / len(rows), 6)
    return out


@torch.no_grad()
def _teacher_topk(model: nn.Module, ids: torch.Tensor, k: int, quiet: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k logits of the full-precision model: values float32 (S, L, k) and indices int64 (S, L, k)."""
    dev = model.get_input_embeddings().weight.device
    values, index = [], []
    vocab = model.get_output_embeddings().out_features
    if k > vocab:
        raise ValueError(f"ostquant.top_k={k} exceeds the vocabulary ({vocab}); use a smaller top_k")
    for row in progress(ids, "ostquant teacher", quiet=quiet):
        logits = model(row[None].to(dev), use_cache=False).logits[0].float()  # (L, V)
        if not torch.isfinite(logits).all():
            raise ValueError("ostquant: the full-precision model gives NaN/inf logits on the calibration data; "
                             "check the checkpoint and the calibration ids")
        v, i = logits.topk(k, dim=-1)
        values.append(v)
        index.append(i)
    return torch.stack(values), torch.stack(index)


def _forward(body: nn.Module, params: dict, r1: torch.Tensor, emb: nn.Embedding, head: nn.Linear,
             ids: torch.Tensor) -> torch.Tensor:
    """Logits (B, L, V) float32 of the transformed model: embed, rotate, blocks with ``params``, un-rotate, lm_head."""
    x = F.embedding(ids, emb.weight).float() @ r1  # (B, L, d)
    hidden = functional_call(body, params, args=(), kwargs={"inputs_embeds": x, "use_cache": False}).last_hidden_state
    return F.linear(hidden @ r1.T, head.weight.float(), None if head.bias is None else head.bias.float())


def _train(t: _Transforms, state, body, emb, head, samples, top_values, top_index, c: OSTQuantConfig,
           quiet: bool, losses: list[float]) -> None:
    """Adam on the transforms for ``c.steps`` steps of KL-Top; appends each step's loss to ``losses``."""
    groups = [{"params": [p for n, p in t.named_parameters() if "skew" in n], "lr": c.lr},
              {"params": list(t.log_scale.parameters()), "lr": c.lr_scale},
              {"params": [] if t.clip is None else [t.clip], "lr": c.lr_clip}]
    groups = [g for g in groups if g["params"]]
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / c.steps)))
    gen = torch.Generator().manual_seed(c.seed)
    order: list[int] = []
    dev = emb.weight.device
    log_every = max(1, c.steps // 20)
    bar = progress(range(c.steps), "ostquant", quiet=quiet)
    for step in bar:
        while len(order) < c.batch_size:
            order += torch.randperm(samples.shape[0], generator=gen).tolist()
        batch, order = order[: c.batch_size], order[c.batch_size:]
        params, r1 = state(torch.float32, True)
        logits = _forward(body, params, r1, emb, head, samples[batch].to(dev))
        loss = kl_top(logits, top_values[batch].to(dev), top_index[batch].to(dev), temperature=c.temperature)
        if not torch.isfinite(loss):
            raise ValueError(f"ostquant: the loss became {loss.item()} at step {step + 1}; lower lr / lr_scale")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(round(loss.item(), 6))
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
        if (step + 1) % log_every == 0 or step == 0:
            log.info("ostquant step %d/%d: KL-Top %.4f", step + 1, c.steps, losses[-1])


@torch.no_grad()
def _qsur_report(model: nn.Module, ids: torch.Tensor, linears: dict[str, tuple[int, str]],
                 body: tuple | None = None) -> list[dict]:
    """QSUR of the inputs of q_proj (= k, v), o_proj, up_proj (= gate) and down_proj in every block.

    With ``body = (body, params, r1, emb)`` the model runs with those
    transformed (unfused) parameters instead of its own.
    """
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(
        lambda mod, args, n=n: captured[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).float()))
        for n in linears]
    try:
        dev = model.get_input_embeddings().weight.device
        for row in ids:
            if body is None:
                model(row[None].to(dev), use_cache=False)
            else:
                b, params, r1, emb = body
                x = F.embedding(row[None].to(dev), emb.weight).float() @ r1
                functional_call(b, params, args=(), kwargs={"inputs_embeds": x, "use_cache": False})
    finally:
        for h in hooks:
            h.remove()
    kinds = {"q": "qkv", "o": "o", "up": "gate_up", "down": "down"}
    return [{"layer": i, "input": kinds[k], "qsur": round(qsur(torch.cat(captured[n])), 6)}
            for n, (i, k) in sorted(linears.items(), key=lambda kv: (kv[1][0], kv[1][1]))]


# ---------------------------------------------------------------- recipe pass


@register_pass
class OSTQuantPass(Pass):
    """Learn and fuse OSTQuant's transforms on the whole model, before the quantization passes.

    A model-level pass that needs calibration data: ``compressor.compress``
    gives it the calibration ids before the block pipeline. Follow it with a
    weight pass (rtn / gptq / adaround) and, for activations, ``quantize_activations``
    with the same settings it trained under.
    """

    name = "ostquant"
    config_cls = OSTQuantConfig
    model_level: ClassVar[bool] = True
    requires_calibration: ClassVar[bool] = True

    def apply(self, model: nn.Module, *, calibration_ids: Any = None, quiet: bool = False, **context) -> None:
        """Train and fuse in place; the result dict is kept in ``self.applied``."""
        if calibration_ids is None:
            raise ValueError("ostquant needs calibration data: pass calibration='sotu:1790-1999' (or token ids)")
        self.applied = ostquant_model(model, calibration_ids, self.config, quiet=quiet)

    def compress_block(self, block: nn.Module, prefix: str) -> None:
        raise ValueError("ostquant is a model-level pass: run the recipe through compressor.compress, which "
                         "trains it on the whole model before the block pipeline")

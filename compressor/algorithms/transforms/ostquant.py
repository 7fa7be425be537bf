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

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from compressor.algorithms.distill.losses import forward_kl
from compressor.algorithms.transforms.fusion import (
    fold_norm,
    fresh_decoder,
    r3_targets,
    rotation_matrix,
    submodule,
    untie_embeddings,
)
from compressor.algorithms.transforms.ost_block import (
    CLIP_FLOOR,
    CLIP_SITE,
    CLIP_SITES,
    InputQuant,
    Transforms,
    block_state,
    ste_weight,
)
from compressor.algorithms.transforms.qsur import qsur_means, qsur_report
from compressor.core.arch import (
    DecoderLayout,
    attention_implementation,
    attention_modules,
    head_counts,
    set_attention_implementation,
)
from compressor.core.fake_quant import (
    ACTIVATION_FORMATS,
    check_activation_format,
    check_bits,
    check_clip,
    check_group,
)
from compressor.core.passes import PassConfig
from compressor.core.progress import progress
from compressor.core.scheme import QuantScheme
from compressor.runtime.activations import (
    KV_CHILD,
    LEARNED_CLIP,
    KVQuantizer,
    QKRotation,
    attach_kv_quantizer,
    attach_qk_rotation,
    qk_rotations,
    unwrapped_attention,
    wrapped_attention,
)
from compressor.runtime.online import OnlineHadamard, attach_input_transform, online_transforms

__all__ = ["kl_top", "OSTQuantConfig", "ostquant_model"]

log = logging.getLogger(__name__)

_LINEARS = DecoderLayout.LINEARS


# ---------------------------------------------------------------- metrics and losses


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
        format: a float grid for the linear inputs during training instead of integers
            (``fp8``, ``fp8-block``, ``fp8-static``, ``mxfp4``, ``nvfp4``: the ``quantize_activations``
            format that follows; ``bits`` its width, symmetric, no clip learning). The static scales of
            ``nvfp4`` / ``fp8-static`` are not known while the transforms move, so training uses each
            batch's own largest |x| in their place. A float ``weight`` scheme (FP8, NVFP4, MXFP4) is
            trained on its float grid the same way (min-max scales, rounding straight-through).
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
    format: str | None = None
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
            check_bits(self.bits, "ostquant.bits")
        if self.learn_clip and self.bits is not None and self.clip_ratio < CLIP_FLOOR:
            raise ValueError(f"ostquant.clip_ratio={self.clip_ratio} is below the learned clip's floor {CLIP_FLOOR}: "
                             f"start learn_clip at a ratio in [{CLIP_FLOOR}, 1], or set learn_clip: false")
        check_clip(self.clip_ratio, "ostquant.clip_ratio")
        if self.kv_bits is not None:
            check_bits(self.kv_bits, "ostquant.kv_bits")
        if self.format is not None:
            check_activation_format(self.format, what="ostquant.format")
            want = ACTIVATION_FORMATS[self.format][0]
            if self.bits != want or not self.symmetric or self.clip_ratio != 1.0 or self.learn_clip:
                raise ValueError(f"ostquant.format={self.format!r} trains {want}-bit symmetric float inputs without "
                                 f"clipping: set bits: {want}, symmetric: true, clip_ratio: 1, learn_clip: false")
        if self.weight is not None and self.weight.is_float and self.range_grad:
            raise ValueError("ostquant.range_grad lets the gradient through integer min / max grids; a float weight "
                             "grid trains with straight-through rounding only: set range_grad: false")
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
    layout, blocks_name, blocks, emb, head = fresh_decoder(model, "ostquant")
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64 or ids.ndim != 2:
        raise ValueError("ostquant needs calibration token ids, an int64 (S, L) tensor")
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]
    if bad:
        raise ValueError(f"ostquant: {bad[0]} holds NaN/inf; the checkpoint is corrupt, reload or re-download it")
    config_ = model.config
    d = config_.hidden_size
    n_heads, n_kv, hd = head_counts(config_)
    body_name = getattr(model, "base_model_prefix", "model")
    body = getattr(model, body_name, None)
    if not isinstance(body, nn.Module) or not blocks_name.startswith(body_name + "."):
        raise ValueError(f"ostquant: {type(model).__name__} keeps its blocks at {blocks_name}, not under "
                         f"{body_name!r}; this layout is not supported")
    mods = []
    for i, block in enumerate(blocks):
        where = f"{blocks_name}.{i}"
        mods.append(layout.modules(block, where))
    m0 = mods[0]
    if m0["v"].out_features != n_kv * hd or m0["o"].in_features != n_heads * hd or hd % 2:
        raise ValueError(f"ostquant: v_proj/o_proj widths ({m0['v'].out_features}, {m0['o'].in_features}) do not match "
                         f"{n_kv} kv heads / {n_heads} heads of {hd}")
    inter = m0["down"].in_features
    smooth_qk = c.smooth_qk
    if smooth_qk and any(layout.has_qk_norm(b_) for b_ in blocks):
        log.info("ostquant: the attention normalizes queries and keys per head (q_norm/k_norm), which would undo a "
                 "query/key scaling; smooth_qk is skipped")
        smooth_qk = False
    # checks that can fail come before any weight changes
    r1_0 = rotation_matrix(c.r1_init, d, c.seed)  # (d, d) float64
    r2_0 = rotation_matrix(c.r1_init, hd, c.seed + 1) if c.rotate_ov else None
    OnlineHadamard(inter)
    if c.online_o:
        OnlineHadamard(n_heads * hd)
    attention = r3_targets(model, hd) if c.r3 else []
    if c.kv_bits is not None:
        kv_targets = [a for _, a in attention_modules(model)]
        if not kv_targets:
            raise ValueError("ostquant: kv_bits needs transformers attention modules; set kv_bits: null")
        for a in kv_targets:
            wrapped_attention(a, "quantize the KV cache during ostquant training")
            check_group(c.kv_group_size, hd)
    else:
        kv_targets = []
    samples = ids[: c.samples]
    start = time.perf_counter()
    report: dict[str, list] = {}
    qsur_ids = ids[: c.qsur_samples]
    linear_names = {f"{blocks_name}.{i}.{getattr(layout, k)}": (i, k) for i in range(len(blocks)) for k in ("q", "o", "up", "down")}
    if c.qsur_samples:
        report["original"] = qsur_report(model, qsur_ids, linear_names)

    # 1. teacher top-k on the untouched model
    top_values, top_index = _teacher_topk(model, samples, c.top_k, quiet)

    # 2. fold norms (function unchanged) and attach the fixed online transforms
    untied = untie_embeddings(model, emb, head)
    with torch.no_grad():
        for i, m in enumerate(mods):
            fold_norm(m["attn_norm"], [m["q"], m["k"], m["v"]], f"{blocks_name}.{i}.{layout.attn_norm}")
            fold_norm(m["mlp_norm"], [m["gate"], m["up"]], f"{blocks_name}.{i}.{layout.mlp_norm}")
        fold_norm(submodule(model, layout.final_norm, type(model).__name__), [head], layout.final_norm)
    for m in mods:
        attach_input_transform(m["down"], OnlineHadamard(inter).to(m["down"].weight.device))
        if c.online_o:
            attach_input_transform(m["o"], OnlineHadamard(m["o"].in_features).to(m["o"].weight.device))
    for attn in attention:
        attach_qk_rotation(attn, QKRotation(hd).to(next(attn.parameters()).device))
    dev = emb.weight.device
    t = Transforms(r1_0, r2_0, len(blocks), d, n_kv, hd, inter,
                    scales={"attn": c.smooth_norm, "ffn": c.smooth_norm, "ov": c.smooth_ov, "ud": c.smooth_up_down,
                            "qk": smooth_qk},
                    clip_init=float(c.clip_ratio) if c.learn_clip and c.bits is not None else None).to(dev)
    dims = (n_heads, n_kv, hd)
    prefix = {i: f"{blocks_name[len(body_name) + 1:]}.{i}." for i in range(len(blocks))}
    names = {k: getattr(layout, k) for k in DecoderLayout.BLOCK}

    def state(dtype: torch.dtype, quantize: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        r1, r2 = t.r1(dtype), t.r2(dtype)
        params = {}
        for i, m in enumerate(mods):
            for key, value in block_state(m, t, i, r1, None if r2 is None else r2[i], dims, dtype).items():
                k, attr = key.split(".")
                if quantize and c.weight is not None and attr == "weight" and k in _LINEARS:
                    value = ste_weight(value, c.weight, c.range_grad)
                params[f"{prefix[i]}{names[k]}.{attr}"] = value
        return params, r1

    if c.qsur_samples:
        with torch.no_grad():
            params, r1 = state(torch.float32, False)
            report["init"] = qsur_report(model, qsur_ids, linear_names, body=(body, params, r1, emb))

    # 3. train under fake quantization
    hooks = []
    losses: list[float] = []
    failed: BaseException | None = None
    frozen = [p for p in model.parameters() if p.requires_grad]
    for p in frozen:
        p.requires_grad_(False)
    impl = attention_implementation(model)
    try:
        if c.bits is not None:
            for i, m in enumerate(mods):
                for k in _LINEARS:
                    clip = None if t.clip is None else (lambda i=i, s=CLIP_SITE[k]: t.clip_ratio(i, s))
                    hooks.append(m[k].register_forward_pre_hook(
                        InputQuant(c.bits, c.symmetric, c.clip_ratio, c.range_grad, clip, fmt=c.format)))
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
            set_attention_implementation(model, unwrapped_attention(impl))
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
                                                 "clip_ratio": clips[i][CLIP_SITE[k]]})
    seconds = time.perf_counter() - start
    if failed is not None:
        model.rotation_info = {"method": "ostquant", "failed_at_step": len(losses) + 1, "seed": c.seed}
        log.error("ostquant stopped at step %d of %d; the transforms learned so far are fused, so the model still "
                  "computes the full-precision function (rotated, like rotate's)", len(losses) + 1, c.steps)
        raise failed
    if c.qsur_samples:
        report["trained"] = qsur_report(model, qsur_ids, linear_names)
    info = {
        "method": "ostquant", "r1": c.r1_init, "hidden_size": d, "r2": hd if c.rotate_ov else None,
        "r3": hd if c.r3 else None, "r4": inter, "online_o": n_heads * hd if c.online_o else None, "seed": c.seed,
        "untied_embeddings": untied,
        "folded_norms": 2 * len(blocks) + 1, "online": len(online_transforms(model)) + len(qk_rotations(model)),
        "smooth_qk": smooth_qk, "steps": c.steps, "loss_first": losses[0], "loss_last": losses[-1],
        "losses": losses, "seconds": round(seconds, 1), "qsur": report,
        "clip_ratios": None if clips is None else {"sites": list(CLIP_SITES), "per_block": clips},
    }
    means = {k: qsur_means(v) for k, v in report.items()}
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


def _train(t: Transforms, state, body, emb, head, samples, top_values, top_index, c: OSTQuantConfig,
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

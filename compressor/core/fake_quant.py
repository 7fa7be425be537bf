"""Fake quantization of activations at run time: per-token rows and per-head keys / values (dynamic ranges).

Every token gets its own scale (and zero point) from its own range, as in QuaRot
(arXiv 2404.00456, §3) and SpinQuant / OSTQuant; nothing is calibrated. The
grids, for ``b`` bits (``clip`` = ``clip_ratio``):

* symmetric: ``q ∈ [-2^(b-1), 2^(b-1) - 1]``, ``scale = clip * max|x| / (2^(b-1) - 1)``, ``x ≈ q * scale``;
* asymmetric: ``q ∈ [0, 2^b - 1]``, the range ``[min(x, 0), max(x, 0)] * clip``,
  ``scale = range / (2^b - 1)``, ``zp = round(-min / scale)``, ``x ≈ (q - zp) * scale``.

Values past the clipped range saturate at the grid edge; half-precision inputs
are quantized in float32 and cast back. The modules that apply these at run
time live in :mod:`compressor.runtime.activations`.
"""

from __future__ import annotations

import torch

from compressor.core import floats

__all__ = ["MAX_BITS", "check_bits", "check_clip", "check_group", "round_ste", "straight_through",
           "fake_quant_per_token", "fake_quant_per_head", "ACTIVATION_FORMATS", "check_activation_format",
           "activation_global_scale", "activation_static_scale", "activation_static_scales",
           "fake_quant_float_per_token"]

MAX_BITS = 16


def check_bits(bits: int, what: str = "bits") -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= MAX_BITS:
        raise ValueError(f"{what}={bits!r} is not supported: use an integer from 2 to {MAX_BITS} (8 or 4 usually)")


def check_clip(clip_ratio: float, what: str = "clip_ratio") -> None:
    if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, (int, float)) or not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"{what}={clip_ratio!r} is out of range: use a ratio in (0, 1], e.g. 1.0 (no clipping) or 0.9")


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward, identity gradient to ``x``."""
    return x + (torch.round(x) - x).detach()


def _fake_quant_rows(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float | torch.Tensor,
                     range_grad: bool = False) -> torch.Tensor:
    """Fake-quantize each row of x (..., K) over its last dim; float32/float64 in and out.

    With ``range_grad`` (and ``x.requires_grad``) only the rounding is
    straight-through: the gradient also flows through each row's scale, i.e.
    its min / max (LSQ-style), so training sees that a smaller range means a
    finer grid. Otherwise the result carries no gradient. ``clip_ratio`` may
    be a 0-d float tensor that requires grad (a learned clip, OSTQuant's
    ``learn_clip``); with ``range_grad`` it gets a gradient through the scale.
    """
    rnd = round_ste if range_grad and x.requires_grad else torch.round
    if symmetric:
        qmax = float((1 << (bits - 1)) - 1)
        qmin = -qmax - 1.0
        scale = x.abs().amax(dim=-1, keepdim=True) * clip_ratio / qmax  # (..., 1)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row stays zero
        return torch.clamp(rnd(x / scale), qmin, qmax) * scale
    qmax = float((1 << bits) - 1)
    lo = torch.clamp(x.amin(dim=-1, keepdim=True), max=0.0) * clip_ratio  # (..., 1), <= 0
    hi = torch.clamp(x.amax(dim=-1, keepdim=True), min=0.0) * clip_ratio  # (..., 1), >= 0
    scale = (hi - lo) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.round(-lo / scale)  # in [0, qmax]; no gradient
    return (torch.clamp(rnd(x / scale) + zp, 0.0, qmax) - zp) * scale


def fake_quant_per_token(
    x: torch.Tensor, bits: int, *, symmetric: bool = True, clip_ratio: float | torch.Tensor = 1.0,
    range_grad: bool = False
) -> torch.Tensor:
    """Quantize-dequantize every token of ``x`` on its own grid (dynamic per-token).

    Args:
        x: (..., K) float activations; each row over the last dim is a token.
        bits: 2-16.
        symmetric: signed grid ``[-2^(b-1), 2^(b-1) - 1]`` without zero point,
            or unsigned ``[0, 2^b - 1]`` with an integer zero point.
        clip_ratio: in (0, 1]; the token's range is shrunk by it and values
            beyond saturate. May be a 0-d float tensor, e.g. a learned ratio
            that requires grad (OSTQuant's ``learn_clip``; with ``range_grad``
            it gets a gradient through the scale); its value is the caller's
            to keep in (0, 1], since checking it would synchronize the device.
        range_grad: when ``x`` requires grad, the result does too: the
            rounding is straight-through and the gradient also reaches each
            token's min / max through its scale (for training transforms that
            shrink the range; :mod:`compressor.algorithms.transforms.ostquant`). False:
            the result is constant (wrap it in a straight-through estimator).

    Returns:
        (..., K), same dtype as ``x``; each token holds at most ``2^bits``
        distinct values. Half precision is quantized in float32.

    Raises:
        ValueError: bad ``bits`` / ``clip_ratio`` or a non-float ``x``.
    """
    check_bits(bits)
    if isinstance(clip_ratio, torch.Tensor):
        if clip_ratio.dim() != 0 or not clip_ratio.is_floating_point():
            raise ValueError(f"clip_ratio as a tensor must be a 0-d float tensor, got shape "
                             f"{tuple(clip_ratio.shape)} {clip_ratio.dtype}")
    else:
        check_clip(clip_ratio)
        clip_ratio = float(clip_ratio)
    if not x.is_floating_point():
        raise ValueError(f"activation fake quantization needs a float tensor, got {x.dtype}")
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return _fake_quant_rows(work, bits, symmetric, clip_ratio, range_grad).to(x.dtype)


def fake_quant_per_head(
    x: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = False,
    group_size: int | None = None,
    clip_ratio: float = 1.0,
    range_grad: bool = False,
) -> torch.Tensor:
    """Per-head, per-token fake quantization of keys or values (QuaRot §4 / OSTQuant KV cache).

    Args:
        x: (B, H, T, D) keys or values (``H`` kv heads, ``D`` head_dim).
        bits: 2-16.
        symmetric: as :func:`fake_quant_per_token` (KV caches are usually asymmetric).
        group_size: columns of head_dim sharing one scale; None means all of
            head_dim (one scale per batch, head and token). Must divide D.
        clip_ratio: in (0, 1].
        range_grad: as :func:`fake_quant_per_token`.

    Returns:
        (B, H, T, D), same dtype; one scale per (b, h, t, group).

    Raises:
        ValueError: ``x`` is not 4-D, or ``group_size`` does not divide D.
    """
    if x.ndim != 4:
        raise ValueError(f"per-head quantization expects (batch, heads, tokens, head_dim), got shape {tuple(x.shape)}")
    d = x.shape[-1]
    g = check_group(group_size, d)
    grouped = x.reshape(*x.shape[:-1], d // g, g)  # (B, H, T, D/g, g)
    out = fake_quant_per_token(grouped, bits, symmetric=symmetric, clip_ratio=clip_ratio, range_grad=range_grad)
    return out.reshape(x.shape)


def check_group(group_size: int | None, head_dim: int) -> int:
    """The group width for ``head_dim``; raises naming the valid divisors."""
    if group_size is None:
        return head_dim
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or head_dim % group_size:
        divisors = [k for k in range(1, head_dim + 1) if head_dim % k == 0]
        raise ValueError(f"kv_group_size={group_size!r} does not divide head_dim={head_dim}: use one of {divisors} "
                         "or null (the whole head)")
    return group_size


def straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` in the forward, identity gradient to ``x`` (straight-through estimator) when training through it."""
    return x + (q - x).detach() if x.requires_grad else q


# ---------------------------------------------------------------- float activation formats

# name -> (element bits, group size along K or None for the whole token, scale format)
ACTIVATION_FORMATS: dict[str, tuple[int, int | None, str]] = {
    "fp8": (8, None, "float"),  # E4M3 per token, scale = max|x| / 448 (compressed-tensors FP8_DYNAMIC)
    "fp8-block": (8, 128, "float"),  # E4M3 per 128 features of a token (compressed-tensors FP8_BLOCK's inputs)
    "fp8-static": (8, None, "static"),  # E4M3, one static scale per layer from calibration (compressed-tensors FP8)
    "mxfp4": (4, 32, "e8m0"),  # E2M1 per 32, power-of-two scales (OCP MX; compressed-tensors MXFP4)
    "nvfp4": (4, 16, "e4m3"),  # E2M1 per 16, E4M3 scales under a static per-tensor global scale (NVFP4)
}


def check_activation_format(fmt: str, width: int | None = None, what: str = "format") -> None:
    """Raise unless ``fmt`` is a key of :data:`ACTIVATION_FORMATS` (and its group divides ``width``)."""
    if fmt not in ACTIVATION_FORMATS:
        raise ValueError(f"{what}={fmt!r}: use one of {sorted(ACTIVATION_FORMATS)} (or null for an integer grid)")
    group = ACTIVATION_FORMATS[fmt][1]
    if width is not None and group is not None and width % group:
        raise ValueError(f"{fmt} activations come in groups of {group}, which do not divide this input's {width} "
                         "features")


def activation_global_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """NVFP4's per-tensor input global scale ``448 * 6 / amax`` from the largest |x| seen in calibration, float32
    (1,) (compressed-tensors' ``input_global_scale``); 1 for an all-zero input."""
    a = float(amax)
    return torch.tensor([floats.E4M3.max * floats.E2M1.max / a if a > 0 else 1.0], dtype=torch.float32)


def activation_static_scale(amax: torch.Tensor | float) -> torch.Tensor:
    """FP8's static per-tensor input scale ``amax / 448`` from the largest |x| seen in calibration, float32 (1,)
    (compressed-tensors' ``input_scale``); 1 for an all-zero input."""
    a = float(amax)
    return torch.tensor([a / floats.E4M3.max if a > 0 else 1.0], dtype=torch.float32)


def activation_static_scales(fmt: str, amax: torch.Tensor | float) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``(global_scale, static_scale)`` the float input format ``fmt`` takes from the largest |x| ``amax``: NVFP4's
    global scale (:func:`activation_global_scale`), FP8-static's input scale (:func:`activation_static_scale`),
    None for the scales a format computes per token; the two arguments of :func:`fake_quant_float_per_token`
    after ``fmt``."""
    scale_format = ACTIVATION_FORMATS[fmt][2]
    return (activation_global_scale(amax) if scale_format == "e4m3" else None,
            activation_static_scale(amax) if scale_format == "static" else None)


def fake_quant_float_per_token(x: torch.Tensor, fmt: str, global_scale: torch.Tensor | None = None,
                               static_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize-dequantize activations on a float grid with dynamic per-token (per-group) scales.

    Args:
        x: (..., K) float; every row over the last dim is a token.
        fmt: ``"fp8"`` (E4M3, one scale per token, ``max|x| / 448``), ``"fp8-block"`` (the same per 128
            features), ``"mxfp4"`` (E2M1 per 32 features,
            power-of-two scales of :func:`compressor.core.floats.mx_scale`) or ``"nvfp4"`` (E2M1 per 16,
            scales ``round_e4m3(max|x_g| / 6 * gs) / gs`` under the static ``global_scale`` gs).
        global_scale: NVFP4's (1,) float32 input global scale (:func:`activation_global_scale`); required there.
        static_scale: ``fp8-static``'s (1,) float32 input scale (:func:`activation_static_scale`): every token is
            divided by it and rounded to E4M3, saturating at +-448; required there.

    Returns:
        (..., K), same dtype as ``x`` (computed in float32); constant (wrap it in a straight-through estimator).

    Raises:
        ValueError: an unknown format, a group that does not divide K, or NVFP4 without its global scale.
    """
    check_activation_format(fmt, x.shape[-1])
    bits, group, scale_format = ACTIVATION_FORMATS[fmt]
    element = floats.E4M3 if bits == 8 else floats.E2M1
    work = x.detach().float()
    shape = work.shape
    g = group or shape[-1]
    xg = work.reshape(*shape[:-1], shape[-1] // g, g)  # (..., G, g)
    amax = xg.abs().amax(dim=-1, keepdim=True)  # (..., G, 1)
    if scale_format == "e8m0":
        scale = floats.mx_scale(amax, element)
    elif scale_format == "static":
        if static_scale is None:
            raise ValueError("fp8-static activations need their static input scale (calibrate the pass on data)")
        scale = static_scale.to(work.device, torch.float32).reshape(())
    elif scale_format == "e4m3":
        if global_scale is None:
            raise ValueError("nvfp4 activations need their static global scale (calibrate the pass on data)")
        gs = global_scale.to(work.device, torch.float32).reshape(())
        scale = floats.round_scale_e4m3(amax / element.max * gs) / gs
    else:
        scale = amax / element.max
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    q = floats.round_to_grid(element, xg / scale) * scale
    return q.reshape(shape).to(x.dtype)

"""Weight quantization schemes: parameters, quantize, dequantize, fake-quant.

Pure tensor functions. Conventions follow compressed-tensors so that exports
decompress bit-exactly there:

* integer codes are signed, ``q ∈ [-2^(b-1), 2^(b-1) - 1]``;
* symmetric: ``scale = absmax / ((qmax - qmin) / 2)``, ``w ≈ q * scale``;
* asymmetric: the range is widened to include 0,
  ``scale = (max - min) / (qmax - qmin)``, ``zp = round(qmin - min / scale)``,
  ``w ≈ (q - zp) * scale`` with an integer zero point;
* ``zero_point="float"`` is the affine "min-offset" grid of GGUF Q4_1 / HQQ,
  ``w ≈ (q - qmin) * scale + offset`` with a float offset (the group minimum).
  It is not expressible in compressed-tensors and cannot be exported.

Float element grids (``type="float"``, :mod:`compressor.core.floats`): the codes are FP8 E4M3 (8 bits) or
FP4 E2M1 (4 bits) values, always symmetric, ``w ≈ v * scale`` with the scale stored as

* ``scale_format="float"``: the weight's dtype (FP8 per channel or group, compressed-tensors ``float-quantized``);
* ``"e4m3"``: NVFP4 (group 16): an E4M3 scale per group and one float32 ``global_scale`` per matrix,
  ``w ≈ v * (scale / global_scale)`` (compressed-tensors ``nvfp4-pack-quantized``);
* ``"e8m0"``: MXFP4 (group 32): a power-of-two scale per group (``mxfp4-pack-quantized``).

:func:`quantize` returns their storage codes as int8 (the E4M3 byte, or the E2M1 nibble), so code tensors are
int8 for every scheme.

Groups run along the input (last) dimension. When ``group_size`` does not
divide the width the last group is ragged (shorter), as in compressed-tensors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

import torch

from compressor.core import floats

__all__ = [
    "QuantScheme",
    "QParams",
    "num_groups",
    "group_index",
    "compute_qparams",
    "quantize",
    "dequantize",
    "fake_quant",
    "grouped",
    "params_from_range",
    "global_scale",
    "float_params",
    "cast_params",
    "shared_global_scales",
    "NVFP4_GROUP",
    "MXFP4_GROUP",
    "block_rows_max",
]

_OBSERVERS = ("minmax", "mse")
_ZERO_POINTS = ("int", "float")
_TYPES = ("int", "float")
_SCALE_FORMATS = ("float", "e4m3", "e8m0")
NVFP4_GROUP, MXFP4_GROUP = 16, 32


@dataclass(frozen=True, kw_only=True)
class QuantScheme:
    """How one weight matrix is quantized.

    Attributes:
        bits: bits per weight, 2-8.
        group_size: columns per quantization group along the input dimension,
            or -1 for one group per output channel. A size that does not divide
            the width leaves a shorter last group.
        symmetric: symmetric (no zero point) or asymmetric.
        observer: ``"minmax"`` or ``"mse"`` (search a clipping ratio per group
            that minimises ``sum |w - q(w)|^mse_norm``).
        zero_point: ``"int"`` (compressed-tensors, exportable) or ``"float"``
            (GGUF-style min offset; in-memory only). Ignored when symmetric.
        mse_grid: number of clipping ratios tried by the MSE observer.
        mse_max_shrink: the smallest ratio tried is ``1 - mse_max_shrink``.
        mse_max_grow: float grids only: the MSE observer also tries ``mse_grid`` ratios above 1, up to
            ``1 + mse_max_grow``, where a group's largest |w| falls below the top of the grid. At 0.5 an
            NVFP4 group can map its largest weight to 4 instead of 6, so the values near it round on the grid's
            finer steps ("Four Over Six", Cook et al., arXiv 2512.02010). 0 (the default): shrink only.
        mse_norm: exponent of the MSE observer's error.
        type: ``"int"`` or ``"float"`` (FP8 E4M3 for 8 bits, FP4 E2M1 for 4; symmetric only).
        scale_format: how scales are stored: ``"float"`` (the weight's dtype), ``"e4m3"`` (NVFP4: E4M3
            group scales under a float32 global scale) or ``"e8m0"`` (MXFP4: powers of two). Float types only.
        block_rows: FP8 block weights (DeepSeek-V3's 128 x 128): each scale covers ``block_rows`` output rows
            of a ``group_size``-column group. In memory the scales stay (N, G), equal within a block of
            rows; the export stores one per block. -1 with ``group_size: -1``: one scale for the whole
            matrix (per-tensor FP8, compressed-tensors' ``tensor`` strategy). None: one scale per row and group.
    """

    bits: int = 4
    group_size: int = 128
    symmetric: bool = False
    observer: str = "minmax"
    zero_point: str = "int"
    mse_grid: int = 100
    mse_max_shrink: float = 0.8
    mse_max_grow: float = 0.0
    mse_norm: float = 2.4
    type: str = "int"
    scale_format: str = "float"
    block_rows: int | None = None

    def __post_init__(self) -> None:
        if self.block_rows is not None:
            if isinstance(self.block_rows, bool) or not isinstance(self.block_rows, int) or \
                    (self.block_rows < 1 and self.block_rows != -1):
                raise ValueError(f"block_rows={self.block_rows!r}: use a positive number of rows, e.g. 128, or -1 "
                                 "(with group_size -1) for one scale per tensor")
            if self.block_rows == -1 and self.group_size != -1:
                raise ValueError("block_rows=-1 (one scale per tensor) needs group_size: -1; for blocks of columns "
                                 "give a number of rows, e.g. block_rows 128, group_size 128")
            if not (self.type == "float" and self.bits == 8 and self.scale_format == "float"
                    and self.observer == "minmax"):
                raise ValueError("block_rows applies to FP8 weights with float scales and the minmax observer "
                                 "(e.g. type float, bits 8, group_size 128, block_rows 128)")
        if self.type not in _TYPES:
            raise ValueError(f"type={self.type!r} is unknown: use one of {_TYPES}")
        if self.scale_format not in _SCALE_FORMATS:
            raise ValueError(f"scale_format={self.scale_format!r} is unknown: use one of {_SCALE_FORMATS}")
        if self.type == "float":
            floats.element_format(self.bits)  # 8 or 4
            if not self.symmetric:
                raise ValueError("float weight grids are symmetric: set symmetric: true")
        elif self.scale_format != "float":
            raise ValueError(f"scale_format={self.scale_format!r} applies to float weights: set type: float "
                             "(e.g. bits 4, group_size 16, scale_format e4m3 for NVFP4)")
        if not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
            raise ValueError(f"bits={self.bits!r} is not supported: use an integer from 2 to 8")
        if not isinstance(self.group_size, int) or (self.group_size != -1 and self.group_size < 1):
            raise ValueError(
                f"group_size={self.group_size!r} is invalid: use a positive group size "
                "(e.g. 32, 64, 128) or -1 for per-channel"
            )
        if self.observer not in _OBSERVERS:
            raise ValueError(f"observer={self.observer!r} is unknown: use one of {_OBSERVERS}")
        if self.zero_point not in _ZERO_POINTS:
            raise ValueError(f"zero_point={self.zero_point!r} is unknown: use one of {_ZERO_POINTS}")
        if self.mse_grid < 1 or not 0.0 <= self.mse_max_shrink < 1.0 or self.mse_norm <= 0:
            raise ValueError(
                "MSE observer settings out of range: need mse_grid >= 1, "
                "0 <= mse_max_shrink < 1 and mse_norm > 0"
            )
        if isinstance(self.mse_max_grow, bool) or not isinstance(self.mse_max_grow, (int, float)) or \
                not 0.0 <= self.mse_max_grow <= 1.0:
            raise ValueError(f"mse_max_grow={self.mse_max_grow!r}: use a ratio in [0, 1], e.g. 0.5")
        if self.mse_max_grow and not (self.type == "float" and self.observer == "mse"):
            raise ValueError("mse_max_grow applies to the MSE observer on float grids (type: float, observer: mse); "
                             "an integer grid already spans each group's range")

    @property
    def per_tensor(self) -> bool:
        """One scale for the whole matrix (``block_rows: -1``)."""
        return self.block_rows == -1

    def rows_per_scale(self, out_features: int) -> int:
        """Output rows one stored scale covers: 1, ``block_rows``, or all ``out_features`` (per tensor)."""
        return out_features if self.per_tensor else (self.block_rows or 1)

    def scale_rows(self, out_features: int) -> int:
        """Rows of the stored scale tensor: N, ceil(N / block_rows), or 1 (per tensor)."""
        return -(-out_features // self.rows_per_scale(out_features))

    @property
    def is_float(self) -> bool:
        """Whether the codes are float values (FP8 / FP4) rather than integers."""
        return self.type == "float"

    @property
    def element(self) -> floats.FloatFormat:
        """The float element format (E4M3 or E2M1) of a float scheme."""
        if not self.is_float:
            raise ValueError(f"{self.describe()} has integer codes, not a float element format")
        return floats.element_format(self.bits)

    @property
    def qmin(self) -> int:
        self._integer_only("qmin")
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        self._integer_only("qmax")
        return (1 << (self.bits - 1)) - 1

    def _integer_only(self, what: str) -> None:
        if self.is_float:
            raise ValueError(f"{what} is defined for integer grids; {self.describe()} is a float grid "
                             "(this algorithm does not support float formats yet: use rtn or gptq)")

    @property
    def float_zero_point(self) -> bool:
        return not self.symmetric and self.zero_point == "float"

    def group_width(self, in_features: int) -> int:
        """Columns per group for a matrix with ``in_features`` columns."""
        if self.group_size == -1:
            return in_features
        if self.group_size > in_features:
            raise ValueError(
                f"group_size={self.group_size} exceeds in_features={in_features}: "
                f"use a group size <= {in_features} or -1 (per-channel)"
            )
        return self.group_size

    def bits_per_weight(self, in_features: int, scale_bits: int = 16) -> float:
        """Storage bits per weight including scales (and zero points)."""
        groups = num_groups(in_features, self.group_width(in_features))
        if self.scale_format != "float":
            scale_bits = 8
        extra = scale_bits + (0 if self.symmetric else self.bits)
        if self.per_tensor:  # one scale over N x K weights: a few bits per million, counted as none
            return float(self.bits)
        return self.bits + groups * extra / in_features / (self.block_rows or 1)

    def to_dict(self) -> dict:
        # options at their "off" value stay out, so records written before they existed read the same
        return {f.name: getattr(self, f.name) for f in fields(self)
                if not (f.name == "block_rows" and self.block_rows is None)
                and not (f.name == "mse_max_grow" and not self.mse_max_grow)}

    def describe(self) -> str:
        g = "per-channel" if self.group_size == -1 else f"g{self.group_size}"
        if self.per_tensor:
            g = "per-tensor"
        elif self.block_rows is not None:
            g = f"block {self.block_rows}x" + ("K" if self.group_size == -1 else f"{self.group_size}")
        if self.is_float:
            name = {"e4m3": "NVFP4" if self.bits == 4 else "FP8", "e8m0": "MXFP4" if self.bits == 4 else "MXFP8"}
            elem = self.element.name.upper()
            scales = "" if self.scale_format == "float" else f" {self.scale_format.upper()} scales"
            prefix = name.get(self.scale_format, "FP8" if self.bits == 8 else "FP4")
            return f"{prefix} ({elem} {g}{scales})" + (" mse" if self.observer == "mse" else "")
        kind = "sym" if self.symmetric else ("asym-float-zp" if self.float_zero_point else "asym")
        return f"W{self.bits} {g} {kind}" + (" mse" if self.observer == "mse" else "")


@dataclass(frozen=True)
class QParams:
    """Quantization parameters of one matrix.

    Attributes:
        scale: (N, G) in the weight's float dtype (float32 holding E4M3 or power-of-two values for
            ``scale_format`` e4m3 / e8m0).
        zero_point: (N, G) integer-valued, same dtype as ``scale`` (asymmetric
            int scheme), a float offset (``zero_point="float"``), or None.
        global_scale: float32 (1,) for ``scale_format="e4m3"`` (NVFP4): the effective scale is
            ``scale / global_scale``; None otherwise.
    """

    scale: torch.Tensor
    zero_point: torch.Tensor | None
    global_scale: torch.Tensor | None = None

    def effective_scale(self) -> torch.Tensor:
        """(N, G) multiplier of the codes' values: ``scale``, or ``scale / global_scale`` (float32) for NVFP4."""
        if self.global_scale is None:
            return self.scale
        return self.scale.float() / self.global_scale.float()


def num_groups(in_features: int, group_width: int) -> int:
    """Number of groups along a row of ``in_features`` (last one may be ragged)."""
    return math.ceil(in_features / group_width)


def group_index(in_features: int, group_width: int, device=None) -> torch.Tensor:
    """Group of each input column: int64 (K,) with values in [0, G)."""
    return torch.arange(in_features, device=device) // group_width


def _check_weight(w: torch.Tensor) -> None:
    if w.ndim != 2:
        raise ValueError(f"expected a 2-D weight (out_features, in_features), got shape {tuple(w.shape)}")
    if not w.is_floating_point():
        raise ValueError(f"expected a floating-point weight, got {w.dtype}")
    if not torch.isfinite(w).all():
        bad = (~torch.isfinite(w)).sum().item()
        raise ValueError(
            f"weight has {bad} NaN/inf entries: the checkpoint is corrupt or was "
            "produced by a diverged run; fix or reload the weights before quantizing"
        )


def grouped(w: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad (N, K) to (N, G, width) by repeating each row's last column; mask (G, width)."""
    n, k = w.shape
    g = num_groups(k, width)
    pad = g * width - k
    if pad:
        w = torch.cat([w, w[:, -1:].expand(n, pad)], dim=1)
    valid = torch.ones(g * width, dtype=torch.bool, device=w.device)
    if pad:
        valid[k:] = False
    return w.view(n, g, width), valid.view(g, width)


def params_from_range(lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme) -> QParams:
    """Scale and zero point from per-group ranges lo <= hi, both (N, G)."""
    eps = torch.finfo(lo.dtype).eps
    span = float(scheme.qmax - scheme.qmin)
    if scheme.symmetric:
        absmax = torch.maximum(lo.abs(), hi.abs())
        scale = absmax / (span / 2)
        return QParams(torch.where(scale == 0, torch.full_like(scale, eps), scale), None)
    if scheme.float_zero_point:
        scale = (hi - lo) / span
        return QParams(torch.where(scale == 0, torch.full_like(scale, eps), scale), lo.clone())
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    scale = (hi - lo) / span
    scale = torch.where(scale == 0, torch.full_like(scale, eps), scale)
    zp = torch.clamp(torch.round(scheme.qmin - lo / scale), scheme.qmin, scheme.qmax)
    return QParams(scale, zp)


def _expand(t: torch.Tensor, k: int, width: int, g_idx: torch.Tensor | None) -> torch.Tensor:
    """(N, G) per-group tensor → (N, K) per-column."""
    idx = g_idx if g_idx is not None else group_index(k, width, t.device)
    return t[:, idx.to(t.device).long()]


def quantize(
    w: torch.Tensor, qp: QParams, scheme: QuantScheme, g_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """Integer codes of ``w``.

    Args:
        w: (N, K) float weight.
        qp: parameters from :func:`compute_qparams` (scale (N, G)).
        scheme: the scheme.
        g_idx: optional (K,) group of each column (activation order); default
            ``arange(K) // group_width``.

    Returns:
        (N, K) int8 codes in ``[scheme.qmin, scheme.qmax]``; for float schemes the storage codes of the
        nearest grid values (ties to even, saturating), see :mod:`compressor.core.floats`.
    """
    k = w.shape[1]
    width = scheme.group_width(k)
    if scheme.is_float:
        eff = _expand(qp.effective_scale(), k, width, g_idx)
        eff = eff.to(w.dtype) if qp.global_scale is None and scheme.scale_format == "float" else eff.float()
        return floats.encode(scheme.element, floats.round_to_grid(scheme.element, w.to(eff.dtype) / eff))
    scale = _expand(qp.scale, k, width, g_idx).to(w.dtype)
    if scheme.float_zero_point:
        off = _expand(qp.zero_point, k, width, g_idx).to(w.dtype)
        q = torch.round((w - off) / scale) + scheme.qmin
    else:
        q = w / scale
        if qp.zero_point is not None:
            q = q + _expand(qp.zero_point, k, width, g_idx).to(w.dtype)
        q = torch.round(q)
    return torch.clamp(q, scheme.qmin, scheme.qmax).to(torch.int8)


def dequantize(
    q: torch.Tensor, qp: QParams, scheme: QuantScheme, g_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """Float weight from integer codes: (N, K) int → (N, K) in ``qp.scale.dtype``.

    Same operation order as compressed-tensors: ``(q - zp) * scale`` in the
    scale's dtype; float codes: ``value * (scale / global_scale)`` in float32 for NVFP4.
    """
    k = q.shape[1]
    width = scheme.group_width(k)
    if scheme.is_float:
        eff = _expand(qp.effective_scale(), k, width, g_idx)
        return floats.decode(scheme.element, q, eff.dtype) * eff
    scale = _expand(qp.scale, k, width, g_idx)
    w = q.to(scale.dtype)
    if scheme.float_zero_point:
        return (w - scheme.qmin) * scale + _expand(qp.zero_point, k, width, g_idx)
    if qp.zero_point is not None:
        w = w - _expand(qp.zero_point, k, width, g_idx).to(scale.dtype)
    return w * scale


def fake_quant(
    w: torch.Tensor, qp: QParams, scheme: QuantScheme, g_idx: torch.Tensor | None = None
) -> torch.Tensor:
    """Quantize then dequantize: (N, K) float → (N, K) float on the grid."""
    return dequantize(quantize(w, qp, scheme, g_idx), qp, scheme, g_idx).to(w.dtype)


def compute_qparams(w: torch.Tensor, scheme: QuantScheme, *, gscale: torch.Tensor | None = None) -> QParams:
    """Per-group scale and zero point of a weight matrix.

    Args:
        w: (N, K) float weight, finite.
        scheme: the scheme; ``observer="mse"`` searches a shrink ratio per group.
        gscale: NVFP4's global scale to use instead of ``w``'s own (a slice of a larger matrix).

    Returns:
        :class:`QParams` with scale and zero point of shape (N, G),
        ``G = ceil(K / group_width)``, in ``w.dtype`` (float32 for E4M3 / E8M0 scales, with NVFP4's
        global scale).
    """
    _check_weight(w)
    width = scheme.group_width(w.shape[1])
    wg, valid = grouped(w, width)  # (N, G, W), (G, W)
    lo, hi = wg.amin(dim=2), wg.amax(dim=2)  # (N, G)
    if scheme.is_float:
        amax = torch.maximum(lo.abs(), hi.abs())
        if scheme.block_rows is not None:  # one scale per block of rows: its largest row's
            amax = block_rows_max(amax, scheme.rows_per_scale(w.shape[0]))
        gs = global_scale(w, scheme) if gscale is None else gscale
        if scheme.observer == "minmax":
            return float_params(amax, scheme, gs)
        return _mse_search_float(wg, valid, amax, scheme, gs)
    if scheme.observer == "minmax":
        return params_from_range(lo, hi, scheme)
    return _mse_search(wg, valid, lo, hi, scheme)


def block_rows_max(values: torch.Tensor, rows: int) -> torch.Tensor:
    """(N, G) → (N, G): each row's value replaced by the maximum over its block of ``rows`` rows (the last block
    may be shorter)."""
    n, g = values.shape
    pad = -n % rows
    padded = torch.cat([values, values.new_full((pad, g), float("-inf"))]) if pad else values
    best = padded.reshape(-1, rows, g).amax(dim=1)  # (ceil(N / rows), G)
    return best.repeat_interleave(rows, dim=0)[:n]


def _mse_search(
    wg: torch.Tensor, valid: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, scheme: QuantScheme
) -> QParams:
    """Grid search over shrink ratios p: range (p*lo, p*hi), keep the best per group."""
    best = params_from_range(lo, hi, scheme)
    best_err = torch.full_like(lo, float("inf"))
    mask = valid.to(wg.dtype)  # (G, W)
    for i in range(scheme.mse_grid):
        p = 1.0 - scheme.mse_max_shrink * i / scheme.mse_grid
        qp = params_from_range(lo * p, hi * p, scheme)
        err = _group_error(wg, qp, scheme, mask)  # (N, G)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        zp = None
        if best.zero_point is not None:
            zp = torch.where(better, qp.zero_point, best.zero_point)
        best = QParams(torch.where(better, qp.scale, best.scale), zp)
    return best


def _group_error(wg: torch.Tensor, qp: QParams, scheme: QuantScheme, mask: torch.Tensor) -> torch.Tensor:
    """sum over a group of |w - fq(w)|^norm for grouped weights (N, G, W) → (N, G)."""
    scale = qp.scale.unsqueeze(-1)
    if scheme.float_zero_point:
        off = qp.zero_point.unsqueeze(-1)
        q = torch.clamp(torch.round((wg - off) / scale) + scheme.qmin, scheme.qmin, scheme.qmax)
        deq = (q - scheme.qmin) * scale + off
    else:
        zp = qp.zero_point.unsqueeze(-1) if qp.zero_point is not None else 0.0
        q = torch.clamp(torch.round(wg / scale + zp), scheme.qmin, scheme.qmax)
        deq = (q - zp) * scale
    return ((wg - deq).abs().pow(scheme.mse_norm) * mask).sum(dim=2)


def global_scale(w: torch.Tensor, scheme: QuantScheme) -> torch.Tensor | None:
    """NVFP4's per-matrix float32 (1,) global scale ``448 * 6 / max|w|`` (so the largest group scale fills E4M3's
    range), or None for schemes without one; 1 for an all-zero matrix."""
    if scheme.scale_format != "e4m3":
        return None
    amax = w.detach().abs().max().float()
    top = floats.E4M3.max * scheme.element.max
    gs = top / amax if float(amax) > 0 else torch.tensor(1.0)
    return gs.reshape(1).to(torch.float32)


def float_params(amax: torch.Tensor, scheme: QuantScheme, gscale: torch.Tensor | None = None) -> QParams:
    """Scales of a float scheme from per-group maxima of |w|.

    Args:
        amax: (N, G) float, >= 0.
        scheme: a float scheme.
        gscale: NVFP4's global scale (:func:`global_scale`); required for ``scale_format="e4m3"``.

    Returns:
        ``float``: ``amax / elem_max`` in ``amax.dtype``; ``e4m3``: E4M3-rounded ``amax / 6 * global_scale``
        (float32) with the global scale; ``e8m0``: :func:`compressor.core.floats.mx_scale` (float32).
    """
    fmt = scheme.element
    if scheme.scale_format == "e8m0":
        return QParams(floats.mx_scale(amax, fmt), None)
    if scheme.scale_format == "e4m3":
        if gscale is None:
            raise ValueError("E4M3 group scales need the matrix's global scale")
        return QParams(floats.round_scale_e4m3(amax.float() / fmt.max * gscale), None, gscale)
    scale = amax / fmt.max
    eps = torch.finfo(scale.dtype).eps
    return QParams(torch.where(scale == 0, torch.full_like(scale, eps), scale), None)


def _mse_search_float(wg: torch.Tensor, valid: torch.Tensor, amax: torch.Tensor, scheme: QuantScheme,
                      gscale: torch.Tensor | None) -> QParams:
    """Ratio search for float grids: each group keeps the scale (as the format stores it) whose
    ``sum |w - fq(w)|^norm`` is lowest among ``amax`` times ``1 - mse_max_shrink * i / mse_grid``
    (i < mse_grid) and, with ``mse_max_grow``, ``1 + mse_max_grow * i / mse_grid`` (1 <= i <= mse_grid); the
    global scale stays that of the whole matrix."""
    best = float_params(amax, scheme, gscale)
    best_err = _float_group_error(wg, best, scheme, valid.to(wg.dtype))
    ratios = [1.0 - scheme.mse_max_shrink * i / scheme.mse_grid for i in range(1, scheme.mse_grid)]
    if scheme.mse_max_grow:
        ratios += [1.0 + scheme.mse_max_grow * i / scheme.mse_grid for i in range(1, scheme.mse_grid + 1)]
    for p in ratios:
        qp = float_params(amax * p, scheme, gscale)
        err = _float_group_error(wg, qp, scheme, valid.to(wg.dtype))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = QParams(torch.where(better, qp.scale, best.scale), None, gscale)
    return best


def _float_group_error(wg: torch.Tensor, qp: QParams, scheme: QuantScheme, mask: torch.Tensor) -> torch.Tensor:
    """sum over a group of |w - fq(w)|^norm for grouped weights (N, G, W) on a float grid → (N, G)."""
    eff = qp.effective_scale().unsqueeze(-1).to(torch.float32)
    w = wg.float()
    deq = floats.round_to_grid(scheme.element, w / eff) * eff
    return ((w - deq).abs().pow(scheme.mse_norm) * mask).sum(dim=2)


def cast_params(qp: QParams, scheme: QuantScheme, dtype: torch.dtype) -> QParams:
    """``qp`` with scale and zero point in ``dtype``; E4M3 / E8M0 scales and the global scale stay float32
    (their values need not be representable in a half type)."""
    if scheme.scale_format != "float":
        return QParams(qp.scale.float(), None, qp.global_scale)
    return QParams(qp.scale.to(dtype), None if qp.zero_point is None else qp.zero_point.to(dtype), qp.global_scale)


def shared_global_scales(weights: dict[str, torch.Tensor], groups: list[list[str]], scheme: QuantScheme
                         ) -> dict[str, torch.Tensor | None]:
    """NVFP4 global scales shared within each group of matrices (what a runtime fuses into one layer gets one:
    that of the group's largest weight, so no member's group scales overflow E4M3); None for other schemes.

    Args:
        weights: name → (N, K) weight.
        groups: lists of names (:func:`compressor.core.arch.fused_groups`).
        scheme: the scheme.
    """
    out: dict[str, torch.Tensor | None] = {name: None for name in weights}
    if scheme.scale_format != "e4m3":
        return out
    for group in groups:
        members = [n for n in group if n in weights]
        if not members:
            continue
        gs = min((global_scale(weights[n], scheme) for n in members), key=float)
        out.update({n: gs for n in members})
    return out

"""Small floating-point grids: FP8 E4M3 and FP4 E2M1 elements, E4M3 and E8M0 scales.

Pure tensor functions, exact by construction (every representable value is listed, rounding picks the nearest
and breaks ties to the even code, as IEEE round-to-nearest-even does), with the conventions of the OCP
Microscaling spec (MX formats v1.0), NVIDIA's NVFP4 and compressed-tensors:

* **E4M3** (``float8_e4m3fn``): 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; largest finite
  value 448; subnormals down to 2^-9. Values past ±448 saturate to ±448.
* **E2M1** (FP4): 1 sign, 2 exponent (bias 1), 1 mantissa bit; magnitudes {0, 0.5, 1, 1.5, 2, 3, 4, 6};
  saturates at ±6. Ties go to the even code: 0.25 → 0, 0.75 → 1, 1.25 → 1, 1.75 → 2, 2.5 → 2, 3.5 → 4, 5 → 4
  (what compressed-tensors' ``cast_to_fp4`` does).
* **E8M0** scales (MX): an unsigned biased exponent, ``scale = 2^(code - 127)``, codes 0-254 (255 is NaN).

Codes as stored: an E4M3 value is its byte (kept as ``int8``, the bit pattern of ``float8_e4m3fn``); an E2M1
value is its nibble ``sign << 3 | index`` (0-15, ``index`` into the magnitudes above), the value
compressed-tensors packs two to a byte, low nibble first.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

__all__ = ["FloatFormat", "E4M3", "E2M1", "ELEMENTS", "element_format", "round_to_grid", "round_to_grid_reference",
           "encode", "decode",
           "e8m0_encode", "e8m0_decode", "mx_scale", "round_scale_e4m3", "E8M0_MIN_EXP", "E8M0_MAX_EXP"]

E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127  # codes 0 and 254; 255 is NaN


@dataclass(frozen=True)
class FloatFormat:
    """A sign-magnitude float element format without infinities.

    Attributes:
        name: ``"e4m3"`` or ``"e2m1"``.
        bits: storage bits per value (8 or 4).
        exponent_bits: exponent field width.
        mantissa_bits: mantissa field width.
        bias: exponent bias.
        max: largest finite magnitude.
    """

    name: str
    bits: int
    exponent_bits: int
    mantissa_bits: int
    bias: int
    max: float

    def magnitudes(self) -> torch.Tensor:
        """Every finite non-negative value, ascending, indexed by magnitude code: float64 (M,)."""
        return _magnitudes(self)

    @property
    def codes(self) -> int:
        """Number of magnitude codes that are finite (E4M3: 127, 0x7F is NaN; E2M1: 8)."""
        return int(self.magnitudes().numel())


@lru_cache(maxsize=None)
def _magnitudes(fmt: FloatFormat) -> torch.Tensor:
    values = []
    for code in range(1 << (fmt.bits - 1)):
        e, m = code >> fmt.mantissa_bits, code & ((1 << fmt.mantissa_bits) - 1)
        if e == 0:
            v = m / (1 << fmt.mantissa_bits) * 2.0 ** (1 - fmt.bias)
        else:
            v = (1 + m / (1 << fmt.mantissa_bits)) * 2.0 ** (e - fmt.bias)
        if v > fmt.max:  # E4M3FN: the all-ones code is NaN
            break
        values.append(v)
    return torch.tensor(values, dtype=torch.float64)


E4M3 = FloatFormat("e4m3", bits=8, exponent_bits=4, mantissa_bits=3, bias=7, max=448.0)
E2M1 = FloatFormat("e2m1", bits=4, exponent_bits=2, mantissa_bits=1, bias=1, max=6.0)
ELEMENTS = {8: E4M3, 4: E2M1}


def element_format(bits: int) -> FloatFormat:
    """The float element format of a width: 8 → E4M3, 4 → E2M1."""
    if bits not in ELEMENTS:
        raise ValueError(f"float weights of {bits} bits are not supported: use 8 (FP8 E4M3) or 4 (FP4 E2M1)")
    return ELEMENTS[bits]


def _magnitude_index(fmt: FloatFormat, x: torch.Tensor) -> torch.Tensor:
    """Magnitude code nearest to |x| (ties to even, saturating): int64, shaped like ``x``."""
    vals = fmt.magnitudes().to(x.device)
    a = x.detach().abs().to(torch.float64).clamp(max=fmt.max)
    lo = (torch.searchsorted(vals, a, right=True) - 1).clamp(min=0)
    hi = (lo + 1).clamp(max=vals.numel() - 1)
    d_lo, d_hi = a - vals[lo], vals[hi] - a
    up = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0) & (hi != lo))
    return torch.where(up, hi, lo)


def round_to_grid(fmt: FloatFormat, x: torch.Tensor) -> torch.Tensor:
    """Nearest representable value of ``x`` (ties to even, saturating at ±max), in ``x``'s dtype.

    E4M3 uses torch's ``float8_e4m3fn`` cast of the clamped value (round to nearest even); E2M1 rounds
    ``|x|`` on the spacing of its binade (0.5 below 2, 1 below 4, 2 above) with ``torch.round``, whose halves go
    to even. Both equal :func:`round_to_grid_reference`, the search over every value (tested).

    Args:
        fmt: the element format.
        x: any float tensor, finite.

    Returns:
        Same shape and dtype as ``x``; the sign of a value that rounds to zero is kept (-0.0).
    """
    if fmt is E4M3:
        return x.clamp(-fmt.max, fmt.max).to(torch.float8_e4m3fn).to(x.dtype)
    if fmt is E2M1:
        a = x.detach().abs().float().clamp(max=fmt.max)
        step = torch.where(a < 2.0, 0.5, torch.where(a < 4.0, 1.0, 2.0))
        return torch.copysign(torch.round(a / step) * step, x.detach().float()).to(x.dtype)
    return round_to_grid_reference(fmt, x)


def round_to_grid_reference(fmt: FloatFormat, x: torch.Tensor) -> torch.Tensor:
    """:func:`round_to_grid` by search over every representable magnitude (float64): the specification."""
    mag = fmt.magnitudes().to(x.device)[_magnitude_index(fmt, x)]
    return torch.where(torch.signbit(x), -mag, mag).to(x.dtype)


def encode(fmt: FloatFormat, values: torch.Tensor) -> torch.Tensor:
    """Storage codes of values already on the grid (see the module docstring): int8, shaped like ``values``.

    Raises:
        ValueError: a value is not representable.
    """
    idx = _magnitude_index(fmt, values)
    if not torch.equal(fmt.magnitudes().to(values.device)[idx], values.detach().abs().to(torch.float64)):
        raise ValueError(f"values are not on the {fmt.name.upper()} grid: round them with round_to_grid first")
    sign = torch.signbit(values).to(torch.int64) << (fmt.bits - 1)
    code = idx | sign
    if fmt.bits == 8:
        return code.to(torch.uint8).view(torch.int8)
    return code.to(torch.int8)


def decode(fmt: FloatFormat, codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of storage codes: int8 / uint8 codes → ``dtype``, same shape.

    Raises:
        ValueError: a code is NaN or out of range for the format.
    """
    c = codes.to(torch.int64) & ((1 << fmt.bits) - 1)
    mag_code = c & ((1 << (fmt.bits - 1)) - 1)
    if mag_code.numel() and int(mag_code.max()) >= fmt.codes:
        raise ValueError(f"{fmt.name.upper()} codes hold NaN (magnitude code {fmt.codes}): the tensor is corrupt")
    mag = fmt.magnitudes().to(codes.device)[mag_code]
    sign = (c >> (fmt.bits - 1)).bool()
    return torch.where(sign, -mag, mag).to(dtype)


def round_scale_e4m3(scale: torch.Tensor) -> torch.Tensor:
    """Scales rounded to E4M3 (NVFP4's per-16 scales), saturating at 448, in float32; zeros become the smallest
    subnormal 2^-9 so that nothing divides by zero."""
    s = round_to_grid(E4M3, scale.float())
    return torch.where(s == 0, torch.full_like(s, 2.0**-9), s)


def e8m0_encode(scale: torch.Tensor) -> torch.Tensor:
    """E8M0 codes of power-of-two scales: float (any shape) → uint8 ``log2(scale) + 127``.

    Raises:
        ValueError: a scale is not a power of two in [2^-127, 2^127].
    """
    s = scale.detach().float()
    exp = torch.round(torch.log2(s))
    if not torch.equal(torch.exp2(exp), s) or int(exp.min()) < E8M0_MIN_EXP or int(exp.max()) > E8M0_MAX_EXP:
        raise ValueError("E8M0 scales must be powers of two in [2^-127, 2^127]")
    return (exp + 127).to(torch.uint8)


def e8m0_decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Scales of E8M0 codes: uint8 → ``2^(code - 127)`` in ``dtype``.

    Raises:
        ValueError: a code is 255 (NaN).
    """
    c = codes.to(torch.int64)
    if c.numel() and int(c.max()) > 254:
        raise ValueError("E8M0 code 255 is NaN: the scales are corrupt")
    return torch.exp2((c - 127).to(torch.float32)).to(dtype)


def mx_scale(amax: torch.Tensor, fmt: FloatFormat = E2M1) -> torch.Tensor:
    """Power-of-two MX block scales from block maxima, as compressed-tensors' MXFP4 observer chooses them.

    The block maximum is rounded to a power of two at the element's mantissa precision (1.75 · 2^e and more
    round up to 2^(e+1)), then divided by 2^floor(log2(fmt.max)) (4 for E2M1), so the largest element lands
    near the top of the grid (OCP MX v1.0, §6.3, with that rounding). Exponents are clamped to E8M0's range.

    Args:
        amax: block maxima of |w|, float (any shape), >= 0.
        fmt: the element format.

    Returns:
        float32 scales ``2^e``, shaped like ``amax``.
    """
    a = amax.detach().float()
    tiny = torch.finfo(torch.float32).tiny
    exp = torch.floor(torch.log2(a.clamp(min=tiny)))
    mant = a.clamp(min=tiny) / torch.exp2(exp)  # [1, 2)
    up = mant >= 2.0 - 2.0 ** -(fmt.mantissa_bits + 1)  # rounds up at fmt's mantissa precision plus one bit
    exp = exp + up.float() - math.floor(math.log2(fmt.max))
    exp = torch.where(a > 0, exp, torch.full_like(exp, E8M0_MIN_EXP)).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
    return torch.exp2(exp)

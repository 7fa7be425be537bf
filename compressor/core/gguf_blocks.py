"""llama.cpp's block formats Q8_0, Q5_0, Q5_1, Q4_0 and the K-quants Q2_K to Q6_K: their grids, and their bytes.

Each format stores a row of K weights (K a multiple of the block size) as
consecutive blocks; the layouts are ggml's (``ggml-common.h``: ``block_q8_0``,
``block_q4_K``, ...), and a weight dequantizes exactly as ggml's
``dequantize_row_*`` computes it, in float32, in the same order:

* **Q8_0**, 32 weights in 34 bytes: ``d`` fp16, then 32 int8 codes;
  ``w = d * q``.
* **Q5_0**, 32 weights in 22 bytes: ``d`` fp16, a little-endian uint32 ``qh``
  whose bit ``j`` is the 5th bit of code ``j``, then 16 bytes whose low nibble
  holds code ``j`` and high nibble code ``j + 16``; codes ``q`` in [0, 31],
  ``w = d * (q - 16)``. (llama.cpp falls back to it from Q4_K when a row's length
  is not a multiple of 256, e.g. SmolLM2's 576.)
* **Q4_0**, 32 weights in 18 bytes: ``d`` fp16, then 16 bytes whose low nibble
  holds code ``j`` and high nibble code ``j + 16``; ``w = d * (q - 8)``, ``q`` in
  [0, 15] (the fallback of Q2_K and Q3_K).
* **Q5_1**, 32 weights in 24 bytes: ``d`` fp16, ``m`` fp16, ``qh`` and the nibbles
  as Q5_0; ``w = d * q + m``, ``q`` in [0, 31] (the fallback of Q5_K).
* **Q4_K**, 256 weights in 144 bytes: ``d`` fp16, ``dmin`` fp16, 12 bytes of
  eight 6-bit scales ``sc`` and eight 6-bit mins ``m`` (one per 32 weights),
  then 128 bytes of 4-bit codes ``q`` in [0, 15]; ``w = (d * sc) * q - dmin * m``.
  Codes: byte ``32 c + l`` holds sub-block ``2c`` (low nibble) and ``2c + 1``
  (high nibble) at position ``l``. Scales: bytes 0-3 hold ``sc[0:4]`` in their
  low 6 bits and ``sc[4:8] >> 4`` in their top 2; bytes 4-7 the same for
  ``m``; bytes 8-11 hold ``sc[4:8] & 15`` (low nibble) and ``m[4:8] & 15``.
* **Q5_K**, 256 weights in 176 bytes: as Q4_K (``d``, ``dmin``, the same 12
  scale bytes, 128 bytes of low nibbles laid out alike), plus 32 bytes ``qh``
  after the scales: bit ``j`` of ``qh[l]`` is the 5th bit of sub-block ``j``'s
  code at position ``l``; codes in [0, 31].
* **Q2_K**, 256 weights in 84 bytes: 16 bytes of scales (low nibble ``sc``,
  high nibble ``m``, one pair per 16 weights), 64 bytes of 2-bit codes, then
  ``d`` and ``dmin`` fp16; ``w = (d * sc) * q - dmin * m``, ``q`` in [0, 3].
  Value ``128 n + 32 j + t`` of a block: bits ``2 j`` of ``qs[32 n + t]``.
* **Q3_K**, 256 weights in 110 bytes: 32 bytes ``hmask``, 64 bytes of low 2
  bits (laid out as Q2_K's), 12 bytes of sixteen 6-bit scales ``s``, then ``d``
  fp16; ``w = d * (s - 32) * (q - 4)``, ``q`` in [0, 7]. The high bit of value
  ``128 n + 32 j + t`` is bit ``4 n + j`` of ``hmask[t]``. Scale bytes: byte
  ``b`` < 4 holds ``s[b]`` (low nibble) and ``s[8 + b]`` (high), byte ``4 + b``
  ``s[4 + b]`` and ``s[12 + b]``, byte ``8 + b`` the top two bits of ``s[b]``,
  ``s[4 + b]``, ``s[8 + b]``, ``s[12 + b]`` from its lowest bits up.
* **Q6_K**, 256 weights in 210 bytes: 128 bytes ``ql`` (low 4 bits of the
  codes), 64 bytes ``qh`` (high 2 bits), 16 int8 scales (one per 16 weights),
  then ``d`` fp16; codes ``q`` in [0, 63], ``w = (d * scale) * (q - 32)``.
  Value ``128 h + j`` of a block: low bits in nibble ``j // 64`` of
  ``ql[64 h + j % 64]``, high bits at bit ``2 (j // 32)`` of ``qh[32 h + j % 32]``.

``gguf``'s ``quants.dequantize`` (the Python reader llama.cpp ships) reads the
bytes back to the same floats (``tests/export/test_gguf_blocks.py``).

:func:`rtn` chooses the block parameters from the weights alone (per-block
range, then the sub-block scales rounded up onto their 6- / 8-bit grids) and
rounds every weight to its nearest grid point: the plain baseline a
calibrated quantizer improves on, inside the same grid. :func:`choose` searches
each (sub-)block's scale for the lowest importance-weighted error (the role of
llama.cpp's imatrix); :func:`grid` and :func:`with_codes` let a solver such as
GPTQ pick the codes on a fixed grid.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

__all__ = ["Q8_0", "Q4_0", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "BlockFormat", "FORMATS",
           "Q8Params", "Q4Params", "Q5Params", "Q51Params", "Q4KParams", "Q6KParams", "Grid", "encode", "dequantize",
           "rtn", "choose", "grid", "with_codes", "MIXES", "FILE_TYPES", "mix_format"]

QK_K = 256


@dataclass(frozen=True)
class BlockFormat:
    """A llama.cpp block format: ``name``, GGML type id, weights per block and bytes per block."""

    name: str
    ggml_type: int
    block: int
    nbytes: int


Q8_0 = BlockFormat("Q8_0", 8, 32, 34)
Q4_0 = BlockFormat("Q4_0", 2, 32, 18)
Q5_0 = BlockFormat("Q5_0", 6, 32, 22)
Q5_1 = BlockFormat("Q5_1", 7, 32, 24)
Q2_K = BlockFormat("Q2_K", 10, QK_K, 84)
Q3_K = BlockFormat("Q3_K", 11, QK_K, 110)
Q4_K = BlockFormat("Q4_K", 12, QK_K, 144)
Q5_K = BlockFormat("Q5_K", 13, QK_K, 176)
Q6_K = BlockFormat("Q6_K", 14, QK_K, 210)
FORMATS = {f.name: f for f in (Q8_0, Q4_0, Q5_0, Q5_1, Q2_K, Q3_K, Q4_K, Q5_K, Q6_K)}

# 32-weight blocks w = d * (q - centre): centre, lowest and highest code
_CENTRED = {"Q8_0": (0, -127, 127), "Q4_0": (8, 0, 15), "Q5_0": (16, 0, 31)}
# K-quants w = (d * sc) * q - dmin * m: sub-blocks per 256 weights, highest code, highest sub-block scale / min
_AFFINE_K = {"Q2_K": (16, 3, 15), "Q4_K": (8, 15, 63), "Q5_K": (8, 31, 63)}
# K-quants w = d * s * (q - centre), 16 sub-blocks of 16: centre, largest |s| used
_SIGNED_K = {"Q3_K": (4, 31), "Q6_K": (32, 127)}


@dataclass
class Q8Params:
    """Q8_0 of an (R, K) matrix: ``d`` (R, K/32) float16, ``q`` (R, K/32, 32) int8 codes."""

    d: torch.Tensor
    q: torch.Tensor


@dataclass
class Q5Params:
    """Q5_0 of an (R, K) matrix: ``d`` (R, K/32) float16, ``q`` (R, K/32, 32) uint8 codes in [0, 31]
    (the weight is ``d * (q - 16)``)."""

    d: torch.Tensor
    q: torch.Tensor


@dataclass
class Q4Params:
    """Q4_0 of an (R, K) matrix: ``d`` (R, K/32) float16, ``q`` (R, K/32, 32) uint8 codes in [0, 15]
    (the weight is ``d * (q - 8)``)."""

    d: torch.Tensor
    q: torch.Tensor


@dataclass
class Q51Params:
    """Q5_1 of an (R, K) matrix: ``d``, ``m`` (R, K/32) float16, ``q`` (R, K/32, 32) uint8 codes in [0, 31]
    (the weight is ``d * q + m``)."""

    d: torch.Tensor
    m: torch.Tensor
    q: torch.Tensor


@dataclass
class Q4KParams:
    """Q2_K, Q4_K or Q5_K of an (R, K) matrix, B = K/256 blocks per row, S sub-blocks of 256/S weights (Q2_K 16,
    the others 8): ``d``, ``dmin`` (R, B) float16; ``sc``, ``m`` (R, B, S) uint8 in [0, 15] (Q2_K) or [0, 63];
    ``q`` (R, B, S, 256/S) uint8 codes in [0, 3], [0, 15] or [0, 31]. The weight is ``(d * sc) * q - dmin * m``."""

    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor
    q: torch.Tensor


@dataclass
class Q6KParams:
    """Q3_K or Q6_K of an (R, K) matrix, B = K/256: ``d`` (R, B) float16; ``scales`` (R, B, 16) int8 (Q3_K: in
    [-32, 31]); ``q`` (R, B, 16, 16) uint8 codes in [0, 7] (Q3_K) or [0, 63] (Q6_K). The weight is
    ``d * scale * (q - 4)`` (Q3_K) or ``d * scale * (q - 32)`` (Q6_K)."""

    d: torch.Tensor
    scales: torch.Tensor
    q: torch.Tensor


Params = Q8Params | Q4Params | Q5Params | Q51Params | Q4KParams | Q6KParams
_CENTRED_PARAMS = {"Q8_0": Q8Params, "Q4_0": Q4Params, "Q5_0": Q5Params}


def _u8(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.uint8)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(…,) float16 → (…, 2) uint8, little-endian."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def _bits_of(x: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis of ``x << shifts``: packs one-bit (or few-bit) fields into an integer."""
    return (x << shifts).sum(-1)


def _nibbles(q: torch.Tensor) -> torch.Tensor:
    """(…, 32) codes → (…, 16) bytes: low nibble code j, high nibble code j + 16 (Q4_0, Q5_0, Q5_1)."""
    return (q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)


def _qh32(q: torch.Tensor) -> torch.Tensor:
    """(…, 32) 5-bit codes → (…, 4) little-endian bytes of the uint32 whose bit j is code j's 5th bit."""
    qh = _bits_of((q >> 4) & 1, torch.arange(32))[..., None]  # < 2**32
    return torch.cat([(qh >> (8 * i)) & 255 for i in range(4)], dim=-1)


def _k_scale_bytes(sc: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Q4_K / Q5_K: eight 6-bit scales and mins (…, 8) → their 12 bytes."""
    return torch.cat([(sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6), (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),
                      (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4)], dim=-1)


def _two_bit_planes(q: torch.Tensor) -> torch.Tensor:
    """Q2_K / Q3_K: the low 2 bits of a block's 256 codes (…, 256) → 64 bytes, value ``128 n + 32 j + t`` at bits
    ``2 j`` of byte ``32 n + t``."""
    low = (q & 3).reshape(*q.shape[:-1], 2, 4, 32).transpose(-1, -2)  # (…, n, t, j)
    return _bits_of(low, 2 * torch.arange(4)).reshape(*q.shape[:-1], 64)


def encode(fmt: BlockFormat, p: Params) -> torch.Tensor:
    """The bytes of ``p`` in format ``fmt``: (R, B * fmt.nbytes) uint8, rows of blocks as ggml lays them out."""
    rows, blocks = p.d.shape  # every format has one fp16 d per block
    if fmt is Q8_0:
        out = torch.cat([_fp16_bytes(p.d), p.q.to(torch.int8).view(torch.uint8)], dim=-1)
    elif fmt is Q4_0:
        out = torch.cat([_fp16_bytes(p.d), _u8(_nibbles(p.q.to(torch.int64)))], dim=-1)
    elif fmt is Q5_0:
        q = p.q.to(torch.int64)
        out = torch.cat([_fp16_bytes(p.d), _u8(_qh32(q)), _u8(_nibbles(q))], dim=-1)
    elif fmt is Q5_1:
        q = p.q.to(torch.int64)
        out = torch.cat([_fp16_bytes(p.d), _fp16_bytes(p.m), _u8(_qh32(q)), _u8(_nibbles(q))], dim=-1)
    elif fmt is Q4_K or fmt is Q5_K:
        sc, m = p.sc.to(torch.int32), p.m.to(torch.int32)
        q = p.q.to(torch.int32).reshape(rows, blocks, 4, 2, 32)
        qs = ((q[..., 0, :] & 15) | ((q[..., 1, :] & 15) << 4)).reshape(rows, blocks, 128)
        parts = [_fp16_bytes(p.d), _fp16_bytes(p.dmin), _u8(_k_scale_bytes(sc, m))]
        if fmt is Q5_K:  # bit j of qh[l]: 5th bit of sub-block j's code l
            high = ((p.q.to(torch.int32) >> 4) & 1).transpose(-1, -2)  # (R, B, 32, 8)
            parts.append(_u8(_bits_of(high, torch.arange(8))))
        out = torch.cat(parts + [_u8(qs)], dim=-1)
    elif fmt is Q2_K:
        q = p.q.to(torch.int64).reshape(rows, blocks, QK_K)
        scales = (p.sc.to(torch.int64) & 15) | ((p.m.to(torch.int64) & 15) << 4)
        out = torch.cat([_u8(scales), _u8(_two_bit_planes(q)), _fp16_bytes(p.d), _fp16_bytes(p.dmin)], dim=-1)
    elif fmt is Q3_K:
        q = p.q.to(torch.int64).reshape(rows, blocks, QK_K)
        high = ((q >> 2) & 1).reshape(rows, blocks, 8, 32).transpose(-1, -2)  # (R, B, t, 4 n + j)
        hmask = _bits_of(high, torch.arange(8))
        s = p.scales.to(torch.int64) + 32  # (R, B, 16) in [0, 63]
        lo, hi2 = s & 15, s >> 4
        scales = torch.cat([lo[..., 0:4] | (lo[..., 8:12] << 4), lo[..., 4:8] | (lo[..., 12:16] << 4),
                            hi2[..., 0:4] | (hi2[..., 4:8] << 2) | (hi2[..., 8:12] << 4) | (hi2[..., 12:16] << 6)],
                           dim=-1)
        out = torch.cat([_u8(hmask), _u8(_two_bit_planes(q)), _u8(scales), _fp16_bytes(p.d)], dim=-1)
    elif fmt is Q6_K:
        q = p.q.to(torch.int32).reshape(rows, blocks, 2, 128)  # two halves of 128
        low, high = q & 15, q >> 4
        ql = (low[..., :64] | (low[..., 64:] << 4)).reshape(rows, blocks, 128)
        h = high.reshape(rows, blocks, 2, 4, 32)
        qh = (h[..., 0, :] | (h[..., 1, :] << 2) | (h[..., 2, :] << 4) | (h[..., 3, :] << 6)).reshape(rows, blocks, 64)
        out = torch.cat([_u8(ql), _u8(qh), p.scales.to(torch.int8).view(torch.uint8), _fp16_bytes(p.d)], dim=-1)
    else:
        raise ValueError(f"unknown block format {fmt}")
    return out.reshape(rows, blocks * fmt.nbytes).contiguous()


def dequantize(fmt: BlockFormat, p: Params) -> torch.Tensor:
    """The (R, K) float32 weights ``p`` stands for, computed as ggml's ``dequantize_row_*`` does."""
    if fmt.name in _CENTRED:
        centre = _CENTRED[fmt.name][0]
        q = p.q.float() if centre == 0 else p.q.float() - centre
        w = q * p.d.float()[..., None]
    elif fmt is Q5_1:
        w = p.q.float() * p.d.float()[..., None] + p.m.float()[..., None]
    elif fmt.name in _AFFINE_K:
        d = p.d.float()[..., None] * p.sc.float()  # (R, B, S)
        dm = p.dmin.float()[..., None] * p.m.float()
        w = d[..., None] * p.q.float() - dm[..., None]
    elif fmt.name in _SIGNED_K:
        d = p.d.float()[..., None] * p.scales.float()  # (R, B, 16)
        w = d[..., None] * (p.q.float() - _SIGNED_K[fmt.name][0])
    else:
        raise ValueError(f"unknown block format {fmt}")
    return w.reshape(w.shape[0], -1)


def _blocks(w: torch.Tensor, size: int) -> torch.Tensor:
    if w.dim() != 2 or w.shape[1] % size:
        raise ValueError(f"a {tuple(w.shape)} weight cannot be cut into blocks of {size}: its rows must be a multiple "
                         f"of {size} long (llama.cpp keeps such tensors in a wider format, e.g. Q8_0 or F16)")
    if not torch.isfinite(w).all():
        raise ValueError("the weight holds NaN or inf; it cannot be quantized")
    return w.float().reshape(w.shape[0], -1, size)


def _sub_blocks(fmt: BlockFormat, w: torch.Tensor) -> torch.Tensor:
    """(R, K) → (R, K/256, S, 256/S) for a K-quant with S sub-blocks per block."""
    subs = _AFFINE_K[fmt.name][0] if fmt.name in _AFFINE_K else 16
    return _blocks(w, QK_K).reshape(w.shape[0], -1, subs, QK_K // subs)


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    """float16 at least as large as ``x`` in magnitude (normal range): the scale then covers the range it was
    computed from."""
    return (x * (1 + 2.0**-10)).to(torch.float16)


def _signed_peak(x: torch.Tensor) -> torch.Tensor:
    """The value of largest magnitude of each group (…, W) → (…,), with its sign."""
    return x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0]


def rtn(fmt: BlockFormat, w: torch.Tensor) -> Params:
    """Round-to-nearest parameters and codes of an (R, K) weight in ``fmt`` (see the module docstring).

    The K-quants round every scale up onto its grid (fp16 super-block scales, 4- / 6- / 8-bit sub-block
    scales), so each sub-block's grid still spans its weights; Q8_0 takes the nearest fp16 scale. Every
    weight goes to its nearest grid point.
    Q4_0, Q5_0, Q3_K and Q6_K map each group's largest magnitude to the lowest code (``q - centre = -centre``,
    the side of the signed grid that reaches furthest), as llama.cpp does with a signed scale.

    Raises:
        ValueError: K is not a multiple of the block size, or the weight is not finite.
    """
    if fmt is Q8_0:
        x = _blocks(w, 32)
        # nearest fp16: a peak that lands past 127 moves by < 0.1 of a step, still to its nearest code
        d = (x.abs().amax(-1) / 127).to(torch.float16)
        q = torch.round(_safe_div(x, d.float()[..., None])).clamp(-127, 127).to(torch.int8)
        return Q8Params(d, q)
    if fmt.name in _CENTRED:  # Q4_0, Q5_0
        c = _CENTRED[fmt.name][0]
        x = _blocks(w, 32)
        d = _fp16_up(-_signed_peak(x) / c)  # signed, as ggml's quantize_row_q5_0_ref: the peak lands on q - c = -c
        q = torch.round(_safe_div(x, d.float()[..., None])).clamp(-c, c - 1) + c
        return _CENTRED_PARAMS[fmt.name](d, q.to(torch.uint8))
    if fmt is Q5_1:
        x = _blocks(w, 32)
        m = x.amin(-1).to(torch.float16)
        d = _fp16_up((x.amax(-1) - m.float()).clamp(min=0) / 31)
        return Q51Params(d, m, _nearest(x, d.float(), -m.float(), 0, 31).to(torch.uint8))
    if fmt.name in _AFFINE_K:
        _, qmax, smax = _AFFINE_K[fmt.name]
        x = _sub_blocks(fmt, w)
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1)  # w = step * q - min, min >= 0: zero stays on the grid
        dmin = _fp16_up((-lo).amax(-1) / smax)
        m = torch.ceil(_safe_div(-lo, dmin.float()[..., None])).clamp(0, smax)
        need = (hi + dmin.float()[..., None] * m).clamp(min=0) / qmax  # the step that reaches hi from -dmin*m
        d = _fp16_up(need.amax(-1) / smax)
        sc = torch.ceil(_safe_div(need, d.float()[..., None])).clamp(0, smax)
        step = d.float()[..., None] * sc
        q = _nearest(x, step, dmin.float()[..., None] * m, 0, qmax)
        return Q4KParams(d, dmin, sc.to(torch.uint8), m.to(torch.uint8), q.to(torch.uint8))
    if fmt.name in _SIGNED_K:
        c, top = _SIGNED_K[fmt.name]
        x = _sub_blocks(fmt, w)
        need = -_signed_peak(x) / c  # signed: the peak lands on q - c = -c
        d = _fp16_up(need.abs().amax(-1) / top)
        scales = (torch.sign(need) * torch.ceil(_safe_div(need.abs(), d.float()[..., None]))).clamp(-top, top)
        step = d.float()[..., None] * scales
        q = torch.round(_safe_div(x, step[..., None])).clamp(-c, c - 1) + c
        return Q6KParams(d, scales.to(torch.int8), q.to(torch.uint8))
    raise ValueError(f"unknown block format {fmt}")


@dataclass
class Grid:
    """The affine grid a format's parameters put each weight on: ``w = step * q - offset`` with ``q`` an integer
    in [``qmin``, ``qmax``]; ``step`` and ``offset`` are (R, K / width) float32, one per group of ``width``
    consecutive weights of a row (a block, or a K-quant's sub-block). A zero step is a group whose only value
    is ``-offset``."""

    step: torch.Tensor
    offset: torch.Tensor
    qmin: int
    qmax: int
    width: int


def grid(fmt: BlockFormat, p: Params) -> Grid:
    """The fixed grid of ``p`` (its scales and mins), on which :func:`with_codes` accepts any codes."""
    rows = p.d.shape[0]
    if fmt.name in _CENTRED:
        c, qmin, qmax = _CENTRED[fmt.name]
        step = p.d.float()
        return Grid(step, c * step, qmin, qmax, 32)
    if fmt is Q5_1:
        return Grid(p.d.float(), -p.m.float(), 0, 31, 32)
    if fmt.name in _AFFINE_K:
        subs, qmax, _ = _AFFINE_K[fmt.name]
        step = (p.d.float()[..., None] * p.sc.float()).reshape(rows, -1)
        offset = (p.dmin.float()[..., None] * p.m.float()).reshape(rows, -1)
        return Grid(step, offset, 0, qmax, QK_K // subs)
    if fmt.name in _SIGNED_K:
        c = _SIGNED_K[fmt.name][0]
        step = (p.d.float()[..., None] * p.scales.float()).reshape(rows, -1)
        return Grid(step, c * step, 0, 2 * c - 1, 16)
    raise ValueError(f"unknown block format {fmt}")


def with_codes(fmt: BlockFormat, p: Params, codes: torch.Tensor) -> Params:
    """``p`` with its codes replaced by ``codes``, (R, K) integers in the grid's [qmin, qmax] (:func:`grid`)."""
    g = grid(fmt, p)
    if int(codes.min()) < g.qmin or int(codes.max()) > g.qmax:
        raise ValueError(f"{fmt.name} codes must lie in [{g.qmin}, {g.qmax}], got [{int(codes.min())}, {int(codes.max())}]")
    return replace(p, q=codes.reshape(p.q.shape).to(p.q.dtype))


def _nearest(x: torch.Tensor, step: torch.Tensor, offset: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Nearest codes of ``x`` (…, W) on ``step * q - offset`` with per-group (…,) step and offset."""
    return torch.round(_safe_div(x + offset[..., None], step[..., None])).clamp(qmin, qmax)


def _weighted_err(x, imp, step, offset, qmin, qmax) -> torch.Tensor:
    q = _nearest(x, step, offset, qmin, qmax)
    return (imp * (x - (step[..., None] * q - offset[..., None])) ** 2).sum(-1)


SEARCH = (1.0, 0.97, 0.94, 0.91, 0.88, 0.85, 0.82, 0.79, 0.76)  # scale shrink factors tried by choose()


def choose(fmt: BlockFormat, w: torch.Tensor, importance: torch.Tensor | None = None) -> Params:
    """Block parameters of an (R, K) weight chosen for the lowest importance-weighted rounding error, codes nearest.

    Each (sub-)block's scale is searched over the shrink factors in :data:`SEARCH` (a smaller scale clips the
    extremes and rounds the rest finer) for the lowest ``sum_j importance[j] (w_j - w^_j)^2``; the formats with
    a min (Q5_1, Q2_K, Q4_K, Q5_K) also try pulling it in. The K-quants' sub-block scales and mins are then
    rounded onto their 4- / 6- / 8-bit grids under the super-block scales. ``importance`` is (K,) non-negative
    per input column, e.g. the diagonal of the layer's input Hessian (what llama.cpp's imatrix holds: the mean
    squared activation of each column); None weighs every weight alike. Q8_0 is :func:`rtn` (nothing to gain
    from a search).

    Raises:
        ValueError: as :func:`rtn`, or ``importance`` does not have K entries.
    """
    if fmt is Q8_0:
        return rtn(fmt, w)
    k = w.shape[1] if w.dim() == 2 else 0
    imp = torch.ones(k) if importance is None else importance.detach().float().cpu().clamp(min=0)
    if imp.shape != (k,):
        raise ValueError(f"importance must have one entry per column ({k}), got {tuple(imp.shape)}")
    imp = imp + 1e-12 * imp.max().clamp(min=1e-30)  # no group weighs nothing at all
    if fmt.name in _CENTRED:  # Q4_0, Q5_0
        c = _CENTRED[fmt.name][0]
        x = _blocks(w, 32)
        iw = imp.reshape(-1, 32)
        d = _best_scale(x, iw, -_signed_peak(x) / c, lambda s: c * s, 0, 2 * c - 1, fp16=True)
        return _CENTRED_PARAMS[fmt.name](d.half(), _nearest(x, d, c * d, 0, 2 * c - 1).to(torch.uint8))
    if fmt is Q5_1:
        x = _blocks(w, 32)
        step, off = _affine_search(x, imp.reshape(-1, 32), x.amin(-1), x.amax(-1), 31)
        d, m = step.half(), (-off).half()
        return Q51Params(d, m, _nearest(x, d.float(), -m.float(), 0, 31).to(torch.uint8))
    if fmt.name in _SIGNED_K:
        c, top = _SIGNED_K[fmt.name]
        x = _sub_blocks(fmt, w)
        iw = imp.reshape(-1, 16, 16)
        need = _best_scale(x, iw, -_signed_peak(x) / c, lambda s: c * s, 0, 2 * c - 1, fp16=False)
        d = _fp16_up(need.abs().amax(-1) / top)
        scales = torch.round(_safe_div(need, d.float()[..., None])).clamp(-top, top)
        step = d.float()[..., None] * scales
        return Q6KParams(d, scales.to(torch.int8), _nearest(x, step, c * step, 0, 2 * c - 1).to(torch.uint8))
    if fmt.name in _AFFINE_K:
        _, qmax, smax = _AFFINE_K[fmt.name]
        x = _sub_blocks(fmt, w)
        iw = imp.reshape(-1, *x.shape[2:])
        best_step, best_off = _affine_search(x, iw, x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0), qmax)
        dmin = _fp16_up(best_off.amax(-1) / smax)
        m = torch.round(_safe_div(best_off, dmin.float()[..., None])).clamp(0, smax)
        d = _fp16_up(best_step.amax(-1) / smax)
        sc = torch.round(_safe_div(best_step, d.float()[..., None])).clamp(0, smax)
        sc = torch.where((sc == 0) & (best_step > 0), torch.ones_like(sc), sc)
        step, off = d.float()[..., None] * sc, dmin.float()[..., None] * m
        return Q4KParams(d, dmin, sc.to(torch.uint8), m.to(torch.uint8), _nearest(x, step, off, 0, qmax).to(torch.uint8))
    raise ValueError(f"unknown block format {fmt}")


def _affine_search(x, imp, lo, hi, qmax) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group ``(step, offset)`` of the grid ``step * q - offset``, q in [0, qmax], with the lowest
    importance-weighted error: the offset ``-lo`` pulled in by 0-20%, the step that reaches ``hi`` from it shrunk
    by the factors of :data:`SEARCH`."""
    best_err = best_step = best_off = None
    for pull in (1.0, 0.9, 0.8):
        off = -lo * pull
        for f in SEARCH:
            step = (hi + off) / qmax * f
            err = _weighted_err(x, imp, step, off, 0, qmax)
            if best_err is None:
                best_err, best_step, best_off = err, step, off
            else:
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_step = torch.where(better, step, best_step)
                best_off = torch.where(better, off, best_off)
    return best_step, best_off


def _best_scale(x, imp, base, offset_of, qmin, qmax, *, fp16: bool) -> torch.Tensor:
    """The signed per-group scale among ``base * f`` (f in :data:`SEARCH`, rounded to fp16 when ``fp16``) with the
    lowest importance-weighted error on the grid ``step * q - offset_of(step)``, codes in [qmin, qmax]."""
    best_err = best = None
    for f in SEARCH:
        s = base * f
        s = s.half().float() if fp16 else s
        err = _weighted_err(x, imp, s, offset_of(s), qmin, qmax)
        if best is None:
            best_err, best = err, s
        else:
            better = err < best_err
            best_err, best = torch.where(better, err, best_err), torch.where(better, s, best)
    return best


# ---------------------------------------------------------------- llama-quantize's mixes

MIXES = ("F32", "Q8_0", "Q6_K", "Q5_K_M", "Q5_K_S", "Q4_K_M", "Q4_K_S", "Q3_K_L", "Q3_K_M", "Q3_K_S", "Q2_K")
# general.file_type (llama.cpp's llama_ftype)
FILE_TYPES = {"F32": 0, "Q8_0": 7, "Q2_K": 10, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "Q4_K_S": 14, "Q4_K_M": 15,
              "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18}
# a row not a multiple of 256 long: llama.cpp's tensor_type_fallback
_FALLBACK = {"Q2_K": "Q4_0", "Q3_K": "Q4_0", "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third one between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def _mix_rule(mix: str, role: str, layer: int, n_layers: int, gqa: int) -> str:
    """The K-quant ``llama_tensor_get_type_impl`` gives a block tensor in ``mix`` (dense decoder, not Falcon)."""
    base = mix if mix in ("Q8_0", "Q6_K", "Q2_K") else mix[:4]
    if role == "attn_v":
        if mix == "Q2_K":
            return "Q4_K" if gqa >= 4 else "Q3_K"
        if mix == "Q3_K_M":
            return "Q5_K" if layer < 2 else "Q4_K"
        if mix == "Q3_K_L":
            return "Q5_K"
        if mix in ("Q4_K_M", "Q5_K_M") and _more_bits(layer, n_layers):
            return "Q6_K"
        if mix == "Q4_K_S" and layer < 4:
            return "Q5_K"
    elif role == "ffn_down":
        if mix == "Q2_K":
            return "Q3_K"
        if mix == "Q3_K_M":
            return "Q5_K" if layer < n_layers // 16 else "Q4_K"
        if mix == "Q3_K_L":
            return "Q5_K"
        if mix in ("Q4_K_M", "Q5_K_M") and _more_bits(layer, n_layers):
            return "Q6_K"
        if mix == "Q4_K_S" and layer < n_layers // 8:
            return "Q5_K"
    elif role == "attn_output":
        return {"Q2_K": "Q3_K", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K"}.get(mix, base)
    return base


def mix_format(mix: str, role: str, layer: int, n_layers: int, ncols: int, *, tied: bool = False,
               gqa: int = 1) -> BlockFormat | None:
    """The block format llama-quantize gives a tensor in ``mix`` (None: kept in float32).

    Follows ``llama_tensor_get_type`` of llama.cpp's ``src/llama-quant.cpp`` (as vendored by llama-cpp-python
    0.3.36) for dense, non-Falcon models: each mix's base K-quant (``Q3_K`` for ``Q3_K_M``), with more bits
    for ``attn_v``, ``ffn_down`` and ``attn_output`` where the mix says so (Q4_K_M / Q5_K_M: Q6_K on the layers
    ``use_more_bits`` picks; Q3_K_M: ``attn_v`` Q5_K on the first two layers and Q4_K after, ``ffn_down`` Q5_K
    on the first sixteenth and Q4_K after, ``attn_output`` Q4_K; Q2_K: ``attn_v`` Q3_K, or Q4_K from 4 query
    heads per KV head, ``ffn_down`` and ``attn_output`` Q3_K; ...), the output matrix (or, tied, the token
    embeddings) Q6_K (Q8_0 when its rows are not a multiple of 256 long); a K-quant whose rows are not a
    multiple of 256 long falls back to a 32-weight format (Q2_K, Q3_K → Q4_0; Q4_K → Q5_0; Q5_K → Q5_1;
    Q6_K → Q8_0), as llama.cpp does. llama.cpp's rules for mixture-of-experts models, Falcon and its 70B
    shape are not followed.

    Args:
        mix: one of :data:`MIXES`.
        role: llama.cpp's tensor name inside a block (``attn_q``, ``ffn_down``, ...), ``token_embd`` or ``output``.
        layer: the block index (ignored for ``token_embd`` / ``output``).
        n_layers: the number of blocks.
        ncols: the row length K of the (N, K) matrix.
        tied: the token embeddings double as the output matrix.
        gqa: query heads per KV head (llama.cpp's ``n_gqa``; Q2_K's ``attn_v`` depends on it).

    Raises:
        ValueError: an unknown mix, or a row length no block format of the mix divides.
    """
    if mix not in MIXES:
        raise ValueError(f"unknown GGUF mix {mix!r}: use one of {MIXES}")
    if mix == "F32":
        return None
    if role == "output" or (tied and role == "token_embd"):
        name = "Q8_0" if ncols % QK_K or mix == "Q8_0" else "Q6_K"
    elif role == "token_embd":
        name = mix if mix in ("Q8_0", "Q6_K", "Q2_K") else mix[:4]
    else:
        name = _mix_rule(mix, role, layer, n_layers, gqa)
    if ncols % FORMATS[name].block:
        name = _FALLBACK.get(name, name)
    if ncols % FORMATS[name].block:
        raise ValueError(f"{role}: rows of {ncols} are not a multiple of {FORMATS[name].block}, the block of "
                         f"{name}; llama.cpp would keep this tensor in F16: export it with mix 'F32'")
    return FORMATS[name]

"""llama.cpp's block formats Q8_0, Q4_K and Q6_K: their grids, and their bytes.

Each format stores a row of K weights (K a multiple of the block size) as
consecutive blocks; the layouts are ggml's (``ggml-common.h``: ``block_q8_0``,
``block_q4_K``, ``block_q6_K``), and a weight dequantizes exactly as ggml's
``dequantize_row_*`` computes it, in float32, in the same order:

* **Q8_0**, 32 weights in 34 bytes: ``d`` fp16, then 32 int8 codes;
  ``w = d * q``.
* **Q4_K**, 256 weights in 144 bytes: ``d`` fp16, ``dmin`` fp16, 12 bytes of
  eight 6-bit scales ``sc`` and eight 6-bit mins ``m`` (one per 32 weights),
  then 128 bytes of 4-bit codes ``q`` in [0, 15]; ``w = (d * sc) * q - dmin * m``.
  Codes: byte ``32 c + l`` holds sub-block ``2c`` (low nibble) and ``2c + 1``
  (high nibble) at position ``l``. Scales: bytes 0-3 hold ``sc[0:4]`` in their
  low 6 bits and ``sc[4:8] >> 4`` in their top 2; bytes 4-7 the same for
  ``m``; bytes 8-11 hold ``sc[4:8] & 15`` (low nibble) and ``m[4:8] & 15``.
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
calibrated quantizer improves on, inside the same grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Q8_0", "Q4_K", "Q6_K", "BlockFormat", "FORMATS", "Q8Params", "Q4KParams", "Q6KParams",
           "encode", "dequantize", "rtn"]

QK_K = 256


@dataclass(frozen=True)
class BlockFormat:
    """A llama.cpp block format: ``name``, GGML type id, weights per block and bytes per block."""

    name: str
    ggml_type: int
    block: int
    nbytes: int


Q8_0 = BlockFormat("Q8_0", 8, 32, 34)
Q4_K = BlockFormat("Q4_K", 12, QK_K, 144)
Q6_K = BlockFormat("Q6_K", 14, QK_K, 210)
FORMATS = {f.name: f for f in (Q8_0, Q4_K, Q6_K)}


@dataclass
class Q8Params:
    """Q8_0 of an (R, K) matrix: ``d`` (R, K/32) float16, ``q`` (R, K/32, 32) int8 codes."""

    d: torch.Tensor
    q: torch.Tensor


@dataclass
class Q4KParams:
    """Q4_K of an (R, K) matrix, B = K/256 blocks per row: ``d``, ``dmin`` (R, B) float16; ``sc``, ``m``
    (R, B, 8) uint8 in [0, 63]; ``q`` (R, B, 8, 32) uint8 codes in [0, 15]."""

    d: torch.Tensor
    dmin: torch.Tensor
    sc: torch.Tensor
    m: torch.Tensor
    q: torch.Tensor


@dataclass
class Q6KParams:
    """Q6_K of an (R, K) matrix, B = K/256: ``d`` (R, B) float16; ``scales`` (R, B, 16) int8; ``q`` (R, B, 16, 16)
    uint8 codes in [0, 63] (the weight is ``d * scale * (q - 32)``)."""

    d: torch.Tensor
    scales: torch.Tensor
    q: torch.Tensor


Params = Q8Params | Q4KParams | Q6KParams


def _u8(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.uint8)


def _fp16_bytes(x: torch.Tensor) -> torch.Tensor:
    """(…,) float16 → (…, 2) uint8, little-endian."""
    return x.to(torch.float16).contiguous().view(torch.uint8).reshape(*x.shape, 2)


def encode(fmt: BlockFormat, p: Params) -> torch.Tensor:
    """The bytes of ``p`` in format ``fmt``: (R, B * fmt.nbytes) uint8, rows of blocks as ggml lays them out."""
    rows, blocks = p.d.shape  # every format has one fp16 d per block
    if fmt is Q8_0:
        out = torch.cat([_fp16_bytes(p.d), p.q.to(torch.int8).view(torch.uint8)], dim=-1)
    elif fmt is Q4_K:
        sc, m = p.sc.to(torch.int32), p.m.to(torch.int32)
        scales = torch.cat([
            (sc[..., :4] & 63) | ((sc[..., 4:] >> 4) << 6),
            (m[..., :4] & 63) | ((m[..., 4:] >> 4) << 6),
            (sc[..., 4:] & 15) | ((m[..., 4:] & 15) << 4),
        ], dim=-1)
        q = p.q.to(torch.int32).reshape(rows, blocks, 4, 2, 32)
        qs = (q[..., 0, :] | (q[..., 1, :] << 4)).reshape(rows, blocks, 128)
        out = torch.cat([_fp16_bytes(p.d), _fp16_bytes(p.dmin), _u8(scales), _u8(qs)], dim=-1)
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
    if fmt is Q8_0:
        w = p.q.float() * p.d.float()[..., None]
    elif fmt is Q4_K:
        d = p.d.float()[..., None] * p.sc.float()  # (R, B, 8)
        dm = p.dmin.float()[..., None] * p.m.float()
        w = d[..., None] * p.q.float() - dm[..., None]
    elif fmt is Q6_K:
        d = p.d.float()[..., None] * p.scales.float()  # (R, B, 16)
        w = d[..., None] * (p.q.float() - 32)
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


def _safe_div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.where(b == 0, torch.zeros_like(a), a / torch.where(b == 0, torch.ones_like(b), b))


def _fp16_up(x: torch.Tensor) -> torch.Tensor:
    """float16 at least ``x`` (>= 0, normal range): the scale then covers the range it was computed from."""
    return (x * (1 + 2.0**-10)).to(torch.float16)


def rtn(fmt: BlockFormat, w: torch.Tensor) -> Params:
    """Round-to-nearest parameters and codes of an (R, K) weight in ``fmt`` (see the module docstring).

    Q4_K and Q6_K round every scale up onto its grid (fp16 super-block scales, 6-bit / 8-bit sub-block
    scales), so each sub-block's grid still spans its weights; Q8_0 takes the nearest fp16 scale. Every
    weight goes to its nearest grid point.
    Q6_K maps each 16 weights' largest magnitude to code 0 (``q - 32 = -32``, the side of the signed grid
    that reaches furthest), as llama.cpp does with a signed scale.

    Raises:
        ValueError: K is not a multiple of the block size, or the weight is not finite.
    """
    if fmt is Q8_0:
        x = _blocks(w, 32)
        # nearest fp16: a peak that lands past 127 moves by < 0.1 of a step, still to its nearest code
        d = (x.abs().amax(-1) / 127).to(torch.float16)
        q = torch.round(_safe_div(x, d.float()[..., None])).clamp(-127, 127).to(torch.int8)
        return Q8Params(d, q)
    if fmt is Q4_K:
        x = _blocks(w, QK_K).reshape(w.shape[0], -1, 8, 32)
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1)  # w = step * q - min, min >= 0: zero stays on the grid
        dmin = _fp16_up((-lo).amax(-1) / 63)
        m = torch.ceil(_safe_div(-lo, dmin.float()[..., None])).clamp(0, 63)
        need = (hi + dmin.float()[..., None] * m).clamp(min=0) / 15  # the step that reaches hi from -dmin*m
        d = _fp16_up(need.amax(-1) / 63)
        sc = torch.ceil(_safe_div(need, d.float()[..., None])).clamp(0, 63)
        step = d.float()[..., None] * sc
        q = torch.round(_safe_div(x + (dmin.float()[..., None] * m)[..., None], step[..., None])).clamp(0, 15)
        return Q4KParams(d, dmin, sc.to(torch.uint8), m.to(torch.uint8), q.to(torch.uint8))
    if fmt is Q6_K:
        x = _blocks(w, QK_K).reshape(w.shape[0], -1, 16, 16)
        peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0]
        need = -peak / 32  # signed: the peak lands on q - 32 = -32
        d = _fp16_up(need.abs().amax(-1) / 127)
        scales = (torch.sign(need) * torch.ceil(_safe_div(need.abs(), d.float()[..., None]))).clamp(-127, 127)
        step = d.float()[..., None] * scales
        q = torch.round(_safe_div(x, step[..., None])).clamp(-32, 31) + 32
        return Q6KParams(d, scales.to(torch.int8), q.to(torch.uint8))
    raise ValueError(f"unknown block format {fmt}")

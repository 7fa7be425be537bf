"""llama.cpp's block formats Q8_0, Q5_0, Q4_K and Q6_K: their grids, and their bytes.

Each format stores a row of K weights (K a multiple of the block size) as
consecutive blocks; the layouts are ggml's (``ggml-common.h``: ``block_q8_0``,
``block_q4_K``, ``block_q6_K``), and a weight dequantizes exactly as ggml's
``dequantize_row_*`` computes it, in float32, in the same order:

* **Q8_0**, 32 weights in 34 bytes: ``d`` fp16, then 32 int8 codes;
  ``w = d * q``.
* **Q5_0**, 32 weights in 22 bytes: ``d`` fp16, a little-endian uint32 ``qh``
  whose bit ``j`` is the 5th bit of code ``j``, then 16 bytes whose low nibble
  holds code ``j`` and high nibble code ``j + 16``; codes ``q`` in [0, 31],
  ``w = d * (q - 16)``. (llama.cpp falls back to it from Q4_K when a row's length
  is not a multiple of 256, e.g. SmolLM2's 576.)
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
calibrated quantizer improves on, inside the same grid. :func:`choose` searches
each (sub-)block's scale for the lowest importance-weighted error (the role of
llama.cpp's imatrix); :func:`grid` and :func:`with_codes` let a solver such as
GPTQ pick the codes on a fixed grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Q8_0", "Q5_0", "Q4_K", "Q6_K", "BlockFormat", "FORMATS", "Q8Params", "Q5Params", "Q4KParams",
           "Q6KParams", "Grid", "encode", "dequantize", "rtn", "choose", "grid", "with_codes", "MIXES", "FILE_TYPES",
           "mix_format"]

QK_K = 256


@dataclass(frozen=True)
class BlockFormat:
    """A llama.cpp block format: ``name``, GGML type id, weights per block and bytes per block."""

    name: str
    ggml_type: int
    block: int
    nbytes: int


Q8_0 = BlockFormat("Q8_0", 8, 32, 34)
Q5_0 = BlockFormat("Q5_0", 6, 32, 22)
Q4_K = BlockFormat("Q4_K", 12, QK_K, 144)
Q6_K = BlockFormat("Q6_K", 14, QK_K, 210)
FORMATS = {f.name: f for f in (Q8_0, Q5_0, Q4_K, Q6_K)}


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


Params = Q8Params | Q5Params | Q4KParams | Q6KParams


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
    elif fmt is Q5_0:
        q = p.q.to(torch.int64)
        qs = (q[..., :16] & 15) | ((q[..., 16:] & 15) << 4)
        qh = ((q >> 4) & 1) << torch.arange(32)  # bit j: 5th bit of code j
        qh = qh.sum(-1, keepdim=True)  # (R, B, 1), < 2**32
        qh = torch.cat([(qh >> (8 * i)) & 255 for i in range(4)], dim=-1)  # little-endian bytes
        out = torch.cat([_fp16_bytes(p.d), _u8(qh), _u8(qs)], dim=-1)
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
    elif fmt is Q5_0:
        w = (p.q.float() - 16) * p.d.float()[..., None]
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
    """float16 at least as large as ``x`` in magnitude (normal range): the scale then covers the range it was
    computed from."""
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
    if fmt is Q5_0:
        x = _blocks(w, 32)
        peak = x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0]
        d = _fp16_up(-peak / 16)  # signed, as ggml's quantize_row_q5_0_ref: the peak lands on q - 16 = -16
        q = torch.round(_safe_div(x, d.float()[..., None])).clamp(-16, 15) + 16
        return Q5Params(d, q.to(torch.uint8))
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
    if fmt is Q8_0:
        step = p.d.float()
        return Grid(step, torch.zeros_like(step), -127, 127, 32)
    if fmt is Q5_0:
        step = p.d.float()
        return Grid(step, 16 * step, 0, 31, 32)
    if fmt is Q4_K:
        step = (p.d.float()[..., None] * p.sc.float()).reshape(rows, -1)
        offset = (p.dmin.float()[..., None] * p.m.float()).reshape(rows, -1)
        return Grid(step, offset, 0, 15, 32)
    if fmt is Q6_K:
        step = (p.d.float()[..., None] * p.scales.float()).reshape(rows, -1)
        return Grid(step, 32 * step, 0, 63, 16)
    raise ValueError(f"unknown block format {fmt}")


def with_codes(fmt: BlockFormat, p: Params, codes: torch.Tensor) -> Params:
    """``p`` with its codes replaced by ``codes``, (R, K) integers in the grid's [qmin, qmax] (:func:`grid`)."""
    g = grid(fmt, p)
    if int(codes.min()) < g.qmin or int(codes.max()) > g.qmax:
        raise ValueError(f"{fmt.name} codes must lie in [{g.qmin}, {g.qmax}], got [{int(codes.min())}, {int(codes.max())}]")
    shape = p.q.shape
    q = codes.reshape(shape).to(p.q.dtype)
    if fmt is Q8_0:
        return Q8Params(p.d, q)
    if fmt is Q5_0:
        return Q5Params(p.d, q)
    if fmt is Q4_K:
        return Q4KParams(p.d, p.dmin, p.sc, p.m, q)
    return Q6KParams(p.d, p.scales, q)


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
    extremes and rounds the rest finer) for the lowest ``sum_j importance[j] (w_j - w^_j)^2``; Q4_K also tries
    pulling its min in. The K-quants' sub-block scales and mins are then rounded onto their 6- / 8-bit grids
    under the super-block scales. ``importance`` is (K,) non-negative per input column, e.g. the diagonal of
    the layer's input Hessian (what llama.cpp's imatrix holds: the mean squared activation of each column);
    None weighs every weight alike. Q8_0 is :func:`rtn` (nothing to gain from a search).

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
    if fmt is Q5_0:
        x = _blocks(w, 32)
        iw = imp.reshape(-1, 32)
        base = -x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0] / 16
        d = _best_scale(x, iw, base, lambda s: 16 * s, -16 + 16, 15 + 16, fp16=True)
        return Q5Params(d.half(), _nearest(x, d, 16 * d, 0, 31).to(torch.uint8))
    if fmt is Q6_K:
        x = _blocks(w, QK_K).reshape(w.shape[0], -1, 16, 16)
        iw = imp.reshape(-1, 16, 16)
        base = -x.gather(-1, x.abs().argmax(-1, keepdim=True))[..., 0] / 32
        need = _best_scale(x, iw, base, lambda s: 32 * s, 0, 63, fp16=False)
        d = _fp16_up(need.abs().amax(-1) / 127)
        scales = torch.round(_safe_div(need, d.float()[..., None])).clamp(-127, 127)
        step = d.float()[..., None] * scales
        return Q6KParams(d, scales.to(torch.int8), _nearest(x, step, 32 * step, 0, 63).to(torch.uint8))
    if fmt is Q4_K:
        x = _blocks(w, QK_K).reshape(w.shape[0], -1, 8, 32)
        iw = imp.reshape(-1, 8, 32)
        lo, hi = x.amin(-1).clamp(max=0), x.amax(-1).clamp(min=0)
        best_err = best_step = best_off = None
        for pull in (1.0, 0.9, 0.8):
            off = -lo * pull
            for f in SEARCH:
                step = (hi + off) / 15 * f
                err = _weighted_err(x, iw, step, off, 0, 15)
                if best_err is None:
                    best_err, best_step, best_off = err, step, off
                else:
                    better = err < best_err
                    best_err = torch.where(better, err, best_err)
                    best_step = torch.where(better, step, best_step)
                    best_off = torch.where(better, off, best_off)
        dmin = _fp16_up(best_off.amax(-1) / 63)
        m = torch.round(_safe_div(best_off, dmin.float()[..., None])).clamp(0, 63)
        d = _fp16_up(best_step.amax(-1) / 63)
        sc = torch.round(_safe_div(best_step, d.float()[..., None])).clamp(0, 63)
        sc = torch.where((sc == 0) & (best_step > 0), torch.ones_like(sc), sc)
        step, off = d.float()[..., None] * sc, dmin.float()[..., None] * m
        return Q4KParams(d, dmin, sc.to(torch.uint8), m.to(torch.uint8), _nearest(x, step, off, 0, 15).to(torch.uint8))
    raise ValueError(f"unknown block format {fmt}")


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

MIXES = ("F32", "Q8_0", "Q6_K", "Q4_K_M")
FILE_TYPES = {"F32": 0, "Q8_0": 7, "Q4_K_M": 15, "Q6_K": 18}  # general.file_type (llama.cpp's llama_ftype)
_FALLBACK = {"Q4_K": "Q5_0", "Q6_K": "Q8_0"}  # a row not a multiple of 256 long: llama.cpp's tensor_type_fallback


def _more_bits(layer: int, n_layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the layers and every third one between."""
    return layer < n_layers // 8 or layer >= 7 * n_layers // 8 or (layer - n_layers // 8) % 3 == 2


def mix_format(mix: str, role: str, layer: int, n_layers: int, ncols: int, *, tied: bool = False) -> BlockFormat | None:
    """The block format llama-quantize gives a tensor in ``mix`` (None: kept in float32).

    Follows ``llama_tensor_get_type`` of llama.cpp's ``src/llama-quant.cpp`` (as vendored by llama-cpp-python
    0.3.36) for dense models: in Q4_K_M, ``attn_v`` and ``ffn_down`` of the layers ``use_more_bits`` picks get
    Q6_K, the output matrix (or, tied, the token embeddings) Q6_K (Q8_0 when its rows are not a multiple of
    256 long), everything else Q4_K; a K-quant whose rows are not a multiple of 256 long falls back to Q5_0
    (from Q4_K) or Q8_0 (from Q6_K), as llama.cpp does.

    Args:
        mix: one of :data:`MIXES`.
        role: llama.cpp's tensor name inside a block (``attn_q``, ``ffn_down``, ...), ``token_embd`` or ``output``.
        layer: the block index (ignored for ``token_embd`` / ``output``).
        n_layers: the number of blocks.
        ncols: the row length K of the (N, K) matrix.
        tied: the token embeddings double as the output matrix.

    Raises:
        ValueError: an unknown mix, or a row length no block format of the mix divides.
    """
    if mix not in MIXES:
        raise ValueError(f"unknown GGUF mix {mix!r}: use one of {MIXES}")
    if mix == "F32":
        return None
    name = mix
    if mix == "Q4_K_M":
        name = "Q4_K"
        if role in ("attn_v", "ffn_down") and _more_bits(layer, n_layers):
            name = "Q6_K"
    if role == "output" or (tied and role == "token_embd"):
        name = "Q8_0" if ncols % QK_K or name == "Q8_0" else "Q6_K"
    if ncols % FORMATS[name].block:
        name = _FALLBACK.get(name, name)
    if ncols % FORMATS[name].block:
        raise ValueError(f"{role}: rows of {ncols} are not a multiple of {FORMATS[name].block}, the block of "
                         f"{name}; llama.cpp would keep this tensor in F16: export it with mix 'F32'")
    return FORMATS[name]

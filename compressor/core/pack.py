"""Dense bit packing of integer codes into int32 words (compressed-tensors layout).

Layout (compressed-tensors ``pack-quantized``, newest dense form): along the
packed dimension, element ``i`` occupies bits ``[i*b, (i+1)*b)`` of a little-
endian bit stream (LSB first) cut into int32 words; a value may straddle two
words. Codes are stored offset by ``2^(b-1)`` so they are unsigned. A row of
``C`` codes needs ``ceil(C*b/32)`` words. Pure functions, no input mutation.
"""

from __future__ import annotations

import math

import torch

__all__ = ["pack", "unpack", "packed_width"]


def packed_width(n: int, bits: int) -> int:
    """Words needed for ``n`` codes of ``bits`` bits."""
    return math.ceil(n * bits / 32)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: packing supports 1 to 8 bits")


def _bit_positions(bits: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Word index and bit offset of each of the 32 elements of a b-word block."""
    start = torch.arange(32, device=device, dtype=torch.int64) * bits
    return start // 32, start % 32


def pack(q: torch.Tensor, bits: int, dim: int = 1) -> torch.Tensor:
    """Pack signed codes into int32 words.

    Args:
        q: (R, C) integer tensor with values in ``[-2^(b-1), 2^(b-1) - 1]``.
        bits: 1-8.
        dim: 1 packs along columns → (R, ceil(C*b/32)); 0 packs along rows →
            (ceil(R*b/32), C) (used for zero points).

    Returns:
        int32 tensor, contiguous.
    """
    _check_bits(bits)
    if q.ndim != 2:
        raise ValueError(f"pack expects a 2-D tensor, got shape {tuple(q.shape)}")
    if dim not in (0, 1):
        raise ValueError(f"dim={dim}: pack along 0 or 1")
    if q.is_floating_point():
        raise ValueError(f"pack expects integer codes, got {q.dtype}")
    half = 1 << (bits - 1)
    u = q.to(torch.int64) + half  # (R, C) unsigned codes
    if u.numel() and (u.min() < 0 or u.max() >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits} bits: expected [{-half}, {half - 1}]")
    if dim == 0:
        u = u.t()
    rows, cols = u.shape
    blocks = math.ceil(cols / 32)
    u = torch.nn.functional.pad(u, (0, blocks * 32 - cols)).view(rows, blocks, 32)
    word, offset = _bit_positions(bits, u.device)
    out = torch.zeros(rows, blocks, bits + 1, dtype=torch.int64, device=u.device)
    # low part of each element into its word, high part (if it straddles) into the next
    out.scatter_add_(2, word.expand(rows, blocks, 32), (u << offset) & 0xFFFFFFFF)
    out.scatter_add_(2, (word + 1).expand(rows, blocks, 32), u >> (32 - offset))
    out = out[..., :bits].reshape(rows, blocks * bits)[:, : packed_width(cols, bits)]
    out = torch.where(out >= 1 << 31, out - (1 << 32), out).to(torch.int32)
    if dim == 0:
        out = out.t()
    return out.contiguous()


def unpack(packed: torch.Tensor, bits: int, n: int, dim: int = 1) -> torch.Tensor:
    """Inverse of :func:`pack`.

    Args:
        packed: int32 words, (R, W) for ``dim=1`` or (W, C) for ``dim=0``.
        bits: 1-8.
        n: number of codes along the packed dimension (the original C or R).
        dim: the packed dimension.

    Returns:
        int8 (R, n) or (n, C) with signed codes.
    """
    _check_bits(bits)
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise ValueError(f"unpack expects a 2-D int32 tensor, got {packed.dtype} {tuple(packed.shape)}")
    words = packed if dim == 1 else packed.t()
    if words.shape[1] != packed_width(n, bits):
        raise ValueError(
            f"packed width {words.shape[1]} does not match {n} codes of {bits} bits "
            f"(expected {packed_width(n, bits)} words): weight_shape and weight_packed disagree"
        )
    rows = words.shape[0]
    if 32 % bits == 0:  # 1, 2, 4, 8 bits: no code straddles a word, shift in place
        shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=words.device)
        vals = ((words[:, :, None] >> shifts) & ((1 << bits) - 1)).reshape(rows, -1)[:, :n]
        out = (vals - (1 << (bits - 1))).to(torch.int8)
        return out.contiguous() if dim == 1 else out.t().contiguous()
    blocks = math.ceil(n / 32)
    w = torch.nn.functional.pad(words, (0, blocks * bits - words.shape[1])).reshape(rows, blocks, bits)
    mask = (1 << bits) - 1
    vals = torch.empty(rows, blocks, 32, dtype=torch.int32, device=w.device)
    for i in range(32):  # static bit positions: element i of every block at once, no gather
        j, off = divmod(i * bits, 32)
        v = (w[:, :, j] >> off) & ((1 << min(bits, 32 - off)) - 1)  # mask off the arithmetic shift's sign bits
        if off + bits > 32:  # straddles into the next word
            v = v | ((w[:, :, j + 1] << (32 - off)) & mask)
        vals[:, :, i] = v
    vals = vals.reshape(rows, blocks * 32)[:, :n]
    out = (vals - (1 << (bits - 1))).to(torch.int8)
    return out.contiguous() if dim == 1 else out.t().contiguous()

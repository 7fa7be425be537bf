"""Bit packing: exact round trips and the compressed-tensors layout."""

from __future__ import annotations

import pytest
import torch

from compressor.core.pack import pack, packed_width, unpack

SHAPES = [(1, 1), (3, 5), (7, 33), (5, 64), (11, 100), (2, 257)]


def _codes(bits: int, shape, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), shape, generator=g, dtype=torch.int8)


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dim", [0, 1])
def test_round_trip_is_exact(bits, shape, dim):
    q = _codes(bits, shape, seed=bits)
    p = pack(q, bits, dim)
    assert p.dtype == torch.int32
    expected = (shape[0], packed_width(shape[1], bits)) if dim == 1 else (packed_width(shape[0], bits), shape[1])
    assert tuple(p.shape) == expected
    assert torch.equal(unpack(p, bits, shape[dim], dim), q)


@pytest.mark.parametrize("bits", range(1, 9))
def test_matches_compressed_tensors_layout(bits):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    for shape in SHAPES:
        q = _codes(bits, shape, seed=10 + bits)
        for dim in (0, 1):
            assert torch.equal(pack(q, bits, dim), helpers.pack_to_int32(q, bits, packed_dim=dim))


def test_known_layout_lsb_first():
    # 4-bit codes 0..7 offset by 8 → nibbles 8..15, first element in the lowest nibble
    q = torch.arange(8, dtype=torch.int8).view(1, 8) - 0
    word = pack(q, 4)[0, 0].item() & 0xFFFFFFFF
    assert word == sum((v + 8) << (4 * i) for i, v in enumerate(range(8)))
    # 3-bit: element 10 straddles bits 30..32
    q3 = torch.zeros(1, 32, dtype=torch.int8) - 4  # unsigned 0
    q3[0, 10] = 3  # unsigned 7 = 0b111
    p = pack(q3, 3)
    assert (p[0, 0].item() & 0xFFFFFFFF) >> 30 == 0b11 and p[0, 1].item() & 1 == 1


def test_inputs_are_not_mutated():
    q = _codes(4, (3, 40))
    before = q.clone()
    unpack(pack(q, 4), 4, 40)
    assert torch.equal(q, before)


def test_bad_inputs():
    with pytest.raises(ValueError, match="1 to 8"):
        pack(torch.zeros(2, 2, dtype=torch.int8), 9)
    with pytest.raises(ValueError, match="out of range"):
        pack(torch.full((2, 2), 8, dtype=torch.int8), 4)
    with pytest.raises(ValueError, match="integer codes"):
        pack(torch.zeros(2, 2), 4)
    with pytest.raises(ValueError, match="does not match"):
        unpack(pack(_codes(4, (2, 40)), 4), 4, 80)

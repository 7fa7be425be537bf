"""Triton dequant-matmul kernels (in Triton's CPU interpreter) against the torch reference."""

from __future__ import annotations

import pytest
import torch
from tests.test_kernels._triton_setup import DEVICE, make_weight, on_device, rel_err

from compressor.core.pack import pack, unpack
from compressor.kernels import reference
from compressor.kernels.triton import launch
from compressor.core.scheme import QParams, dequantize

N = 24
# (group_size, K): divides, divides, divides, per-channel, ragged (200 = 3*64 + 8), ragged g128 (200 = 128 + 72)
GROUPS = [(32, 96), (64, 192), (128, 256), (-1, 160), (64, 200), (128, 200)]
MS = (1, 3, 16, 33)  # decode with BLOCK_M 1, 4 and 16 (tl.dot), then the GEMM path


def _run(x, scheme, packed, scale, zp, g_idx=None, bias=None, n=N, **kw):
    k = x.shape[-1]
    return on_device(launch.dequant_matmul, x, packed, scale, zp, g_idx, bias, n, k, scheme.bits,
                     scheme.group_width(k), **kw)


def _ref(x, scheme, packed, scale, zp, g_idx=None, bias=None, n=N):
    return reference.dequant_matmul(x, packed, scale, zp, (n, x.shape[-1]), scheme, g_idx, bias)


@pytest.mark.parametrize("group_size,k", GROUPS)
@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_matches_reference_fp16(bits, symmetric, group_size, k):
    scheme, packed, scale, zp, _ = make_weight(N, k, bits, group_size, symmetric, seed=bits)
    g = torch.Generator().manual_seed(1)
    for m in MS:
        x = torch.randn(m, k, generator=g).to(torch.float16)
        out = _run(x, scheme, packed, scale, zp)
        assert out.dtype == torch.float16 and out.shape == (m, N)
        assert rel_err(out, _ref(x, scheme, packed, scale, zp)) <= 1e-3, f"M={m}"


def _exact(x, scheme, packed, scale, zp, n=N):
    """x @ W.T in float64 with W = (q - z) * s unrounded: what the decode kernels compute per row scale."""
    w = reference.dequantize_packed(packed, scale.double(), zp, (n, x.shape[-1]), scheme)
    return x.double() @ w.T


@pytest.mark.parametrize("m", [1, 16, 33])
def test_bf16(m):
    scheme, packed, scale, zp, _ = make_weight(40, 160, 4, 64, False, dtype=torch.bfloat16)
    x = torch.randn(m, 160, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    out = _run(x, scheme, packed, scale, zp, n=40)
    assert out.dtype == torch.bfloat16
    # the reference rounds each weight to bf16 (2^-9 relative) before its product, the decode path does
    # not (it applies the scale to whole rows), the GEMM path does: either way about 2e-3 apart
    assert rel_err(out, _ref(x, scheme, packed, scale, zp, n=40)) <= 3e-3
    assert rel_err(out, _exact(x, scheme, packed, scale, zp, n=40)) <= 3e-3


@pytest.mark.parametrize("m", [1, 16, 33])
def test_fp32_activations_fp16_scales(m):
    scheme, packed, scale, zp, _ = make_weight(N, 256, 3, 64, False)
    x = torch.randn(m, 256, generator=torch.Generator().manual_seed(3))
    out = _run(x, scheme, packed, scale, zp)
    # fp32 activations are never rounded to 16 bits: decode (M <= 16) equals the exact product, the GEMM
    # path (weights rounded to the scale's dtype, as the reference does) equals the reference
    want = _exact(x, scheme, packed, scale, zp) if m <= launch.DECODE_MAX_M else _ref(x, scheme, packed, scale, zp)
    assert rel_err(out, want) <= 1e-5


@pytest.mark.parametrize("m", [1, 3, 33])
@pytest.mark.parametrize("bits,symmetric", [(4, False), (3, True)])
def test_g_idx_and_bias(m, bits, symmetric):
    scheme, packed, scale, zp, g_idx = make_weight(40, 200, bits, 64, symmetric, actorder=True)
    bias = torch.randn(40, generator=torch.Generator().manual_seed(4)).to(torch.float16)
    x = torch.randn(m, 200, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    out = _run(x, scheme, packed, scale, zp, g_idx, bias, n=40)
    assert rel_err(out, _ref(x, scheme, packed, scale, zp, g_idx, bias, n=40)) <= 1e-3
    # without g_idx the answer differs: the index is really used
    assert rel_err(_run(x, scheme, packed, scale, zp, None, bias, n=40), out) > 1e-2


@pytest.mark.parametrize("path,m", [("decode", 5), ("gemm", 2), ("dequant", 3), ("dequant", 33)])
def test_every_path_on_any_m(path, m):
    scheme, packed, scale, zp, _ = make_weight(N, 160, 4, 32, False)
    bias = torch.randn(N).to(torch.float16)
    x = torch.randn(m, 160).to(torch.float16)
    out = _run(x, scheme, packed, scale, zp, bias=bias, path=path)
    assert rel_err(out, _ref(x, scheme, packed, scale, zp, bias=bias)) <= 1e-3


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("config", [
    {"BLOCK_N": 16, "BLOCK_K": 16, "SPLIT_K": 1},
    {"BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 4},  # spans two groups of 40: per-column scale gather
    {"BLOCK_N": 64, "BLOCK_K": 64, "SPLIT_K": 2},
    {"BLOCK_N": 16, "BLOCK_K": 32, "SPLIT_K": 8, "USE_DOT": True},  # one row padded to 16 for tl.dot
])
@pytest.mark.parametrize("bits,group", [(5, 40), (4, 32)])  # straddling codes and odd groups; word-wise, row scales
def test_decode_configs_and_split_k(config, m, bits, group):
    scheme, packed, scale, zp, _ = make_weight(40, 200, bits, group, False)
    bias = torch.randn(40).to(torch.float16)
    x = torch.randn(m, 200).to(torch.float16)
    out = _run(x, scheme, packed, scale, zp, bias=bias, n=40, path="decode", config=config)
    assert rel_err(out, _ref(x, scheme, packed, scale, zp, bias=bias, n=40)) <= 1e-3
    # the split-K workspace and counters are left zeroed for the next call
    ws, counters = launch._WORKSPACES[DEVICE]
    assert not ws.any() and not counters.any()


@pytest.mark.parametrize("bits", [1, 6, 7])
def test_other_bit_widths(bits):
    # the kernels take any 1-8 bits the packing does (QuantScheme itself starts at 2)
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (N, 100), generator=g, dtype=torch.int8)
    scale = (torch.rand(N, 4, generator=g) * 0.05 + 0.01).to(torch.float16)
    packed = pack(q, bits)
    w = unpack(packed, bits, 100).to(torch.float16) * scale.repeat_interleave(32, dim=1)[:, :100]  # symmetric, g32
    for m in (1, 33):
        x = torch.randn(m, 100, generator=g).to(torch.float16)
        out = on_device(launch.dequant_matmul, x, packed, scale, None, None, None, N, 100, bits, 32)
        assert rel_err(out, x.double() @ w.double().T) <= 1e-3


def test_float_zero_point():
    scheme, packed, scale, off, _ = make_weight(N, 160, 4, 64, False, float_zp=True)
    w = dequantize(unpack(packed, 4, 160), QParams(scale, off), scheme)  # the spec: (q - qmin) * scale + offset
    for m in (1, 33):
        x = torch.randn(m, 160).to(torch.float16)
        assert rel_err(_run(x, scheme, packed, scale, off), x.double() @ w.double().T) <= 1e-3


def test_batched_and_strided_input():
    scheme, packed, scale, zp, _ = make_weight(N, 96, 4, 32, False)
    base = torch.randn(2, 5, 192).to(torch.float16)
    x = base[..., ::2]  # (2, 5, 96), non-contiguous
    out = _run(x, scheme, packed, scale, zp)
    assert out.shape == (2, 5, N)
    assert rel_err(out, _ref(x.contiguous(), scheme, packed, scale, zp)) <= 1e-3
    assert _run(x[:0], scheme, packed, scale, zp).shape == (0, 5, N)


def test_dequantize_kernel_is_exact():
    scheme, packed, scale, zp, g_idx = make_weight(N, 200, 3, 64, False, actorder=True)
    w = on_device(launch.dequantize, packed, scale, zp, g_idx, N, 200, 3, 64, torch.float16)
    assert torch.equal(w, reference.dequantize_packed(packed, scale, zp, (N, 200), scheme, g_idx))


def test_select_path():
    assert launch.select_path(1) == launch.select_path(launch.DECODE_MAX_M) == "decode"
    assert launch.select_path(launch.DECODE_MAX_M + 1) == "gemm"
    assert launch.select_path(launch.DEQUANT_MATMUL_MIN_M) == "dequant"

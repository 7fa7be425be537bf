"""torch's int4 / int8 CPU matmuls behind our packed layout: exact against the reference, chosen only where fast."""

from __future__ import annotations

import pytest
import torch

from compressor.runtime.quant_linear import QuantLinear
from compressor.core.pack import pack
from compressor.kernels import cpu, dispatch, reference
from compressor.core.scheme import QuantScheme


def _weight(n, k, group_size, symmetric=False, float_zp=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    scheme = QuantScheme(bits=4, group_size=group_size, symmetric=symmetric, zero_point="float" if float_zp else "int")
    groups = -(-k // scheme.group_width(k))
    q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    scale = torch.rand(n, groups, generator=g) * 0.05 + 0.01
    if symmetric:
        zp = None
    elif float_zp:
        zp = torch.randn(n, groups, generator=g) * 0.1
    else:
        zp = pack(torch.randint(-8, 8, (n, groups), generator=g, dtype=torch.int8), 4, dim=0)
    return scheme, pack(q, 4, dim=1), scale, zp


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("n,k,group,sym,fzp", [
    (48, 576, 64, False, False),   # SmolLM2 width, op group 64
    (32, 576, -1, False, False),   # per-channel: split into repeated op groups
    (32, 576, 128, False, False),  # ragged last group of 64 = one op group
    (16, 512, 512, True, False),
    (32, 256, 128, False, True),   # float zero point
])
def test_matches_reference(n, k, group, sym, fzp):
    scheme, packed, scale, zp = _weight(n, k, group, sym, fzp)
    x = torch.randn(2, 3, k)
    bias = torch.randn(n)
    want = dispatch.dequant_matmul(x, packed, scale, zp, (n, k), scheme, None, bias, backend="reference")
    w32 = cpu.prepare_int4(packed, scale, zp, (n, k), scheme, torch.float32)
    assert _rel(cpu.int4_matmul(x, w32, bias), want) < 1e-5  # fp32: exact up to summation order
    wbf = cpu.prepare_int4(packed, scale, zp, (n, k), scheme, torch.bfloat16)
    out = cpu.int4_matmul(x.bfloat16(), wbf, bias)
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, n)
    assert _rel(out, want) < 1e-2  # bf16 scales and output


@pytest.mark.parametrize("bits,n,k,group,g_idx,match", [
    (3, 32, 256, 64, False, "4-bit"),
    (4, 40, 256, 64, False, "divisible by 16"),
    (4, 32, 200, 40, False, "no common divisor"),
    (4, 32, 256, 64, True, "g_idx"),
])
def test_unsupported_weights_are_named(bits, n, k, group, g_idx, match):
    scheme = QuantScheme(bits=bits, group_size=group)
    idx = torch.zeros(k, dtype=torch.int32) if g_idx else None
    assert match in cpu.int4_unsupported(scheme, n, k, idx)
    x = torch.randn(1, k).bfloat16()
    with pytest.raises(ValueError, match=match):
        dispatch.resolve_backend("cpu", x.device, dtype=x.dtype, scheme=scheme, shape=(n, k), g_idx=idx)
    assert dispatch.resolve_backend("auto", x.device, dtype=x.dtype, scheme=scheme, shape=(n, k), g_idx=idx) == "reference"


def test_auto_takes_it_only_for_bfloat16():
    scheme = QuantScheme(bits=4, group_size=64)
    dev = torch.device("cpu")
    assert dispatch.resolve_backend("auto", dev, dtype=torch.bfloat16, scheme=scheme, shape=(32, 256)) == "cpu"
    for slow in (torch.float32, torch.float16):  # the op's fp32 / fp16 paths are far slower than the reference
        assert dispatch.resolve_backend("auto", dev, dtype=slow, scheme=scheme, shape=(32, 256)) == "reference"
    assert dispatch.resolve_backend("cpu", dev, dtype=torch.float32, scheme=scheme, shape=(32, 256)) == "cpu"
    with pytest.raises(RuntimeError, match="CPU tensors"):
        dispatch.resolve_backend("cpu", torch.device("cuda"), dtype=torch.bfloat16, scheme=scheme, shape=(32, 256))


def test_quant_linear_caches_the_repack_until_the_weight_changes():
    scheme, packed, scale, zp = _weight(32, 256, 64)
    layer = QuantLinear(256, 32, scheme, dtype=torch.bfloat16)
    layer.weight_packed.copy_(packed)
    layer.weight_scale.copy_(scale)
    layer.weight_zero_point.copy_(zp)
    x = torch.randn(4, 256).bfloat16()
    out = layer(x)
    first = layer._kernel_cache["cpu"]
    assert _rel(out, reference.dequant_matmul(x.float(), packed, scale.bfloat16(), zp, (32, 256), scheme)) < 1e-2
    layer(x)
    assert layer._kernel_cache["cpu"] is first  # repacked once
    layer.weight_scale.mul_(2)  # in-place change (load_state_dict does the same): repack
    assert layer._kernel_cache["cpu"] is first
    torch.testing.assert_close(layer(x), 2 * out, rtol=2e-2, atol=1e-2)
    assert layer._kernel_cache["cpu"] is not first


def _weight8(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    scheme = QuantScheme(bits=8, group_size=-1, symmetric=True)
    q = torch.randint(-128, 128, (n, k), generator=g, dtype=torch.int8)
    return scheme, pack(q, 8, dim=1), torch.rand(n, 1, generator=g) * 0.01 + 0.001


@pytest.mark.parametrize("n,k", [(48, 576), (36, 1536), (5, 16)])
def test_int8_matches_reference(n, k):
    scheme, packed, scale = _weight8(n, k)
    x = torch.randn(2, 3, k)
    bias = torch.randn(n)
    want = dispatch.dequant_matmul(x, packed, scale, None, (n, k), scheme, None, bias, backend="reference")
    w32 = cpu.prepare(packed, scale, None, (n, k), scheme, torch.float32)
    assert isinstance(w32, cpu.Int8Weight)
    assert _rel(cpu.matmul(x, w32, bias), want) < 1e-5  # fp32: exact up to summation order
    out = dispatch.dequant_matmul(x.bfloat16(), packed, scale, None, (n, k), scheme, None, bias)  # auto: the int8 op
    assert out.dtype == torch.bfloat16 and out.shape == (2, 3, n)
    assert _rel(out, want) < 1e-2  # bf16 scales and output


def test_int8_copies_a_misaligned_input_instead_of_reading_garbage():
    """The op's bf16 kernel uses aligned vector loads: a view 2 bytes into its storage must be copied first."""
    n, k = 32, 64
    scheme, packed, scale = _weight8(n, k)
    buf = torch.randn(1 + 3 * k).bfloat16()
    x = buf[1:].view(3, k)  # contiguous, but its data starts 2 bytes past an aligned address
    assert x.is_contiguous() and x.data_ptr() % 32
    w = cpu.prepare_int8(packed, scale, None, (n, k), scheme, torch.bfloat16)
    want = reference.dequant_matmul(x.float(), packed, scale, None, (n, k), scheme)
    assert _rel(cpu.int8_matmul(x, w), want) < 1e-2


@pytest.mark.parametrize("symmetric,group,k,g_idx,match", [
    (False, -1, 256, False, "zero point"),
    (True, 128, 256, False, "one scale per output channel"),
    (True, -1, 72, False, "divisible by 16"),
    (True, -1, 256, True, "g_idx"),
])
def test_int8_unsupported_weights_are_named(symmetric, group, k, g_idx, match):
    scheme = QuantScheme(bits=8, group_size=group, symmetric=symmetric)
    idx = torch.zeros(k, dtype=torch.int32) if g_idx else None
    assert match in cpu.unsupported(scheme, 32, k, idx)
    dev = torch.device("cpu")
    with pytest.raises(ValueError, match=match):
        dispatch.resolve_backend("cpu", dev, dtype=torch.bfloat16, scheme=scheme, shape=(32, k), g_idx=idx)
    assert dispatch.resolve_backend("auto", dev, dtype=torch.bfloat16, scheme=scheme, shape=(32, k), g_idx=idx) \
        == "reference"
    if g_idx:
        return  # prepare_int8 takes no g_idx: the dispatcher never gets there
    with pytest.raises(ValueError, match="backend='reference'"):
        cpu.prepare_int8(torch.zeros(32, k // 4, dtype=torch.int32), torch.ones(32, 1), None, (32, k), scheme,
                         torch.bfloat16)


def test_quant_linear_at_w8_runs_the_int8_op_in_bfloat16():
    scheme, packed, scale = _weight8(32, 256)
    layer = QuantLinear(256, 32, scheme, dtype=torch.bfloat16)
    layer.weight_packed.copy_(packed)
    layer.weight_scale.copy_(scale)
    x = torch.randn(4, 256).bfloat16()
    out = layer(x)
    assert isinstance(layer._kernel_cache["cpu"], cpu.Int8Weight)
    assert _rel(out, reference.dequant_matmul(x.float(), packed, scale.bfloat16(), None, (32, 256), scheme)) < 1e-2

"""The ``compressor::dequant_matmul`` custom op (fake implementation, opcheck) and input validation."""

from __future__ import annotations

import pytest
import torch
from tests.test_kernels._triton_setup import DEVICE, make_weight, on_device, rel_err

from compressor.kernels import reference
from compressor.kernels.triton import launch, ops

N, K = 24, 200


@pytest.fixture
def weight():
    return make_weight(N, K, 3, 64, False)  # scheme, packed, scale, zp, g_idx


def test_op_matches_reference(weight):
    scheme, packed, scale, zp, _ = weight
    x = torch.randn(2, 3, K).to(torch.float16)
    out = on_device(ops.dequant_matmul, x, packed, scale, zp, None, None, N, K, 3, 64)
    assert torch.equal(out, on_device(torch.ops.compressor.dequant_matmul, x, packed, scale, zp, None, None, N, K, 3, 64))
    assert out.shape == (2, 3, N) and out.dtype == torch.float16
    assert rel_err(out, reference.dequant_matmul(x, packed, scale, zp, (N, K), scheme)) <= 1e-3


def test_fake_impl_gives_shape_and_dtype(weight):
    from torch._subclasses.fake_tensor import FakeTensorMode

    _, packed, scale, zp, _ = weight
    with FakeTensorMode() as mode:
        args = [mode.from_tensor(t) for t in (torch.randn(5, 7, K, dtype=torch.bfloat16), packed, scale, zp)]
        out = torch.ops.compressor.dequant_matmul(*args, None, None, N, K, 3, 64)
    assert out.shape == (5, 7, N) and out.dtype == torch.bfloat16


def test_opcheck(weight):
    _, packed, scale, zp, _ = weight
    x = torch.randn(3, K).to(torch.float16)
    bias = torch.randn(N).to(torch.float16)
    torch.library.opcheck(torch.ops.compressor.dequant_matmul.default,
                          tuple(a.to(DEVICE) if isinstance(a, torch.Tensor) else a
                                for a in (x, packed, scale, zp, None, bias, N, K, 3, 64)),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def _call(x, packed, scale, zp=None, g_idx=None, bias=None, n=N, k=K, bits=3, group=64, **kw):
    return on_device(launch.dequant_matmul, x, packed, scale, zp, g_idx, bias, n, k, bits, group, **kw)


def test_errors_name_the_problem(weight):
    _, packed, scale, zp, _ = weight
    x = torch.randn(2, K).to(torch.float16)
    with pytest.raises(ValueError, match="last dimension of x must be 200"):
        _call(torch.randn(2, K - 1).half(), packed, scale, zp)
    with pytest.raises(ValueError, match="misaligned"):
        _call(x, torch.cat([packed, packed[:, :1]], dim=1), scale, zp)  # one word too many for K=200
    with pytest.raises(ValueError, match="misaligned"):
        _call(torch.randn(2, 240).half(), packed, scale, zp, k=240, group=60)  # the export was for K=200
    with pytest.raises(ValueError, match="2-D int32"):
        _call(x, packed.long(), scale, zp)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        _call(x.to(torch.int32), packed, scale, zp)
    with pytest.raises(ValueError, match=r"weight_scale must be a float \(N, G\) = \(24, 4\)"):
        _call(x, packed, scale[:, :3], zp)
    with pytest.raises(ValueError, match="weight_zero_point has shape"):
        _call(x, packed, scale, zp[:, :2])
    with pytest.raises(ValueError, match="weight_zero_point has dtype"):
        _call(x, packed, scale, zp.float())
    with pytest.raises(ValueError, match="g_idx values must lie in"):
        _call(x, packed, scale, zp, g_idx=torch.full((K,), 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="g_idx must be an integer"):
        _call(x, packed, scale, zp, g_idx=torch.zeros(K - 1, dtype=torch.int32))
    with pytest.raises(ValueError, match="bias must be"):
        _call(x, packed, scale, zp, bias=torch.zeros(N + 1))
    with pytest.raises(ValueError, match="group_width"):
        _call(x, packed, scale, zp, group=0)
    with pytest.raises(ValueError, match="at most 16 rows"):
        _call(torch.randn(17, K).half(), packed, scale, zp, path="decode")
    with pytest.raises(ValueError, match="path='tiles' is unknown"):
        _call(x, packed, scale, zp, path="tiles")

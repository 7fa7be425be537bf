"""Backend choice: auto → reference on CPU, explicit triton runs (interpreter) or raises; QuantLinear on triton."""

from __future__ import annotations

import sys

import pytest
import torch
from tests.test_kernels._triton_setup import make_weight, rel_err

from compressor.runtime.quant_linear import QuantLinear
from compressor.kernels import dispatch, reference


def test_auto_is_reference_on_cpu():
    assert dispatch.resolve_backend("auto", torch.device("cpu")) == "reference"
    assert dispatch.resolve_backend("reference", torch.device("cuda")) == "reference"
    with pytest.raises(ValueError, match="unknown"):
        dispatch.resolve_backend("cublas", torch.device("cpu"))


def test_auto_picks_triton_on_cuda():
    # only the rule: no CUDA tensor is created
    assert dispatch.resolve_backend("auto", torch.device("cuda")) == "triton"


def test_explicit_triton_without_cuda_or_interpreter_raises(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.resolve_backend("triton", torch.device("cpu"))


def test_explicit_triton_without_triton_raises(monkeypatch):
    monkeypatch.setitem(sys.modules, "triton", None)  # makes `import triton` raise ImportError
    with pytest.raises(RuntimeError, match="pip install triton"):
        dispatch.resolve_backend("triton", torch.device("cuda"))
    assert dispatch.resolve_backend("auto", torch.device("cuda")) == "reference"


@pytest.mark.parametrize("symmetric", [True, False])
def test_triton_backend_matches_reference(symmetric):
    scheme, packed, scale, zp, g_idx = make_weight(40, 160, 4, 64, symmetric, actorder=True)
    bias = torch.randn(40).half()
    x = torch.randn(2, 3, 160).half()
    args = (x, packed, scale, zp, (40, 160), scheme, g_idx, bias)
    out = dispatch.dequant_matmul(*args, backend="triton")
    assert rel_err(out, dispatch.dequant_matmul(*args, backend="auto")) <= 1e-3


def test_zero_point_must_match_the_scheme():
    scheme, packed, scale, zp, _ = make_weight(24, 96, 4, 32, False)
    x = torch.randn(1, 96).half()
    with pytest.raises(ValueError, match="asymmetric but zero_point is None"):
        dispatch.dequant_matmul(x, packed, scale, None, (24, 96), scheme)
    sym, *_ = make_weight(24, 96, 4, 32, True)
    with pytest.raises(ValueError, match="symmetric but a zero point"):
        dispatch.dequant_matmul(x, packed, scale, zp, (24, 96), sym)
    with pytest.raises(ValueError, match="packed int32"):
        dispatch.dequant_matmul(x, packed, scale, scale, (24, 96), scheme)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_float_zero_point_on_both_backends(backend):
    from compressor.core.pack import unpack
    from compressor.core.scheme import QParams, dequantize

    scheme, packed, scale, off, _ = make_weight(24, 160, 3, 64, False, float_zp=True)
    w = dequantize(unpack(packed, 3, 160), QParams(scale, off), scheme)
    x = torch.randn(4, 160).half()
    out = dispatch.dequant_matmul(x, packed, scale, off, (24, 160), scheme, backend=backend)
    assert rel_err(out, x.double() @ w.double().T) <= 1e-3


def _layer(dtype, backend, bias=False):
    """A 96 -> 40 W4 g32 asymmetric QuantLinear holding a random weight (and bias), with its packed tensors."""
    scheme, packed, scale, zp, _ = make_weight(40, 96, 4, 32, False)
    layer = QuantLinear(96, 40, scheme, bias=bias, dtype=dtype, backend=backend)
    layer.weight_packed.copy_(packed)
    layer.weight_scale.copy_(scale)
    layer.weight_zero_point.copy_(zp)
    if bias:
        layer.bias.data.copy_(torch.randn(40).to(dtype))
    return layer, scheme, packed, scale, zp


def test_quant_linear_on_triton_backend():
    layer, scheme, packed, scale, zp = _layer(torch.float16, "triton", bias=True)
    x = torch.randn(2, 5, 96).half()
    expected = reference.dequant_matmul(x, packed, scale, zp, (40, 96), scheme, None, layer.bias)
    assert rel_err(layer(x), expected) <= 1e-3


def test_quant_linear_compiles_fullgraph():
    layer = _layer(torch.float16, "triton")[0]
    x = torch.randn(3, 96).half()
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)  # the custom op traces via its fake impl
    assert rel_err(compiled(x), layer(x)) <= 1e-6


def test_keep_dequantized_gives_the_same_numbers_once_computed():
    """Opting in keeps the reference path's dense weight: bit-identical outputs, recomputed when a tensor changes."""
    layer = _layer(torch.float32, "reference", bias=True)[0]
    x = torch.randn(2, 5, 96)
    plain = layer(x)
    layer.keep_dequantized()
    assert torch.equal(layer(x), plain) and torch.equal(layer(x), plain)
    dense = layer._kernel_cache["dense"]
    assert torch.equal(dense, layer.dequantized_weight())
    layer.weight_scale.mul_(2)  # a changed tensor is seen (its version moves)
    assert not torch.equal(layer(x), plain) and layer._kernel_cache["dense"] is not dense
    layer.keep_dequantized(False)
    assert "dense" not in layer._kernel_cache

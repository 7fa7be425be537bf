"""The float-format dequant-matmul kernel (FP8, NVFP4, MXFP4; in Triton's CPU interpreter) against the torch
reference path of FloatQuantLinear."""

from __future__ import annotations

import pytest
import torch
from tests.test_kernels._triton_setup import DEVICE, on_device, rel_err

from compressor.core.scheme import QuantScheme, global_scale
from compressor.kernels.reference import dequantize_float
from compressor.kernels.triton.float_launch import float_dequant_matmul
from compressor.export.compressed_tensors import compress_module_state, group_format
from compressor.core.state import attach_qparams
from compressor.passes.rtn import round_matrix

SCHEMES = {
    "fp8": QuantScheme(type="float", bits=8, group_size=-1, symmetric=True),
    "fp8-g32": QuantScheme(type="float", bits=8, group_size=32, symmetric=True),
    "fp8-block": QuantScheme(type="float", bits=8, group_size=32, symmetric=True, block_rows=16),  # 40 = 16+16+8 rows
    "fp8-tensor": QuantScheme(type="float", bits=8, group_size=-1, symmetric=True, block_rows=-1),
    "nvfp4": QuantScheme(type="float", bits=4, group_size=16, symmetric=True, scale_format="e4m3"),
    "mxfp4": QuantScheme(type="float", bits=4, group_size=32, symmetric=True, scale_format="e8m0"),
}


def _stored(name: str, n: int, k: int, seed: int = 0) -> tuple[dict, QuantScheme]:
    """A random (n, k) linear rounded to the scheme and stored as the export stores it."""
    scheme = SCHEMES[name]
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g)
    w[0, :5] = torch.tensor([0.0, 1e-7, -3.0, 40.0, -1e-4])  # zeros, subnormal-scale and outlier values
    lin = torch.nn.Linear(k, n, bias=False)
    rounded, qp = round_matrix(w, scheme, global_scale(w, scheme))
    attach_qparams(lin, scheme, qp, rounded)
    return compress_module_state(lin, group_format(scheme, None)), scheme


@pytest.mark.parametrize("name", sorted(SCHEMES))
@pytest.mark.parametrize("m", [1, 5, 33])
def test_matches_the_reference(name, m):
    n, k = 40, 96
    stored, scheme = _stored(name, n, k, seed=m)
    x = torch.randn(2, m, k, generator=torch.Generator().manual_seed(1))
    bias = torch.randn(n, generator=torch.Generator().manual_seed(2))
    out = on_device(float_dequant_matmul, x, stored, scheme, n, k, bias)
    w = dequantize_float(stored, (n, k), scheme, torch.float32)
    ref = x @ w.T + bias
    assert out.shape == (2, m, n) and out.dtype == torch.float32
    assert rel_err(out, ref) <= 1e-6
    # the decoded weight itself is exact: one-hot inputs read it back column by column
    eye = torch.eye(k)
    cols = on_device(float_dequant_matmul, eye, stored, scheme, n, k)
    assert torch.equal(cols.T, w)


def test_half_precision_inputs():
    stored, scheme = _stored("nvfp4", 24, 64)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    out = on_device(float_dequant_matmul, x, stored, scheme, 24, 64)
    ref = x.float() @ dequantize_float(stored, (24, 64), scheme, torch.bfloat16).float().T
    assert out.dtype == torch.bfloat16 and rel_err(out, ref) <= 1e-2


def test_bad_layouts_are_refused():
    stored, scheme = _stored("mxfp4", 24, 64)
    with pytest.raises(ValueError, match="do not fit weight"):
        float_dequant_matmul(torch.randn(2, 96), stored, scheme, 24, 96)
    with pytest.raises(ValueError, match="with K=64 features"):
        float_dequant_matmul(torch.randn(2, 32), stored, scheme, 24, 64)
    with pytest.raises(ValueError, match="runs FP8 with float scales, NVFP4 and MXFP4"):
        float_dequant_matmul(torch.randn(2, 64), stored, QuantScheme(bits=4, group_size=32), 24, 64)


@pytest.mark.parametrize("name", ["fp8", "nvfp4"])
def test_a_loaded_float_export_runs_on_the_kernel(name, tmp_path):
    from tests.helpers import tiny_llama

    from compressor import Recipe, compress, load_compressed, save_compressed
    from compressor.runtime.float_linear import FloatQuantLinear

    model = tiny_llama(hidden=64, inter=96)
    recipe = Recipe.from_dict({"passes": [{"rtn": {"scheme": SCHEMES[name].to_dict()}}]})
    compress(model, recipe, quiet=True)
    out = save_compressed(model, tmp_path / "e", recipe=recipe)
    ids = torch.randint(0, 96, (1, 7), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = load_compressed(out, backend="reference")(ids).logits
        kernel = load_compressed(out, backend="triton").to(DEVICE)
        assert isinstance(kernel.model.layers[0].mlp.up_proj, FloatQuantLinear)
        got = kernel(ids.to(DEVICE)).logits.cpu()
    assert rel_err(got, ref) <= 1e-5

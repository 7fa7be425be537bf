"""The Triton online Hadamard kernel against the torch butterfly (interpreter on CPU, compiled on a GPU)."""

from __future__ import annotations

import pytest
import torch
from tests.test_kernels._triton_setup import DEVICE, on_device, rel_err

from compressor.kernels.triton import hadamard as th
from compressor.core.hadamard import hadamard_transform
from compressor.runtime.online import OnlineHadamard

# the interpreter runs fp32 dots; compiled, two bf16 dots per product (about 2^-17 relative)
TOL = 1e-6 if DEVICE.type == "cpu" else 3e-5


@pytest.mark.parametrize("n,expected", [
    (64, (1, 64, 1)),  # a head dim: one power-of-two factor
    (576, (1, 16, 36)),  # SmolLM2 hidden: 16 x Paley 36
    (1536, (1, 128, 12)),  # SmolLM2 intermediate
    (4096, (64, 64, 1)),  # Llama hidden: two factors
    (14336, (16, 32, 28)),  # Llama intermediate: three factors
    (96, (1, 1, 96)),  # 8 x 12: the small power of two folded into the dense factor
    (12, (1, 1, 12)),
])
def test_matches_torch_butterfly(n, expected):
    assert th.plan(n) == expected
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(n)) * 30
    out = on_device(th.hadamard_transform, x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert rel_err(out, hadamard_transform(x.double())) <= TOL


def test_half_inputs_batched_and_strided():
    base = torch.randn(2, 3, 1152, generator=torch.Generator().manual_seed(1))
    x = base[..., ::2].to(torch.float16)  # (2, 3, 576), non-contiguous
    out = on_device(th.hadamard_transform, x)
    assert out.dtype == torch.float16 and out.shape == (2, 3, 576)
    want = hadamard_transform(x.double())
    assert rel_err(out, want) <= 1e-3  # fp16 output rounding
    assert on_device(th.hadamard_transform, x[:0]).shape == (0, 3, 576)


def test_sizes_without_a_plan_raise():
    assert th.plan(8) is None and th.plan(2 * 2**15) is None and th.plan(7) is None
    with pytest.raises(ValueError, match="no Triton Hadamard plan for size 8"):
        th.hadamard_transform(torch.randn(2, 8))
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        th.hadamard_transform(torch.randn(2, 64).double())


@pytest.mark.skipif(DEVICE.type != "cuda", reason="OnlineHadamard takes the kernel for CUDA half inputs")
def test_online_hadamard_uses_it_on_cuda():
    x = torch.randn(4, 1536, device="cuda", dtype=torch.bfloat16)
    out = OnlineHadamard(1536).cuda()(x)
    assert rel_err(out.cpu(), hadamard_transform(x.cpu().double())) <= 1e-2  # bf16 output rounding

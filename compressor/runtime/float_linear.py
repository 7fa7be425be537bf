"""The run-time linear layer of a float-format export (FP8, NVFP4, MXFP4): weights stay in their stored form."""

from __future__ import annotations

import torch
from torch import nn

from compressor.core import floats
from compressor.core.scheme import QParams, QuantScheme
from compressor.kernels.dispatch import FLOAT_BACKENDS, float_dequant_matmul
from compressor.kernels.reference import dequantize_float
from compressor.runtime.activations import INPUT_CHILD
from compressor.runtime.online import TRANSFORM_CHILD

__all__ = ["FloatQuantLinear", "FLOAT_BACKENDS"]

class FloatQuantLinear(nn.Module):
    """A linear layer whose weight stays FP8 or packed FP4; ``forward`` dequantizes it and multiplies.

    Buffers (compressed-tensors names, :mod:`compressor.export.compressed_tensors`): FP8 ``weight``
    float8_e4m3fn (N, K) and ``weight_scale`` (N, G); NVFP4 ``weight_packed`` uint8 (N, K/2), ``weight_scale``
    float8_e4m3fn (N, K/16) and ``weight_global_scale`` float32 (1,); MXFP4 ``weight_packed`` and ``weight_scale``
    uint8 (N, K/32). Input (..., K) → output (..., N) in the input's dtype.

    ``backend`` (:func:`compressor.kernels.dispatch.float_dequant_matmul`): ``"auto"`` runs the Triton kernel,
    which decodes the stored codes in registers, on CUDA and the torch reference elsewhere; ``"reference"`` and
    ``"triton"`` force one. Optional children ``input_transform`` and ``input_quantizer`` run first, as on :class:`QuantLinear`.
    """

    def __init__(self, in_features: int, out_features: int, scheme: QuantScheme, *, bias: bool = False,
                 dtype: torch.dtype = torch.float32, backend: str = "auto"):
        super().__init__()
        if not scheme.is_float:
            raise ValueError(f"{scheme.describe()} is an integer scheme: use QuantLinear")
        if backend not in FLOAT_BACKENDS:
            raise ValueError(f"backend={backend!r}: float formats ({scheme.describe()}) run on one of {FLOAT_BACKENDS}")
        self.in_features, self.out_features, self.scheme, self.dtype = in_features, out_features, scheme, dtype
        self.backend = backend
        n, k = out_features, in_features
        groups = -(-k // scheme.group_width(k))
        if scheme.bits == 8:
            rows = scheme.scale_rows(n)  # FP8 blocks: a scale per block (per tensor: one)
            self.register_buffer("weight", torch.empty(n, k, dtype=torch.float8_e4m3fn))
            shape = (1,) if scheme.per_tensor else (rows, groups)  # per tensor: compressed-tensors' (1,)
            self.register_buffer("weight_scale", torch.empty(shape, dtype=dtype))
        else:
            self.register_buffer("weight_packed", torch.empty(n, k // 2, dtype=torch.uint8))
            e4m3 = scheme.scale_format == "e4m3"
            self.register_buffer("weight_scale", torch.empty(n, groups, dtype=torch.float8_e4m3fn if e4m3 else torch.uint8))
            if e4m3:
                self.register_buffer("weight_global_scale", torch.empty(1, dtype=torch.float32))
        self.bias = nn.Parameter(torch.empty(n, dtype=dtype), requires_grad=False) if bias else None

    def stored(self) -> dict[str, torch.Tensor]:
        """The stored tensors by compressed-tensors name."""
        return {k: v for k, v in self._buffers.items() if v is not None}

    def qparams(self) -> QParams:
        """The in-memory parameters (:class:`compressor.core.scheme.QParams`) of the stored scales: (N, G) in the
        layer's dtype (FP8) or float32 (E4M3 scales with the global scale; E8M0 decoded to powers of two)."""
        if self.scheme.bits == 8:
            scale = self.weight_scale.detach().clone()
            if self.scheme.block_rows is not None:
                rows = self.scheme.rows_per_scale(self.out_features)
                scale = scale.reshape(-1, scale.shape[-1]).repeat_interleave(rows, dim=0)[: self.out_features]
            return QParams(scale, None)
        if self.scheme.scale_format == "e4m3":
            return QParams(self.weight_scale.float(), None, self.weight_global_scale.detach().float().clone())
        return QParams(floats.e8m0_decode(self.weight_scale), None)

    def dequantized_weight(self) -> torch.Tensor:
        """(N, K) float weight in the layer's dtype."""
        return dequantize_float(self.stored(), (self.out_features, self.in_features), self.scheme, self.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) → (..., N)."""
        transform = self._modules.get(TRANSFORM_CHILD)
        if transform is not None:
            x = transform(x)
        quantizer = self._modules.get(INPUT_CHILD)
        if quantizer is not None:
            x = quantizer(x)
        return float_dequant_matmul(x, self.stored(), (self.out_features, self.in_features), self.scheme,
                                    None if self.bias is None else self.bias.to(x.dtype),
                                    backend=getattr(self, "backend", "auto"))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.describe()}"

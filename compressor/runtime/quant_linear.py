"""The run-time linear layer of a loaded export: weights stay packed, ``forward`` runs a dequant-matmul kernel."""

from __future__ import annotations

import torch
from torch import nn

from compressor.core.pack import packed_width
from compressor.core.scheme import QuantScheme, num_groups
from compressor.kernels import dispatch
from compressor.kernels.reference import dequantize_packed
from compressor.runtime.activations import INPUT_CHILD
from compressor.runtime.online import TRANSFORM_CHILD

__all__ = ["QuantLinear"]


class QuantLinear(nn.Module):
    """A linear layer whose weight stays packed; ``forward`` runs a dequant-matmul kernel.

    Buffers (compressed-tensors names): ``weight_packed`` int32 (N, ceil(K*b/32)),
    ``weight_scale`` (N, G), ``weight_zero_point`` int32 (ceil(N*b/32), G) when
    asymmetric, ``weight_shape`` int64 (2,), ``weight_g_idx`` int32 (K,) with
    activation order. Input (..., K) → output (..., N) in the input's dtype.

    Optional children, as on a compressed ``nn.Linear``: ``input_transform``
    (an online rotation, R4) runs first, then ``input_quantizer`` (per-token
    fake quantization), then the kernel.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        scheme: QuantScheme,
        *,
        bias: bool = False,
        actorder: bool = False,
        dtype: torch.dtype = torch.float32,
        backend: str = "auto",
    ):
        super().__init__()
        self.in_features, self.out_features, self.scheme, self.backend = in_features, out_features, scheme, backend
        groups = num_groups(in_features, scheme.group_width(in_features))
        self.register_buffer("weight_packed", torch.empty(out_features, packed_width(in_features, scheme.bits), dtype=torch.int32))
        self.register_buffer("weight_scale", torch.empty(out_features, groups, dtype=dtype))
        self.register_buffer("weight_shape", torch.tensor([out_features, in_features], dtype=torch.int64))
        zp = None if scheme.symmetric else torch.empty(packed_width(out_features, scheme.bits), groups, dtype=torch.int32)
        self.register_buffer("weight_zero_point", zp)
        self.register_buffer("weight_g_idx", torch.empty(in_features, dtype=torch.int32) if actorder else None)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=dtype), requires_grad=False) if bias else None
        self._kernel_cache: dict = {}  # a backend's repacked copy of the weight (CPU int4 / int8 paths), keyed by tensor versions

    def dequantized_weight(self) -> torch.Tensor:
        """(N, K) float weight in the scale dtype."""
        return dequantize_packed(
            self.weight_packed, self.weight_scale, self.weight_zero_point,
            (self.out_features, self.in_features), self.scheme, self.weight_g_idx,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) → (..., N)."""
        transform = self._modules.get(TRANSFORM_CHILD)
        if transform is not None:  # R4 first: the quantizer below sees x Q, the input the fused weight expects
            x = transform(x)
        quantizer = self._modules.get(INPUT_CHILD)
        if quantizer is not None:
            x = quantizer(x)
        return dispatch.dequant_matmul(
            x, self.weight_packed, self.weight_scale, self.weight_zero_point,
            (self.out_features, self.in_features), self.scheme, self.weight_g_idx, self.bias,
            backend=self.backend, cache=self._kernel_cache,
        )

    def keep_dequantized(self, keep: bool = True) -> None:
        """Keep the dequantized (N, K) weight between calls on the reference backend: the same numbers, computed once,
        at the cost of a full-precision copy of the weight (for evaluating many short forwards, e.g. greedy decoding)."""
        if keep:
            self._kernel_cache["keep_dense"] = True
        else:
            for key in ("keep_dense", "dense", "dense_key"):
                self._kernel_cache.pop(key, None)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, {self.scheme.describe()}"

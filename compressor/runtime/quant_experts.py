"""The run-time fused-experts module of a loaded MoE export: each expert's linears stay packed."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from compressor.core.scheme import QuantScheme
from compressor.runtime.float_linear import FloatQuantLinear
from compressor.runtime.quant_linear import QuantLinear

__all__ = ["QuantExperts"]


class QuantExperts(nn.ModuleList):
    """Fused MoE experts as one :class:`QuantLinear` (integer schemes) or :class:`FloatQuantLinear` (FP8, MXFP4)
    per expert and projection, run expert by expert.

    Child ``e`` holds ``gate``, ``up`` and ``down`` under the family's checkpoint names
    (``gate_proj`` / ``up_proj`` / ``down_proj``, Mixtral ``w1`` / ``w3`` / ``w2``), so the
    export's ``{experts}.{e}.{name}.weight_packed`` tensors load into it by name.
    ``forward`` has the signature of transformers' fused experts (``gate_up_proj`` /
    ``down_proj`` layout): ``act(x Wg[e]ᵀ) * (x Wu[e]ᵀ)`` then ``Wd[e]``, weighted by the
    router and summed over each token's experts.

    Args:
        num_experts: E.
        hidden_size: H, the input and output width.
        intermediate_size: I, the width of each expert's gate and up projections.
        scheme: the weight scheme of every expert.
        names: the checkpoint names of the gate, up and down projections.
        act_fn: the activation of the gate.
        dtype: scale and activation dtype.
        backend: dequant-matmul backend (:mod:`compressor.kernels.dispatch`).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, scheme: QuantScheme, *,
                 names: tuple[str, str, str], act_fn: Callable[[torch.Tensor], torch.Tensor],
                 dtype: torch.dtype = torch.float32, backend: str = "auto"):
        shapes = ((hidden_size, intermediate_size), (hidden_size, intermediate_size), (intermediate_size, hidden_size))
        layer = FloatQuantLinear if scheme.is_float else QuantLinear
        super().__init__(
            nn.ModuleDict({name: layer(k, n, scheme, dtype=dtype, backend=backend)
                           for name, (k, n) in zip(names, shapes)})
            for _ in range(num_experts))
        self.names, self.act_fn = names, act_fn

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
                ) -> torch.Tensor:
        """hidden_states (T, H), top_k_index (T, k) int64 experts, top_k_weights (T, k) → (T, H)."""
        gate, up, down = self.names
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            if not 0 <= e < len(self):
                continue  # a padding index (routers may mark dropped slots with E)
            token, slot = torch.where(top_k_index == e)
            x = hidden_states[token]
            expert = self[e]
            y = expert[down](self.act_fn(expert[gate](x)) * expert[up](x))
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out

    def extra_repr(self) -> str:
        first = self[0][self.names[0]] if len(self) else None
        return f"experts={len(self)}" + (f", {first.scheme.describe()}" if first is not None else "")

"""Dropping whole MoE experts: per-expert scores from calibration tokens, and the slicing of router and experts.

Two scores, both from the tokens the router actually sends each expert:

* ``"frequency"``: how many calibration tokens the router sends the expert (its load);
* ``"reap"``: REAP's router-weighted expert activation (Lasby et al., "REAP: Router-weighted Expert
  Activation Pruning", arXiv 2510.13999, eq. 9): the mean over the expert's routed tokens x of
  ``g_e(x) · ||f_e(x)||_2``, its gate weight times the norm of its output. An expert that is
  rarely chosen, chosen with a small weight, or adds little when chosen scores low.

An expert no calibration token reached scores 0 under both.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from compressor.core.arch import EXPERT_COUNT_KEYS, ROUTER_EXPERT_BUFFERS, experts_layout

__all__ = ["EXPERT_SCORES", "ExpertScoreAccumulator", "keep_experts", "remove_experts"]

EXPERT_SCORES = ("reap", "frequency")


class ExpertScoreAccumulator:
    """Running per-expert routed-token counts and REAP sums of one fused-experts module.

    Attributes:
        tokens: (E,) int64, calibration tokens routed to each expert.
        reap_sum: (E,) float64, the sum over those tokens of ``g_e(x) ||f_e(x)||_2``.
    """

    def __init__(self, n_experts: int):
        self.tokens = torch.zeros(n_experts, dtype=torch.int64)
        self.reap_sum = torch.zeros(n_experts, dtype=torch.float64)

    def add(self, module: nn.Module, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
        """Add one forward of the experts module.

        Args:
            module: the fused-experts module (a layout :func:`compressor.core.arch.experts_layout` knows).
            x: (T, H) the tokens it receives.
            index: (T, k) int64, each token's chosen experts.
            weights: (T, k) float, their router weights.
        """
        layout = experts_layout(module)
        with torch.no_grad():
            for e in range(self.tokens.shape[0]):
                hit = index == e  # (T, k)
                routed = hit.any(-1)  # (T,)
                count = int(routed.sum())
                if not count:
                    continue
                tokens = x[routed]
                gate = (weights * hit).sum(-1)[routed].double()  # (t,) the router weight of e for each token
                out = F.linear(layout.inputs(module, e, tokens)["down_proj"], module.down_proj[e])  # (t, H)
                self.tokens[e] += count
                self.reap_sum[e] += float((gate * out.double().norm(dim=-1)).sum())

    def scores(self, score: str) -> torch.Tensor:
        """(E,) float64 scores, higher = keep: ``"frequency"`` (token counts) or ``"reap"`` (mean router-weighted
        output norm over routed tokens; 0 for an expert no token reached)."""
        if score == "frequency":
            return self.tokens.double()
        if score == "reap":
            return self.reap_sum / self.tokens.clamp(min=1).double()
        raise ValueError(f"score={score!r}: use one of {EXPERT_SCORES}")


def keep_experts(scores: torch.Tensor, remove: int) -> torch.Tensor:
    """Indices (ascending) of the experts kept when the ``remove`` lowest-scored are dropped; ties drop the
    higher index first.

    Args:
        scores: (E,) float, higher = keep.
        remove: how many to drop, in [0, E).
    """
    n = scores.shape[0]
    if not 0 <= remove < n:
        raise ValueError(f"cannot remove {remove} of {n} experts")
    order = sorted(range(n), key=lambda e: (-float(scores[e]), e))  # best first, lower index on ties
    return torch.tensor(sorted(order[: n - remove]), dtype=torch.int64)


def remove_experts(router: nn.Module, experts: nn.Module, keep: torch.Tensor) -> None:
    """Keep only experts ``keep`` (ascending indices): slices the fused parameters (E, N, K), the router's
    (E, H) weight and its (E,) buffers, and updates both modules' expert counts, in place."""
    keep = keep.to(torch.int64)
    for pname, _ in experts_layout(experts).params:
        param = getattr(experts, pname)
        setattr(experts, pname, nn.Parameter(param.data[keep.to(param.device)].clone(),
                                             requires_grad=param.requires_grad))
    router.weight = nn.Parameter(router.weight.data[keep.to(router.weight.device)].clone(),
                                 requires_grad=router.weight.requires_grad)
    for name in ROUTER_EXPERT_BUFFERS:
        buf = router._buffers.get(name)
        if buf is not None:
            router._buffers[name] = buf[keep.to(buf.device)].clone()
    for module in (router, experts):
        for key in EXPERT_COUNT_KEYS:
            if isinstance(getattr(module, key, None), int):
                setattr(module, key, len(keep))

"""QSUR, OSTQuant's quantization space utilization rate of activations (arXiv 2501.13987, §3), and its per-layer report."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

__all__ = ["qsur", "qsur_means", "qsur_report"]


def qsur(x: torch.Tensor) -> float:
    """Dimension-normalized quantization space utilization rate of activations ``x`` (OSTQuant §3).

    With the second-moment matrix ``M = xᵀx / n`` (eigenvalues λ_i), the data
    fill an ellipsoid with semi-axes ∝ √λ_i, and a per-token grid must cover
    the hypercube whose half-side is the largest per-channel spread
    ``max_j √M_jj``. The paper's QSUR is the ratio of the two volumes; this
    returns its d-th root divided by that of the ball-in-cube ratio::

        qsur = exp(mean_i log √λ_i) / max_j √M_jj    ∈ (0, 1]

    so 1 means an isotropic distribution (M ∝ I), an orthogonal transform can
    at best equalize the diagonal (qsur = geomean(√λ) / √mean(λ)), and only a
    scaling changes the eigenvalues. The uncentred moment is used because a
    symmetric per-token grid covers |x|, means included.

    Args:
        x: (n, d) float activations, n ≥ d rows (tokens) for a full-rank M.

    Returns:
        The ratio as a float (eigenvalues below 1e-12 · max are clamped there).
    """
    if x.ndim != 2:
        raise ValueError(f"qsur expects (tokens, channels), got shape {tuple(x.shape)}")
    x = x.double()
    m = x.T @ x / x.shape[0]  # (d, d)
    lam = torch.linalg.eigvalsh(m)
    lam = lam.clamp(min=max(lam.max().item(), 1e-300) * 1e-12)
    return math.exp(0.5 * lam.log().mean().item()) / math.sqrt(m.diagonal().max().item())


def qsur_means(rows: list[dict]) -> dict[str, float]:
    """Mean QSUR over the blocks, per input kind (``qkv``, ``o``, ``gate_up``, ``down``) and over all (``all``)."""
    kinds: dict[str, list[float]] = {}
    for r in rows:
        kinds.setdefault(r["input"], []).append(r["qsur"])
    out = {k: round(sum(v) / len(v), 6) for k, v in kinds.items()}
    out["all"] = round(sum(r["qsur"] for r in rows) / len(rows), 6)
    return out


@torch.no_grad()
def qsur_report(model: nn.Module, ids: torch.Tensor, linears: dict[str, tuple[int, str]],
                 body: tuple | None = None) -> list[dict]:
    """QSUR of the inputs of q_proj (= k, v), o_proj, up_proj (= gate) and down_proj in every block.

    With ``body = (body, params, r1, emb)`` the model runs with those
    transformed (unfused) parameters instead of its own.
    """
    captured: dict[str, list[torch.Tensor]] = {n: [] for n in linears}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(
        lambda mod, args, n=n: captured[n].append(args[0].detach().reshape(-1, args[0].shape[-1]).float()))
        for n in linears]
    try:
        dev = model.get_input_embeddings().weight.device
        for row in ids:
            if body is None:
                model(row[None].to(dev), use_cache=False)
            else:
                b, params, r1, emb = body
                x = F.embedding(row[None].to(dev), emb.weight).float() @ r1
                functional_call(b, params, args=(), kwargs={"inputs_embeds": x, "use_cache": False})
    finally:
        for h in hooks:
            h.remove()
    kinds = {"q": "qkv", "o": "o", "up": "gate_up", "down": "down"}
    return [{"layer": i, "input": kinds[k], "qsur": round(qsur(torch.cat(captured[n])), 6)}
            for n, (i, k) in sorted(linears.items(), key=lambda kv: (kv[1][0], kv[1][1]))]


# ---------------------------------------------------------------- recipe pass

"""Activation-aware weight scaling (AWQ; Lin et al., "AWQ: Activation-aware Weight Quantization", MLSys 2024).

Input channels that carry large activations matter most to a linear's output, yet rounding treats every
weight alike. AWQ multiplies the weight columns of such channels by ``s > 1`` and divides the producer of the
input (the norm before q/k/v, or the linear before o_proj / down_proj) by ``s``: the full-precision function is
unchanged, and the salient weights sit on a relatively finer grid. The scales are
``s = mean|x|^alpha`` (optionally ``/ mean|w|^(1 - alpha)``, llm-compressor's ``duo_scaling``), normalised so
that ``max(s) * min(s) = 1``, with ``alpha`` searched on a grid for the lowest output error of the linears that
read the input.

The output error of reader ``W`` (N, K) under scales ``s`` is measured through the input's second moment
``H = 2/n sum x x^T`` (K, K), the same statistic GPTQ accumulates:
``err = tr(E H E^T)``, ``E = Q(W diag(s)) diag(1/s) - W``, ``Q`` the round-to-nearest of the weight grid that
follows. The original AWQ evaluates the parent module's output (the attention or MLP block); the linear outputs
are this implementation's cheaper proxy, one (K, K) matrix per input instead of the block's activations.
"""

from __future__ import annotations

import torch

from compressor.core.scheme import QuantScheme, compute_qparams, fake_quant

__all__ = ["awq_scales", "scaled_error", "search_scales"]


def awq_scales(act_mean: torch.Tensor, alpha: float, weight_mean: torch.Tensor | None = None) -> torch.Tensor:
    """AWQ's per-channel scales for one ``alpha``: (K,) float64, ``max * min = 1``.

    Args:
        act_mean: (K,) mean |x| of each input channel over the calibration tokens.
        alpha: the exponent, in [0, 1] (0: no scaling).
        weight_mean: (K,) mean |w| of each column over the readers (its max-normalised magnitude), for
            ``duo_scaling``; None scales by the activations alone.
    """
    a = act_mean.double().clamp(min=1e-4)
    s = a.pow(alpha)
    if weight_mean is not None:
        s = s / weight_mean.double().clamp(min=1e-4).pow(1 - alpha)
    s = s.clamp(min=1e-4)
    return s / (s.max() * s.min()).sqrt()


def scaled_error(weights: list[torch.Tensor], H: torch.Tensor, s: torch.Tensor, scheme: QuantScheme) -> float:
    """Summed output error ``tr(E H E^T)`` of the readers ``weights`` ((N_i, K) each) quantized with their
    columns scaled by ``s`` (K,) and unscaled after rounding; ``H`` (K, K) float32."""
    total = 0.0
    sf = s.float()
    for w in weights:
        ws = w.float() * sf
        q = fake_quant(ws, compute_qparams(ws, scheme), scheme) / sf
        e = q - w.float()
        total += float(((e @ H) * e).sum())
    return total


def search_scales(weights: list[torch.Tensor], H: torch.Tensor, act_mean: torch.Tensor, scheme: QuantScheme,
                  grid: int = 20, duo_scaling: bool = False) -> tuple[torch.Tensor, float, dict]:
    """The scales of the ``alpha`` in ``{0, 1/grid, ..., 1}`` with the lowest :func:`scaled_error`.

    Args:
        weights: the (N_i, K) weights of the linears reading the input (e.g. q, k and v).
        H: (K, K) float32 second moment of the input.
        act_mean: (K,) mean |x| per input channel.
        scheme: the weight grid of the pass that follows (RTN, GPTQ, AdaRound round to it).
        grid: number of steps between alpha 0 and 1.
        duo_scaling: divide by the weights' column magnitude too (see :func:`awq_scales`).

    Returns:
        ``(s (K,) float64, alpha, {"error": best, "error_unscaled": alpha 0's})``; alpha 0 (no scaling) wins
        unless another alpha lowers the error.
    """
    if grid < 1:
        raise ValueError(f"awq grid={grid}: use a positive number of alpha steps, e.g. 20")
    w_mean = None
    if duo_scaling:
        cat = torch.cat([w.float().abs() / w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
                         for w in weights])
        w_mean = cat.mean(dim=0)
    base = scaled_error(weights, H, torch.ones_like(act_mean, dtype=torch.float64), scheme)
    best = (base, 0.0, torch.ones_like(act_mean, dtype=torch.float64))
    for i in range(1, grid + 1):
        alpha = i / grid
        s = awq_scales(act_mean, alpha, w_mean)
        err = scaled_error(weights, H, s, scheme)
        if err < best[0]:
            best = (err, alpha, s)
    return best[2], best[1], {"error": best[0], "error_unscaled": base}

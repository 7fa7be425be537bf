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

When the inputs are quantized too (W4A4 NVFP4 / MXFP4, W8A8 FP8), the same scales are SmoothQuant's migration
(Xiao et al., ICML 2023): dividing a channel by ``s`` shrinks it in the input's grid as it grows in the weight's.
:func:`quantized_input_error` then measures the readers' output error on a sample of input tokens with both
quantized, ``|| Q_a(x / s) Q(W diag(s))^T - x W^T ||^2``, so the search weighs the two roundings against each
other instead of the weight's alone.
"""

from __future__ import annotations

import torch

from compressor.core.fake_quant import activation_static_scales, fake_quant_float_per_token
from compressor.core.scheme import QuantScheme, compute_qparams, fake_quant

__all__ = ["STATISTICS", "awq_scales", "quantized_input_error", "scaled_error", "search_scales"]

STATISTICS = ("mean", "max")  # the channel magnitude the scales are a power of: AWQ's mean, SmoothQuant's max


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


def quantized_input_error(weights: list[torch.Tensor], x: torch.Tensor, s: torch.Tensor, scheme: QuantScheme,
                          inputs: str, reference: list[torch.Tensor] | None = None) -> float:
    """Summed squared output error of the readers with quantized inputs and weights under scales ``s``.

    ``sum_i || Q_a(x diag(1/s)) Q(W_i diag(s))^T - x W_i^T ||_F^2 / T``: the inputs divided by ``s`` and rounded
    to the input format, each weight's columns multiplied by ``s`` and rounded to ``scheme``.

    Args:
        weights: the (N_i, K) readers.
        x: (T, K) float32 sample of the input tokens.
        s: (K,) scales (float64; ones for no scaling).
        scheme: the weight grid.
        inputs: the input format (``"nvfp4"``, ``"mxfp4"``, ``"fp8"``...).
        reference: the full-precision outputs ``x W_i^T`` ((T, N_i) each), when already computed.
    """
    sf = s.float().to(x.device)
    xs = x / sf  # its static scales (NVFP4's global scale) from its own largest |x|, as calibration takes them
    xq = fake_quant_float_per_token(xs, inputs, *activation_static_scales(inputs, xs.abs().amax()))
    total = 0.0
    for i, w in enumerate(weights):
        ws = w.float() * sf
        wq = fake_quant(ws, compute_qparams(ws, scheme), scheme)
        ref = reference[i] if reference is not None else x @ w.float().T
        total += float(((xq @ wq.T - ref) ** 2).sum())
    return total / max(x.shape[0], 1)


def search_scales(weights: list[torch.Tensor], H: torch.Tensor, act_mean: torch.Tensor, scheme: QuantScheme,
                  grid: int = 20, duo_scaling: bool = False, *, x: torch.Tensor | None = None,
                  inputs: str | None = None, statistic: str = "mean",
                  tie: torch.Tensor | None = None) -> tuple[torch.Tensor, float, dict]:
    """The scales of the ``alpha`` in ``{0, 1/grid, ..., 1}`` with the lowest error: :func:`scaled_error`, or
    with ``inputs`` :func:`quantized_input_error` on the token sample ``x``.

    Args:
        weights: the (N_i, K) weights of the linears reading the input (e.g. q, k and v).
        H: (K, K) float32 second moment of the input.
        act_mean: (K,) mean |x| per input channel (its largest |x| with ``statistic="max"``).
        scheme: the weight grid of the pass that follows (RTN, GPTQ, AdaRound round to it).
        grid: number of steps between alpha 0 and 1.
        duo_scaling: divide by the weights' column magnitude too (see :func:`awq_scales`).
        x: (T, K) float32 sample of the input tokens, needed with ``inputs``.
        inputs: the float format the inputs are quantized to after this pass (``"nvfp4"``...), or None
            (weight-only: the Hessian error).
        statistic: ``"mean"`` (AWQ; ``act_mean`` is each channel's mean |x|, and ``duo_scaling`` divides by
            the columns' mean max-normalised |w|) or ``"max"`` (SmoothQuant; ``act_mean`` is each channel's
            largest |x|, and ``duo_scaling`` divides by the columns' largest |w| over the readers).
        tie: (K,) int64, the producer channel each input channel is a copy of, when the producer has fewer
            outputs than the readers have inputs (v's rows under grouped-query attention, each read by every
            query head of its group): the statistics are pooled over each producer channel (mean or max, as
            ``statistic``) and every copy gets its channel's scale. None: one to one.

    Returns:
        ``(s (K,) float64, alpha, {"error": best, "error_unscaled": alpha 0's})`` (with ``tie``, ``s`` equal on
        the copies of a producer channel); alpha 0 (no scaling) wins
        unless another alpha lowers the error.
    """
    if grid < 1:
        raise ValueError(f"awq grid={grid}: use a positive number of alpha steps, e.g. 20")
    if inputs is not None:
        if x is None or x.shape[0] == 0:
            raise ValueError(f"awq with inputs={inputs!r} needs a sample of the input tokens (x)")
        xf = x.float()
        reference = [xf @ w.float().T for w in weights]

        def error(s: torch.Tensor) -> float:
            return quantized_input_error(weights, xf, s, scheme, inputs, reference)
    else:
        def error(s: torch.Tensor) -> float:
            return scaled_error(weights, H, s, scheme)
    if statistic not in STATISTICS:
        raise ValueError(f"awq statistic={statistic!r}: use one of {', '.join(STATISTICS)}")
    w_mean = None
    if duo_scaling and statistic == "max":
        w_mean = torch.stack([w.float().abs().amax(dim=0) for w in weights]).amax(dim=0)
    elif duo_scaling:
        cat = torch.cat([w.float().abs() / w.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-12)
                         for w in weights])
        w_mean = cat.mean(dim=0)
    act = act_mean
    if tie is not None:
        tie = tie.to(act_mean.device)
        act = _pool(act_mean, tie, statistic)
        w_mean = None if w_mean is None else _pool(w_mean.to(act_mean.device), tie, statistic)
    base = error(torch.ones_like(act_mean, dtype=torch.float64))
    best = (base, 0.0, torch.ones_like(act_mean, dtype=torch.float64))
    for i in range(1, grid + 1):
        alpha = i / grid
        s = awq_scales(act, alpha, w_mean)
        if tie is not None:
            s = s[tie]
        err = error(s)
        if err < best[0]:
            best = (err, alpha, s)
    return best[2], best[1], {"error": best[0], "error_unscaled": base}


def _pool(values: torch.Tensor, tie: torch.Tensor, statistic: str) -> torch.Tensor:
    """(K,) per-input ``values`` pooled onto the producer channels ``tie`` points at: (P,) their mean, or their
    max with ``statistic="max"``, ``P = tie.max() + 1``."""
    out = torch.zeros(int(tie.max()) + 1, dtype=values.dtype, device=values.device)
    return out.scatter_reduce(0, tie, values, reduce="amax" if statistic == "max" else "mean", include_self=False)

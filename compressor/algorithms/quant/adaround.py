"""AdaRound (Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", arXiv 2004.10568).

Each weight learns whether to round down or up: ``W~ = s * clamp(floor(W/s) + h(V) + zp) - zp)``
with the rectified sigmoid ``h(V) = clamp(sigmoid(V) (zeta - gamma) + gamma, 0, 1)``
(eq. 23), trained to reconstruct the layer output on calibration inputs with the
regulariser ``sum 1 - |2 h(V) - 1|^beta`` (eq. 24), beta annealed from 20 to 2
after a warm-up; then ``h`` is rounded to {0, 1}.

The maths works on any layer whose forward is ``f(x, W)`` (linear, HF Conv1D,
Conv2d of any groups): :func:`adaround_quantize` takes the weight in its
quantization view (N, K) and a function computing the layer output from that view.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable

import torch

from compressor.core.passes import PassConfig
from compressor.core import floats
from compressor.core.scheme import QParams, QuantScheme, cast_params, compute_qparams, dequantize, group_index

__all__ = ["AdaRoundConfig", "AdaRoundResult", "SoftRounding", "adaround_quantize", "optimise_rounding"]

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (paper, sec. 4)


@dataclass(frozen=True, kw_only=True)
class AdaRoundConfig(PassConfig):
    """AdaRound settings (defaults sized for a CPU run on SmolLM2-135M).

    Attributes:
        scheme: the weight grid (its observer initialises the scales).
        iters: optimisation steps per layer (the paper uses 10k-20k on GPU).
        batch_size: rows per step: tokens for linears, output positions (one
            receptive-field patch each) for convolutions.
        lr: Adam learning rate for V.
        reg_weight: lambda of the rounding regulariser (the reconstruction term is
            normalised by plain rounding's error, the regulariser averaged per weight).
        beta_start, beta_end: annealing range of beta.
        warmup: fraction of steps without the regulariser.
        learn_scale: also learn the per-group scales (Adam, ``scale_lr``).
        scale_lr: learning rate of the log-scales.
        max_samples: rows (tokens / output positions) sampled once per layer
            from the calibration inputs; the steps draw from them.
        asymmetric: reconstruct the full-precision model's layer output (its
            own inputs through the original weight) from the compressed
            model's inputs, the paper's asymmetric reconstruction (eq. 25), so
            each layer also corrects the error of the layers before it.
            ``False`` reconstructs ``W x`` on the compressed model's inputs.
            Layer granularity only (block granularity always targets the
            full-precision block output). Measured: on EfficientNet-Lite0 W4
            per-channel (with BN folded) it gave 0.84 top-1 agreement; on
            SmolLM2 with a tiny calibration set (8 x 128 tokens, 50 steps) it was
            worse than ``False`` (perplexity 32.4 vs 29.5), hence off by default.
        granularity: ``"layer"`` (each layer on its own, the paper) or ``"block"``
            (all targeted layers of a decoder block against the full-precision
            block output; ``batch_size`` then counts tokens per step).
        seed: seed of the row sampling.
    """

    scheme: QuantScheme = field(default_factory=QuantScheme)
    iters: int = 400
    batch_size: int = 512
    lr: float = 1e-2
    reg_weight: float = 1.0
    beta_start: float = 20.0
    beta_end: float = 2.0
    warmup: float = 0.2
    learn_scale: bool = False
    scale_lr: float = 1e-4
    max_samples: int = 8192
    asymmetric: bool = False
    granularity: str = "layer"
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iters < 0 or self.batch_size < 1 or self.max_samples < 1:
            raise ValueError("adaround: iters >= 0, batch_size >= 1 and max_samples >= 1 are required")
        if not 0 <= self.warmup < 1 or self.beta_start < self.beta_end or self.beta_end <= 0:
            raise ValueError("adaround: need 0 <= warmup < 1 and beta_start >= beta_end > 0")
        if self.granularity not in ("layer", "block"):
            raise ValueError(f"adaround: granularity={self.granularity!r}: use 'layer' or 'block'")
        if self.lr <= 0 or self.reg_weight < 0:
            raise ValueError("adaround: lr must be > 0 and reg_weight >= 0")
        if self.scheme.is_float and self.learn_scale:
            raise ValueError(f"adaround: {self.scheme.describe()} stores its scales in its own format (FP8 / E4M3 / "
                             "E8M0): set learn_scale: false")


@dataclass(frozen=True)
class AdaRoundResult:
    """weight (N, K) on the grid, codes (N, K) int8, qparams (N, G), final reconstruction error (per sample)."""

    weight: torch.Tensor
    codes: torch.Tensor
    qparams: QParams
    recon_mse: float


def _h(v: torch.Tensor) -> torch.Tensor:
    """Rectified sigmoid, eq. 23."""
    return torch.clamp(torch.sigmoid(v) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _beta(step: int, iters: int, cfg: AdaRoundConfig) -> float:
    start = cfg.warmup * iters
    t = (step - start) / max(iters - start, 1)
    return cfg.beta_end + 0.5 * (cfg.beta_start - cfg.beta_end) * (1 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


class SoftRounding:
    """Learnable rounding of one weight matrix in its (N, K) quantization view.

    ``soft()`` is the relaxed weight ``s * (clamp(floor(W/s) + h(V) + zp) - zp)``;
    ``nearest()`` the round-to-nearest weight it starts from; ``harden()`` the
    final on-grid weight with ``h`` rounded to 0 or 1.
    """

    def __init__(self, weight: torch.Tensor, scheme: QuantScheme, learn_scale: bool = False,
                 mask: torch.Tensor | None = None):
        if scheme.float_zero_point:
            raise ValueError("adaround supports zero_point='int' grids only")
        W = weight.detach().float()
        # (N, K) bool, True = kept: a pruned layer's zeros stay exact zeros (the zero point's code)
        self.keep = None if mask is None else mask.to(W.device)
        if self.keep is not None:
            W = W.masked_fill(~self.keep, 0.0)
        self.scheme, self.dtype = scheme, weight.dtype
        qp = compute_qparams(W, scheme)
        self.idx = group_index(W.shape[1], scheme.group_width(W.shape[1]), W.device)
        self.log_s = torch.log(qp.scale.float()).clone().requires_grad_(learn_scale)  # (N, G)
        self.zero_point = qp.zero_point
        self.zp = 0.0 if qp.zero_point is None else qp.zero_point.float()[:, self.idx]  # (N, K)
        ratio = W / qp.scale.float()[:, self.idx]
        self.floor = torch.floor(ratio)
        rest = (ratio - self.floor).clamp(0.01, 0.99)  # keep V finite at exact grid points
        self.V = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)  # h(V) = rest
        self.learn_scale = learn_scale
        # clamp(floor + up + zp, qmin, qmax) - zp for up in [0, 1] is base + up * step: base the clamped code
        # below minus zp, step 1 inside the grid and 0 where floor + zp lies at or past an end (two tensors
        # instead of a clamp, whose backward cost ~4 elementwise passes per step)
        lo = torch.clamp(self.floor + self.zp, scheme.qmin, scheme.qmax)
        self.step = torch.clamp(self.floor + self.zp + 1, scheme.qmin, scheme.qmax) - lo  # (N, K) 0 or 1
        self.base = lo - self.zp  # (N, K)
        # equal groups: the scales broadcast over a (N, G, width) view, whose backward is a sum (a gather's
        # backward is an index_put, ~5% of a block-wise step on SmolLM2); ragged ones gather by column
        width = scheme.group_width(W.shape[1])
        self._width = width if W.shape[1] % width == 0 else None

    def param_groups(self, cfg: AdaRoundConfig) -> list[dict]:
        groups = [{"params": [self.V], "lr": cfg.lr}]
        if self.learn_scale:
            groups.append({"params": [self.log_s], "lr": cfg.scale_lr})
        return groups

    def _weight(self, up: torch.Tensor) -> torch.Tensor:
        q = self.base + up * self.step  # clamp(floor + up + zp, qmin, qmax) - zp
        scale = torch.exp(self.log_s)
        if self._width is None:
            w = q * scale[:, self.idx]
        else:
            n, k = q.shape
            w = (q.view(n, -1, self._width) * scale.unsqueeze(-1)).view(n, k)
        return w if self.keep is None else w * self.keep

    def soft(self, h: torch.Tensor | None = None) -> torch.Tensor:
        """The relaxed weight (N, K) float32; ``h``: :func:`_h` of ``V`` when the caller has it already."""
        return self._weight(_h(self.V) if h is None else h)

    def nearest(self) -> torch.Tensor:
        return self._weight((_h(self.V) >= 0.5).float())

    def regulariser(self, beta: float, h: torch.Tensor | None = None) -> torch.Tensor:
        """sum of ``1 - |2 h(V) - 1|^beta`` (eq. 24), over the kept weights."""
        reg = 1 - (2 * (_h(self.V) if h is None else h) - 1).abs().pow(beta)
        return (reg if self.keep is None else reg * self.keep).sum()

    @torch.no_grad()
    def harden(self) -> tuple[torch.Tensor, QParams, torch.Tensor]:
        """(codes int8 (N, K), qparams (N, G), on-grid weight (N, K)) in the weight's dtype."""
        up = (_h(self.V) >= 0.5).float()
        codes = torch.clamp(self.floor + up + self.zp, self.scheme.qmin, self.scheme.qmax)
        if self.keep is not None:
            codes = torch.where(self.keep, codes, self.zp)
        codes = codes.to(torch.int8)
        zp = None if self.zero_point is None else self.zero_point.to(self.dtype)
        qparams = QParams(torch.exp(self.log_s).to(self.dtype), zp)
        return codes, qparams, dequantize(codes, qparams, self.scheme).to(self.dtype)


class FloatSoftRounding(SoftRounding):
    """Learnable rounding of one weight matrix on a float grid (FP8 E4M3, FP4 E2M1 of NVFP4 / MXFP4).

    The float grid is not uniform, so "down" and "up" are the two grid values around ``W / s`` (``s`` the
    group's effective scale): ``soft()`` is ``s * (lo + h(V) (hi - lo))``, ``h`` the rectified sigmoid as for
    integers, starting at the position of ``W / s`` between them; ``harden()`` takes ``lo`` or ``hi``. Values
    past the grid saturate at ±max (``lo = hi``). Scales are fixed (they are stored in the format's own
    precision); NVFP4 takes the global scale ``gscale`` (shared by fused siblings) when given. ``soft``,
    ``nearest`` and ``regulariser`` are :class:`SoftRounding`'s, over this ``_weight``.
    """

    learn_scale = False

    def __init__(self, weight: torch.Tensor, scheme: QuantScheme, mask: torch.Tensor | None = None,
                 gscale: torch.Tensor | None = None):
        W = weight.detach().float()
        self.keep = None if mask is None else mask.to(W.device)
        if self.keep is not None:
            W = W.masked_fill(~self.keep, 0.0)
        self.scheme, self.dtype = scheme, weight.dtype
        self.qparams = cast_params(compute_qparams(W, scheme, gscale=gscale), scheme, weight.dtype)
        idx = group_index(W.shape[1], scheme.group_width(W.shape[1]), W.device)
        self.eff = self.qparams.effective_scale().float()[:, idx]  # (N, K)
        mags = scheme.element.magnitudes().to(W.device, torch.float32)
        grid = torch.cat([-mags.flip(0)[:-1], mags])  # (2M - 1,) ascending, one zero
        ratio = (W / self.eff).clamp(-float(mags[-1]), float(mags[-1]))
        i = (torch.searchsorted(grid, ratio.contiguous(), right=True) - 1).clamp(0, grid.numel() - 1)
        self.lo, self.hi = grid[i], grid[(i + 1).clamp(max=grid.numel() - 1)]
        gap = self.hi - self.lo
        rest = torch.where(gap > 0, (ratio - self.lo) / gap.clamp_min(1e-30), torch.zeros_like(ratio))
        rest = rest.clamp(0.01, 0.99)
        self.V = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)

    def param_groups(self, cfg: AdaRoundConfig) -> list[dict]:
        return [{"params": [self.V], "lr": cfg.lr}]

    def _weight(self, up: torch.Tensor) -> torch.Tensor:
        w = (self.lo + up * (self.hi - self.lo)) * self.eff
        return w if self.keep is None else w * self.keep

    @torch.no_grad()
    def harden(self) -> tuple[torch.Tensor, QParams, torch.Tensor]:
        """(storage codes int8 (N, K), qparams (N, G), on-grid weight (N, K)) in the weight's dtype."""
        values = self.lo + (_h(self.V) >= 0.5).float() * (self.hi - self.lo)
        if self.keep is not None:
            values = torch.where(self.keep, values, torch.zeros_like(values))
        codes = floats.encode(self.scheme.element, values)
        return codes, self.qparams, dequantize(codes, self.qparams, self.scheme).to(self.dtype)


def soft_rounding(weight: torch.Tensor, scheme: QuantScheme, learn_scale: bool = False,
                  mask: torch.Tensor | None = None, gscale: torch.Tensor | None = None):
    """The :class:`SoftRounding` (integer grids) or :class:`FloatSoftRounding` (float grids) of one matrix."""
    if scheme.is_float:
        return FloatSoftRounding(weight, scheme, mask, gscale)
    return SoftRounding(weight, scheme, learn_scale, mask)


def optimise_rounding(
    roundings: list[SoftRounding],
    recon: Callable[[object, list[torch.Tensor]], torch.Tensor],
    sample: Callable[[torch.Generator], object],
    probe: object,
    cfg: AdaRoundConfig,
) -> None:
    """Adam on the rounding variables (and scales) of several layers at once.

    Loss: ``recon(pick, weights) / recon(probe, nearest weights)`` plus
    ``reg_weight`` times the regulariser averaged over all weights, beta
    annealed after ``warmup``. Normalising the reconstruction by plain
    rounding's error and averaging the regulariser per weight makes
    ``reg_weight`` independent of layer size and activation scale (the
    paper's sums, eq. 25, make lambda depend on both).

    Args:
        recon: reconstruction error of a sample given the layers' weights.
        sample: draws a sample (rows, batch indices) from a generator.
        probe: a fixed sample for the normalisation.
    """
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    total = sum(r.V.numel() for r in roundings)
    warm = int(cfg.warmup * cfg.iters)
    opt = torch.optim.Adam([g for r in roundings for g in r.param_groups(cfg)])
    with torch.enable_grad():  # the pipelines run under no_grad
        with torch.no_grad():
            norm = recon(probe, [r.nearest() for r in roundings]).clamp_min(1e-12)
        for step in range(cfg.iters):
            hs = [_h(r.V) for r in roundings]  # once per step, for the weights and the regulariser
            loss = recon(sample(gen), [r.soft(h) for r, h in zip(roundings, hs)]) / norm
            if step >= warm and cfg.reg_weight > 0:
                beta = _beta(step, cfg.iters, cfg)
                loss = loss + cfg.reg_weight * sum(r.regulariser(beta, h) for r, h in zip(roundings, hs)) / total
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def adaround_quantize(
    weight: torch.Tensor,
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    scheme: QuantScheme,
    cfg: AdaRoundConfig,
    mask: torch.Tensor | None = None,
    gscale: torch.Tensor | None = None,
) -> AdaRoundResult:
    """Learn the rounding of one layer.

    Args:
        weight: (N, K) weight in its quantization view (groups along K), float.
        forward: ``forward(x, w_view)`` → layer output, with ``w_view`` (N, K).
        inputs: (S, ...) calibration inputs of the layer; rows are sampled per step.
        targets: (S, ...) full-precision outputs for those inputs.
        scheme: integer grid (``zero_point="int"``) or a float grid (FP8, NVFP4, MXFP4; scales fixed).
        cfg: optimisation settings.
        mask: optional (N, K) bool, True = kept (a pruned layer): pruned weights stay exactly zero.
        gscale: NVFP4's global scale when it is shared with fused siblings.

    Returns:
        :class:`AdaRoundResult` with hard-rounded weights.
    """
    r = soft_rounding(weight, scheme, cfg.learn_scale, mask, gscale)
    rows = inputs.shape[0]

    def recon(pick, ws):
        return _recon(forward(inputs[pick], ws[0]), targets[pick])

    def sample(gen):
        return torch.randint(0, rows, (min(cfg.batch_size, rows),), generator=gen).to(inputs.device)

    probe = torch.arange(min(rows, 4 * cfg.batch_size), device=inputs.device)
    optimise_rounding([r], recon, sample, probe, cfg)
    codes, qparams, w_hat = r.harden()
    with torch.no_grad():
        mse = recon(probe, [w_hat.float()]).item()
    return AdaRoundResult(weight=w_hat, codes=codes, qparams=qparams, recon_mse=mse)


def _recon(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over output features (dim 1), averaged over samples and positions."""
    return (out.float() - target.float()).pow(2).sum(1).mean()

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
import torch.nn.functional as F
from torch import nn

from compressor.quant.scheme import QParams, QuantScheme, compute_qparams, dequantize, group_index
from compressor.quant.state import attach_qparams
from compressor.recipe import Pass, PassConfig, register_pass, select_modules

__all__ = ["AdaRoundConfig", "AdaRoundPass", "AdaRoundResult", "adaround_quantize", "layer_view"]

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1  # stretch of the rectified sigmoid (paper, sec. 4)


@dataclass(frozen=True, kw_only=True)
class AdaRoundConfig(PassConfig):
    """AdaRound settings (defaults sized for a CPU run on SmolLM2-135M).

    Attributes:
        scheme: the weight grid (its observer initialises the scales).
        iters: optimisation steps per layer (the paper uses 10k-20k on GPU).
        batch_size: input rows (tokens, or images for convolutions) per step.
        lr: Adam learning rate for V.
        reg_weight: lambda of the rounding regulariser (the reconstruction term is
            normalised by plain rounding's error, the regulariser averaged per weight).
        beta_start, beta_end: annealing range of beta.
        warmup: fraction of steps without the regulariser.
        learn_scale: also learn the per-group scales (Adam, ``scale_lr``).
        scale_lr: learning rate of the log-scales.
        max_samples: input rows kept per layer for the reconstruction.
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
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.iters < 0 or self.batch_size < 1 or self.max_samples < 1:
            raise ValueError("adaround: iters >= 0, batch_size >= 1 and max_samples >= 1 are required")
        if not 0 <= self.warmup < 1 or self.beta_start < self.beta_end or self.beta_end <= 0:
            raise ValueError("adaround: need 0 <= warmup < 1 and beta_start >= beta_end > 0")
        if self.lr <= 0 or self.reg_weight < 0:
            raise ValueError("adaround: lr must be > 0 and reg_weight >= 0")


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


def adaround_quantize(
    weight: torch.Tensor,
    forward: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    scheme: QuantScheme,
    cfg: AdaRoundConfig,
) -> AdaRoundResult:
    """Learn the rounding of one layer.

    Args:
        weight: (N, K) weight in its quantization view (groups along K), float.
        forward: ``forward(x, w_view)`` → layer output, with ``w_view`` (N, K).
        inputs: (S, ...) calibration inputs of the layer; rows are sampled per step.
        targets: (S, ...) full-precision outputs for those inputs.
        scheme: integer grid (``zero_point="int"``).
        cfg: optimisation settings.

    Returns:
        :class:`AdaRoundResult` with hard-rounded weights.
    """
    if scheme.float_zero_point:
        raise ValueError("adaround supports zero_point='int' grids only")
    W = weight.detach().float()
    n, k = W.shape
    qp = compute_qparams(W, scheme)
    idx = group_index(k, scheme.group_width(k), W.device)
    log_s = torch.log(qp.scale.float()).clone().requires_grad_(cfg.learn_scale)  # (N, G)
    zp = None if qp.zero_point is None else qp.zero_point.float()[:, idx]  # (N, K)
    s0 = qp.scale.float()[:, idx]
    floor = torch.floor(W / s0)
    rest = (W / s0 - floor).clamp(0.01, 0.99)  # keep V finite at exact grid points
    V = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)  # h(V) = rest at init
    zpv = zp if zp is not None else 0.0

    def soft(hv: torch.Tensor) -> torch.Tensor:
        s = torch.exp(log_s)[:, idx]
        q = torch.clamp(floor + hv + zpv, scheme.qmin, scheme.qmax)
        return (q - zpv) * s

    params = [{"params": [V], "lr": cfg.lr}]
    if cfg.learn_scale:
        params.append({"params": [log_s], "lr": cfg.scale_lr})
    opt = torch.optim.Adam(params)
    rows = inputs.shape[0]
    with torch.enable_grad():  # the pipeline runs under no_grad
        _optimise(V, log_s, soft, forward, inputs, targets, opt, cfg)
    with torch.no_grad():
        scale = torch.exp(log_s).to(weight.dtype)
        up = (_h(V) >= 0.5).float()
        codes = torch.clamp(floor + up + zpv, scheme.qmin, scheme.qmax).to(torch.int8)
        qparams = QParams(scale, None if qp.zero_point is None else qp.zero_point.to(weight.dtype))
        w_hat = dequantize(codes, qparams, scheme).to(weight.dtype)
        pick = torch.arange(min(rows, 4 * cfg.batch_size), device=inputs.device)
        mse = _recon(forward(inputs[pick], w_hat.float()), targets[pick]).item()
    return AdaRoundResult(weight=w_hat, codes=codes, qparams=qparams, recon_mse=mse)


def _recon(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error summed over output features (dim 1), averaged over samples and positions."""
    return (out.float() - target.float()).pow(2).sum(1).mean()


def _optimise(V, log_s, soft, forward, inputs, targets, opt, cfg: AdaRoundConfig) -> None:
    """Adam on V (and the log-scales): reconstruction error plus the annealed rounding regulariser.

    The reconstruction term is divided by the error of plain rounding-to-nearest
    and the regulariser is averaged over the weights, so ``reg_weight`` means
    the same for every layer size and activation scale (the paper's sums, eq. 25,
    make lambda depend on both).
    """
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed)
    rows = inputs.shape[0]
    warm = int(cfg.warmup * cfg.iters)
    with torch.no_grad():
        probe = torch.arange(min(rows, 4 * cfg.batch_size), device=inputs.device)
        nearest = (torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA >= 0.5).float()
        norm = _recon(forward(inputs[probe], soft(nearest)), targets[probe]).clamp_min(1e-12)
    for step in range(cfg.iters):
        pick = torch.randint(0, rows, (min(cfg.batch_size, rows),), generator=gen).to(inputs.device)
        hv = _h(V)
        out = forward(inputs[pick], soft(hv))
        loss = _recon(out, targets[pick]) / norm
        if step >= warm and cfg.reg_weight > 0:
            beta = _beta(step, cfg.iters, cfg)
            loss = loss + cfg.reg_weight * (1 - (2 * hv - 1).abs().pow(beta)).mean()  # eq. 24, per weight
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def layer_view(module: nn.Module) -> tuple[torch.Tensor, Callable, Callable]:
    """Quantization view of a layer's weight and the matching forward.

    Returns:
        ``(W (N, K), forward(x, w_view) → output, to_weight(w_view) → module-shaped weight)``.
        Linear: W as is. HF ``Conv1D`` (weight (K, N)): transposed. ``Conv2d``
        (O, I/g, kh, kw): flattened to (O, I/g*kh*kw), groups along the flattened input.
    """
    w = module.weight.detach()
    bias = getattr(module, "bias", None)
    bias = None if bias is None else bias.detach().float()
    if isinstance(module, nn.Linear):
        return w, lambda x, v: F.linear(x, v, bias), lambda v: v
    if type(module).__name__ == "Conv1D":  # transformers.pytorch_utils.Conv1D: y = x @ W + b, W (K, N)
        return w.t(), lambda x, v: F.linear(x, v, bias), lambda v: v.t().contiguous()
    if isinstance(module, nn.Conv2d):
        shape = w.shape

        def conv(x, v):
            return F.conv2d(x, v.reshape(shape), bias, module.stride, module.padding, module.dilation, module.groups)

        return w.reshape(shape[0], -1), conv, lambda v: v.reshape(shape)
    raise ValueError(f"adaround supports nn.Linear, Conv1D and nn.Conv2d, not {type(module).__name__}")


@register_pass
class AdaRoundPass(Pass):
    """Layer-wise AdaRound inside the sequential pipeline: each targeted layer
    reconstructs its full-precision output on its own (compressed-model) inputs."""

    name = "adaround"
    config_cls = AdaRoundConfig
    requires_calibration = True

    def __init__(self, config: AdaRoundConfig):
        super().__init__(config)
        self._inputs: dict[str, list[torch.Tensor]] = {}
        self._handles: list = []

    def _layers(self, block: nn.Module, prefix: str):
        return [(n, m) for n, m in select_modules(block, self.config, prefix)
                if isinstance(m, (nn.Linear, nn.Conv2d)) or type(m).__name__ == "Conv1D"]

    def begin_block(self, block: nn.Module, prefix: str) -> None:
        """Record each targeted layer's inputs (token rows for linears, images for convs)."""
        for name, module in self._layers(block, prefix):
            self._inputs[name] = []
            self._handles.append(module.register_forward_pre_hook(
                lambda m, args, name=name: self._inputs[name].append(args[0].detach())))

    def end_block(self, block: nn.Module, prefix: str, **context) -> None:
        """Optimise the rounding of every recorded layer, then fix it on the grid."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        gen = torch.Generator().manual_seed(self.config.seed)
        for name, module in self._layers(block, prefix):
            xs = self._inputs.pop(name)
            x = torch.cat([t.reshape(-1, t.shape[-1]) for t in xs]) if not isinstance(module, nn.Conv2d) else torch.cat(xs)
            if x.shape[0] > self.config.max_samples:
                x = x[torch.randperm(x.shape[0], generator=gen)[: self.config.max_samples].to(x.device)]
            if not torch.isfinite(x).all():
                raise ValueError(f"{name}: calibration activations contain NaN/inf")
            w, fwd, to_weight = layer_view(module)
            with torch.no_grad():
                target = fwd(x.float(), w.float())
            try:
                res = adaround_quantize(w, fwd, x.float(), target, self.config.scheme, self.config)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
            log.debug("adaround %s recon mse %.4g", name, res.recon_mse)
            attach_qparams(module, self.config.scheme, res.qparams, to_weight(res.weight))

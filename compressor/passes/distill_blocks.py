"""Block-wise distillation (``distill_blocks``): the cheap mode, on the sequential pipeline.

Each decoder block, once compressed by the passes before this one, is trained
to reproduce the full-precision block's output on the calibration windows: the
mean squared error between the compressed block run on the compressed stream's
inputs and the original block run on the full-precision stream's inputs (the
pipeline's ``targets``). Only one block's weights and activations are involved
at a time, so it costs a few block forwards and backwards per step instead of
the whole model's, and no teacher copy is kept. Quantized layers train through
the straight-through estimator and pruned ones keep their masks, as in
:mod:`compressor.algorithms.distill.students`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from compressor.algorithms.distill.students import prepare_student
from compressor.core.passes import Pass, PassConfig, register_pass
from compressor.pipeline.cache import select_rows

__all__ = ["BlockDistillConfig", "BlockDistillPass"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class BlockDistillConfig(PassConfig):
    """Block-wise reconstruction training (``targets`` / ``ignore`` are not used: the whole block trains).

    Attributes:
        iters: Adam steps per block.
        lr: learning rate.
        batch_size: calibration sequences per step.
        seed: which sequences each step draws.
    """

    iters: int = 50
    lr: float = 1e-5
    batch_size: int = 4
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("iters", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: use a positive integer")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr}: use a positive learning rate, e.g. 1e-5")


@register_pass
class BlockDistillPass(Pass):
    """Train each compressed block to match the full-precision block's output (sequential pipeline)."""

    name = "distill_blocks"
    config_cls = BlockDistillConfig
    requires_calibration = True
    wants_fp_targets = True  # the pipeline keeps the full-precision stream and hands its block outputs over
    streams = True  # trains one block against its targets: no teacher copy, nothing outside the block

    def begin_block(self, block: nn.Module, prefix: str) -> list[nn.Module]:
        """Nothing to observe: the block's cached inputs and the targets are all it needs."""
        return []

    def end_block(self, block: nn.Module, prefix: str, *, cache=None, targets=None, **context) -> None:
        """Fit the block's weights to ``targets`` (list of (B, L, D) full-precision outputs, one per cached batch)."""
        if cache is None or targets is None:
            raise ValueError("distill_blocks runs in the sequential pipeline of a decoder model: use compressor.compress")
        cfg = self.config
        state = prepare_student(block)
        params = [p for p in block.parameters() if p.requires_grad]
        opt = torch.optim.Adam(params, lr=cfg.lr)
        gen = torch.Generator().manual_seed(cfg.seed)
        first = last = None
        was_training = block.training
        block.train()
        with torch.enable_grad():
            for _ in range(cfg.iters):
                j = int(torch.randint(0, len(targets), (1,), generator=gen))
                hidden = cache.hidden(j)  # (B, L, D)
                rows = torch.randperm(hidden.shape[0], generator=gen)[: cfg.batch_size]
                out = block(hidden[rows.to(hidden.device)], **select_rows(cache.kwargs(j), rows, hidden.shape[0]))
                out = out[0] if isinstance(out, (tuple, list)) else out
                loss = (out.float() - targets[j][rows.to(hidden.device)].float()).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                state.after_step()
                last = float(loss.detach())
                first = last if first is None else first
        block.train(was_training)
        state.finish()
        for p in params:
            p.grad = None
        log.debug("distill_blocks %s: block MSE %.4g -> %.4g over %d steps", prefix, first, last, cfg.iters)

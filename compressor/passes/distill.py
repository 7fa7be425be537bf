"""The ``distill`` recipe pass: after quantization or pruning, train the compressed model against the original.

It comes last in a recipe. ``compress()`` keeps a copy of the model as it was
before the first pass (the teacher) and hands it to this pass together with the
token windows: the pass's own ``data`` source when set, else the calibration set.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from typing import Any, ClassVar

import torch
from torch import nn

from compressor.algorithms.distill.chunked import CHUNKED_KINDS
from compressor.core.passes import Pass, PassConfig, register_pass
from compressor.pipeline.trainer import DistillConfig, TrainSettings, distill

__all__ = ["DistillPassConfig", "DistillPass"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class DistillPassConfig(TrainSettings, PassConfig):
    """Distillation as a recipe step (``targets`` / ``ignore`` are not used: the whole student trains).

    Attributes:
        steps, batch_size, grad_accum, lr, weight_decay, warmup, kind, temperature,
        alpha, chunk_size, mixed_precision, gradient_checkpointing, max_grad_norm:
            the :class:`compressor.pipeline.trainer.TrainSettings`.
        data: a text source for the training windows; None: the calibration set.
        samples: windows drawn from ``data``.
        seq_len: tokens per window drawn from ``data``.
    """

    data: str | None = None
    samples: int = 256
    seq_len: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        self.trainer_config()  # validates the trainer's fields
        if self.kind not in CHUNKED_KINDS:
            raise ValueError(f"kind={self.kind!r}: use one of {CHUNKED_KINDS}")
        if self.samples < 1 or self.seq_len < 2:
            raise ValueError(f"samples={self.samples}, seq_len={self.seq_len}: use at least 1 window of 2 tokens")

    def trainer_config(self, seed: int = 0, quiet: bool = False) -> DistillConfig:
        """The :class:`DistillConfig` these settings describe."""
        values = {f.name: getattr(self, f.name) for f in fields(TrainSettings)}
        return DistillConfig(**values, seed=seed, quiet=quiet)


@register_pass
class DistillPass(Pass):
    """Train the compressed model to match the original's next-token distribution (runs after every other pass)."""

    name = "distill"
    config_cls = DistillPassConfig
    runs_last: ClassVar[bool] = True  # compress() runs it on the whole model after the other passes
    wants_teacher: ClassVar[bool] = True  # compress() keeps a copy of the model from before the first pass

    def apply(self, model: nn.Module, *, teacher: nn.Module | None = None, calibration_ids: torch.Tensor | None = None,
              tokenizer: Any = None, seed: int = 0, quiet: bool = False, **context) -> None:
        """Distill ``model`` (the student, in place) from ``teacher``.

        Args:
            model: the compressed model.
            teacher: the model before compression (``compress()`` passes it).
            calibration_ids: (S, L) int64 windows used when ``data`` is unset.
            tokenizer: needed when ``data`` is set.
            seed: the recipe's seed (data order).
            quiet: no progress bar.
        """
        if teacher is None:
            raise ValueError("distill needs the uncompressed model as teacher: run it through compressor.compress(), "
                             "or call compressor.pipeline.trainer.distill(teacher, student, data) directly")
        cfg = self.config
        if cfg.data is not None:
            if tokenizer is None:
                raise ValueError(f"distill data={cfg.data!r} needs the model's tokenizer: pass tokenizer=... to compress()")
            from compressor.calibration import calibration_set

            ids = calibration_set(cfg.data, tokenizer, n=cfg.samples, seq_len=cfg.seq_len, seed=seed).input_ids
        elif calibration_ids is not None and calibration_ids.dtype == torch.int64:
            ids = calibration_ids
        else:
            raise ValueError("distill needs token windows: set its data (e.g. data: sotu:1790-1999) or pass "
                             "calibration=... to compress()")
        result = distill(teacher, model, ids, cfg.trainer_config(seed=seed, quiet=quiet))
        log.info("distill: %d steps, %d tokens, loss %.4f -> %.4f in %.1f s", result.steps_done, result.tokens_seen,
                 result.losses[0][1], result.losses[-1][1], result.wall_s)

"""The ``ostquant`` pass: learn and fuse OSTQuant's orthogonal and scaling transforms (arXiv 2501.13987).

A thin adapter over :func:`compressor.algorithms.transforms.ostquant.ostquant_model`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import nn

from compressor.algorithms.transforms.ostquant import OSTQuantConfig, ostquant_model
from compressor.core.passes import Pass, register_pass

__all__ = ["OSTQuantPass"]


@register_pass
class OSTQuantPass(Pass):
    """Learn and fuse OSTQuant's transforms on the whole model, before the quantization passes.

    A model-level pass that needs calibration data: ``compressor.compress``
    gives it the calibration ids before the block pipeline. Follow it with a
    weight pass (rtn / gptq / adaround) and, for activations, ``quantize_activations``
    with the same settings it trained under.
    """

    name = "ostquant"
    config_cls = OSTQuantConfig
    model_level: ClassVar[bool] = True
    requires_calibration: ClassVar[bool] = True

    def apply(self, model: nn.Module, *, calibration_ids: Any = None, quiet: bool = False, **context) -> None:
        """Train and fuse in place; the result dict is kept in ``self.applied``."""
        if calibration_ids is None:
            raise ValueError("ostquant needs calibration data: pass calibration='sotu:1790-1999' (or token ids)")
        self.applied = ostquant_model(model, calibration_ids, self.config, quiet=quiet)

    def compress_block(self, block: nn.Module, prefix: str) -> None:
        raise ValueError("ostquant is a model-level pass: run the recipe through compressor.compress, which "
                         "trains it on the whole model before the block pipeline")

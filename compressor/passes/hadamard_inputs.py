"""The ``hadamard_inputs`` pass: a block-diagonal online Hadamard on every targeted linear's input, before quantization.

MR-GPTQ's block rotations (Egiazarian et al., arXiv 2509.23202, "Bridging the Gap Between Promise and Performance
for Microscaling FP4 Quantization"): rotating each group of ``block`` inputs with a Hadamard of that size, ``block``
the FP4 input quantizer's group (16 for NVFP4, 32 for MXFP4), spreads an outlier over its own group only, so the
group's one scale fits its values better; the inverse is fused into the weights (``W ← W Q``), whose groups it
rotates alike. Measured on SmolLM2-135M (docs/float-formats.md, dev split), it helps MXFP4 inputs (blocks of 32:
W4A4 RTN 67.39 -> 60.12) and hurts NVFP4 ones (blocks of 16: 38.97 -> 51.45), whose E4M3 scale per 16 already
holds an outlier to its group. Unlike ``rotate`` it needs no norm folding and touches neither the residual stream nor the
embedding, so it works on any family with ``nn.Linear`` layers. A thin adapter over
:func:`compressor.algorithms.transforms.rotate.block_hadamard_inputs`. Exported as a compressed-tensors transform
group with ``head_dim`` = ``block`` (:mod:`compressor.export.online_format`)::

    passes:
      - hadamard_inputs: {block: 32}
      - quantize_activations: {format: mxfp4, bits: 4}
      - gptq: {scheme: {type: float, bits: 4, group_size: 32, symmetric: true, scale_format: e8m0}}
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from compressor.algorithms.transforms.rotate import block_hadamard_inputs
from compressor.core.arch import find_blocks
from compressor.core.passes import Pass, PassConfig, register_pass, select_modules
from compressor.core.state import is_quantized
from compressor.runtime.online import TRANSFORM_CHILD, detach_input_transform

__all__ = ["HadamardInputsConfig", "HadamardInputsPass"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, kw_only=True)
class HadamardInputsConfig(PassConfig):
    """Block-wise input rotations.

    Attributes:
        block: the Hadamard size, dividing every targeted linear's input width; the input quantizer's group
            (32 for MXFP4; 16 for NVFP4, which it hurt on SmolLM2) is what MR-GPTQ pairs it with.
        targets / ignore: the linears rotated (default every ``nn.Linear`` but ``lm_head``).
    """

    targets: tuple[str, ...] = ("Linear",)
    block: int = 32

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.block, bool) or not isinstance(self.block, int) or self.block < 2:
            raise ValueError(f"hadamard_inputs.block={self.block!r}: give the Hadamard size, e.g. 16 (NVFP4 inputs) "
                             "or 32 (MXFP4 inputs)")


@register_pass
class HadamardInputsPass(Pass):
    """Rotate the inputs of the targeted linears block-wise, once, before the quantization passes (model-level)."""

    name = "hadamard_inputs"
    config_cls = HadamardInputsConfig
    model_level: ClassVar[bool] = True
    streams: ClassVar[bool] = True  # linear by linear: each block as it is read

    def __init__(self, config: HadamardInputsConfig):
        super().__init__(config)
        self._attached: set[int] = set()  # ids of the transforms this pass attached (a streamed re-read drops them)

    def apply(self, model: nn.Module, *, quiet: bool = False, **context) -> None:
        """Rotate ``model``'s targeted linears in place; ``self.rotated`` counts them."""
        found = self._targets(model)
        if not found:
            raise ValueError(f"hadamard_inputs: no nn.Linear matches targets={list(self.config.targets)} "
                             f"ignore={list(self.config.ignore)}; check the module names with `compressor inspect`")
        self.rotated = self._rotate(found)
        log.info("hadamard_inputs: %d linears rotate their inputs in blocks of %d", self.rotated, self.config.block)

    def begin_stream(self, model: nn.Module) -> None:
        """Rotate the targeted linears outside the decoder blocks (none by default); the blocks follow as read."""
        blocks_name, _ = find_blocks(model)
        self.rotated = self._rotate([(n, m) for n, m in self._targets(model) if not n.startswith(blocks_name + ".")])

    def load_block(self, block: nn.Module, prefix: str, index: int) -> None:
        """Rotate the targeted linears of decoder block ``index``, just read from the checkpoint (a block read
        again holds fresh weights and this pass's transforms from the earlier read: those are dropped first; a
        transform another pass attached, e.g. rotate's R4, stays and is refused as in memory)."""
        found = self._targets(block, prefix)
        for _, m in found:
            if id(m._modules.get(TRANSFORM_CHILD)) in self._attached:
                detach_input_transform(m)
        self.rotated += self._rotate(found)

    def end_stream(self, model: nn.Module) -> None:
        """Log what was rotated."""
        log.info("hadamard_inputs: %d linears rotate their inputs in blocks of %d", self.rotated, self.config.block)

    def _targets(self, module: nn.Module, prefix: str = "") -> list[tuple[str, nn.Linear]]:
        return [(n, m) for n, m in select_modules(module, self.config, prefix) if isinstance(m, nn.Linear)]

    def _rotate(self, found: list[tuple[str, nn.Linear]]) -> int:
        quantized = [n for n, m in found if is_quantized(m)]
        if quantized:
            raise ValueError(f"hadamard_inputs: {quantized[0]} is already quantized; put hadamard_inputs before the "
                             "quantization passes")
        count = block_hadamard_inputs(found, self.config.block)
        self._attached.update(id(m._modules[TRANSFORM_CHILD]) for _, m in found)  # kept alive by their linears
        return count

    def compress_block(self, block: nn.Module, prefix: str) -> None:
        raise ValueError("hadamard_inputs is a model-level pass: run the recipe through compressor.compress, which "
                         "applies it to the whole model before the block pipeline")

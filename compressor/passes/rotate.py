"""The ``rotate`` pass: training-free equivalent rotations of the whole model (QuaRot-style R1-R4), before quantization.

A thin adapter over :func:`compressor.algorithms.transforms.rotate.rotate_model`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from torch import nn

from compressor.algorithms.transforms.rotate import Rotation, rotate_model
from compressor.core.passes import Pass, PassConfig, register_pass

__all__ = ["RotateConfig", "RotatePass"]


@dataclass(frozen=True, kw_only=True)
class RotateConfig(PassConfig):
    """Training-free equivalent rotations (norm folding, R1, R2, R3, R4).

    The rotation covers the whole model, so ``targets``/``ignore`` do not apply
    and are not part of the recipe.

    Attributes:
        seed: seed of the random signs / Gaussian.
        r1: ``"hadamard"`` or ``"random"``.
        r2: per-head rotation of values / o_proj input.
        r3: online Hadamard on queries and keys after RoPE, for a quantized KV
            cache (default false: exact and useless without ``kv_bits``; exported in
            ``transform_config``, applied on reload by ``load_compressed``).
        r4: online Hadamard before down_proj (exported in ``transform_config``; only
            ``load_compressed`` and vLLM apply it).
        online_o: online Hadamard before o_proj, mixing the heads (QuaRot's; default
            false; exported like ``r4``). Use it when linear inputs are quantized to 4 bits.
        r1_at: ``"residual"`` (R1 fused into the residual stream), ``"inputs"`` (an online
            Hadamard on every reader's input: Gemma 2/3, whose sandwich norms forbid the
            residual rotation) or ``"auto"`` (the default: whichever the family allows).
    """

    targets: tuple[str, ...] = field(default=(), init=False)
    ignore: tuple[str, ...] = field(default=(), init=False)
    seed: int = 0
    r1: str = "hadamard"
    r2: bool = True
    r3: bool = False
    r4: bool = True
    online_o: bool = False
    r1_at: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"rotate.seed must be a non-negative integer, got {self.seed!r}")
        if self.r1 not in ("hadamard", "random"):
            raise ValueError(f"rotate.r1={self.r1!r}: use 'hadamard' or 'random'")
        if self.r1_at not in ("auto", "residual", "inputs"):
            raise ValueError(f"rotate.r1_at={self.r1_at!r}: use 'auto', 'residual' or 'inputs'")
        for name in ("r2", "r3", "r4", "online_o"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"rotate.{name} must be true or false, got {getattr(self, name)!r}")

    def to_dict(self) -> dict:
        return {"seed": self.seed, "r1": self.r1, "r2": self.r2, "r3": self.r3, "r4": self.r4,
                "online_o": self.online_o, "r1_at": self.r1_at}


@register_pass
class RotatePass(Pass):
    """Rotate the whole model once, before the quantization passes (a model-level pass).

    ``compressor.compress`` runs model-level passes on the full model before
    the sequential block pipeline; they must lead the recipe. A streamed run
    (``stream=True``) rotates the embedding and head first and each decoder block
    as it is read from the checkpoint: the same weights, one block in memory.
    """

    name = "rotate"
    config_cls = RotateConfig
    model_level: ClassVar[bool] = True
    streams: ClassVar[bool] = True

    def apply(self, model: nn.Module, *, quiet: bool = False, **context) -> None:
        """Rotate ``model`` in place; what was applied is kept in ``self.applied``."""
        c = self.config
        self.applied = rotate_model(model, seed=c.seed, r1=c.r1, r2=c.r2, r3=c.r3, r4=c.r4, online_o=c.online_o,
                                    r1_at=c.r1_at)

    def begin_stream(self, model: nn.Module) -> None:
        """Plan the rotation on ``model`` (blocks on ``meta``) and rotate the parts outside the blocks."""
        c = self.config
        self._rotation = Rotation(model, seed=c.seed, r1=c.r1, r2=c.r2, r3=c.r3, r4=c.r4, online_o=c.online_o,
                                  r1_at=c.r1_at)
        self._rotation.outside()

    def load_block(self, block: nn.Module, prefix: str, index: int) -> None:
        """Rotate decoder block ``index``, just read from the checkpoint."""
        self._rotation.block(index)

    def end_stream(self, model: nn.Module) -> None:
        """Keep what was applied in ``self.applied`` (and ``model.rotation_info``)."""
        self.applied = self._rotation.finish()
        del self._rotation

    def compress_block(self, block: nn.Module, prefix: str) -> None:
        raise ValueError("rotate is a model-level pass: run the recipe through compressor.compress, which "
                         "rotates the whole model before the block pipeline")

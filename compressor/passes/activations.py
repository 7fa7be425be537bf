"""The ``quantize_activations`` recipe pass: per-token linear inputs and per-head KV cache, fake-quantized in memory.

W8A8, W4A8 and W4A4KV4 are recipes::

    passes:
      - rotate: {seed: 0, r3: true}                     # spreads outliers; online R4 / R3 run before the quantizers
      - gptq: {scheme: {bits: 4, group_size: -1}}
      - quantize_activations: {bits: 4, kv_bits: 4}

The pass attaches run-time quantizers and changes no weight. It may sit
anywhere after ``rotate``; later passes see quantized activations:

* without calibration, ``compressor.compress`` applies it to the whole model
  in recipe order;
* in the sequential block pipeline it acts block by block, in recipe order
  within each block: after ``gptq`` in the recipe, GPTQ calibrates each block
  on full-precision activations (the block's inputs already come from the
  quantized earlier blocks) and the quantizers are added before the block's
  outputs are recomputed; before ``gptq``, GPTQ's Hessians see quantized
  inputs and quantized keys/values (GPTAQ's full-precision stream does not:
  :func:`compressor.runtime.activations.quantizers_bypassed`).

Export: ``compress(..., output=...)`` / ``save_compressed`` record the
quantizers in ``quantization_config`` (``input_activations`` of the quantized
linears' config groups, ``kv_cache_scheme``, clip ratio and exact KV settings
under the ``compressor`` key; see :mod:`compressor.export.online_format`) and
``load_compressed`` reattaches them. The linears whose inputs are quantized
must have quantized weights: give this pass the weight pass's targets/ignore.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar

from torch import nn

from compressor.core.arch import attention_modules, head_counts, is_experts_module
from compressor.core.fake_quant import (
    ACTIVATION_FORMATS,
    activation_static_scales,
    check_activation_format,
    check_bits,
    check_clip,
)
from compressor.core.passes import Pass, PassConfig, register_pass, select_modules
from compressor.runtime.activations import (
    KV_CHILD,
    LEARNED_CLIP,
    ActivationQuantizer,
    KVQuantizer,
    attach_input_quantizer,
    attach_kv_quantizer,
    qk_rotations,
)

__all__ = ["ActivationQuantConfig", "ActivationQuantPass"]

log = logging.getLogger(__name__)

STATIC_INPUTS = ("nvfp4", "fp8-static")  # input formats whose scales come from the calibration data


@dataclass(frozen=True, kw_only=True)
class ActivationQuantConfig(PassConfig):
    """Dynamic fake quantization of linear inputs (per token) and of keys/values (per head, per token).

    Attributes:
        targets: linears whose input is quantized (default every ``Linear``);
            the output embedding (``lm_head``) is never quantized.
        ignore: linears skipped (default ``lm_head``).
        bits: bits of the linear inputs (8 or 4 usually; 2-16), or None to
            leave them in full precision.
        symmetric: signed grid without zero point (default) or unsigned with one.
        clip_ratio: each token's range is shrunk by it, in (0, 1]. A linear
            carrying a clip ratio learned for the same bits / symmetric grid
            (``ostquant`` with ``learn_clip: true`` before this pass) uses that
            ratio instead.
        kv_bits: bits of the keys and values, or None (default) for none.
        kv_symmetric: symmetric KV grid; default asymmetric, as KV caches usually are.
        kv_group_size: head_dim columns per KV scale; None for the whole head.
        format: None (an integer grid of ``bits``) or a float format for the linear inputs:
            ``"fp8"`` (E4M3, dynamic per token: compressed-tensors' FP8_DYNAMIC), ``"fp8-static"`` (E4M3
            with one static scale per linear, its calibration inputs' largest |x| / 448: compressed-tensors'
            FP8 preset), ``"fp8-block"`` (E4M3 per token and 128 features, dynamic), ``"mxfp4"``
            (E2M1 per 32 features, dynamic E8M0 scales) or ``"nvfp4"`` (E2M1 per 16, dynamic E4M3
            scales under a static per-tensor global scale from the calibration data's largest
            input). ``bits`` must be the format's width (8 or 4), symmetric, clip_ratio 1.
        kv_format: None (a dynamic integer KV grid of ``kv_bits``) or ``"fp8"``: E4M3 keys and values with
            static scales ``max|k| / 448`` from the calibration data (vLLM's FP8 KV cache, ``k_scale`` /
            ``v_scale``); needs ``kv_bits: 8``, ``kv_symmetric: true`` and calibration data.
        kv_per_head: FP8 scales per KV head (compressed-tensors' ``attn_head``) instead of per tensor.
    """

    bits: int | None = 8
    symmetric: bool = True
    clip_ratio: float = 1.0
    kv_bits: int | None = None
    kv_symmetric: bool = False
    kv_group_size: int | None = None
    format: str | None = None
    kv_format: str | None = None
    kv_per_head: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kv_format is not None:
            if self.kv_format != "fp8":
                raise ValueError(f"quantize_activations.kv_format={self.kv_format!r}: use 'fp8' or null")
            if self.kv_bits != 8 or not self.kv_symmetric or self.kv_group_size is not None:
                raise ValueError("quantize_activations.kv_format='fp8' is an 8-bit symmetric grid with one scale per "
                                 "tensor or head: set kv_bits: 8, kv_symmetric: true and no kv_group_size")
        if not isinstance(self.kv_per_head, bool) or (self.kv_per_head and self.kv_format is None):
            raise ValueError("quantize_activations.kv_per_head (true / false) applies to kv_format: fp8")
        if self.format is not None:
            check_activation_format(self.format, what="quantize_activations.format")
            want = ACTIVATION_FORMATS[self.format][0]
            if self.bits != want or not self.symmetric or self.clip_ratio != 1.0:
                raise ValueError(f"quantize_activations.format={self.format!r} is a {want}-bit symmetric grid without "
                                 f"clipping: set bits: {want}, symmetric: true, clip_ratio: 1 (got bits={self.bits}, "
                                 f"symmetric={self.symmetric}, clip_ratio={self.clip_ratio})")
        if self.bits is None and self.kv_bits is None:
            raise ValueError("quantize_activations: bits and kv_bits are both null, so there is nothing to do: "
                             "set bits (linear inputs, e.g. 8) and/or kv_bits (keys and values, e.g. 4)")
        if self.bits is not None:
            check_bits(self.bits, "quantize_activations.bits")
        if self.kv_bits is not None:
            check_bits(self.kv_bits, "quantize_activations.kv_bits")
        check_clip(self.clip_ratio, "quantize_activations.clip_ratio")
        for name in ("symmetric", "kv_symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"quantize_activations.{name} must be true or false, got {getattr(self, name)!r}")
        g = self.kv_group_size
        if g is not None and (isinstance(g, bool) or not isinstance(g, int) or g < 1):
            raise ValueError(f"quantize_activations.kv_group_size={g!r} is invalid: use a positive divisor of "
                             "head_dim (e.g. 32, 64) or null for the whole head")

    def describe(self) -> str:
        a = f"A{self.bits}" if self.bits is not None else "A16"
        if self.format is not None:
            a = f"A {self.format}"
        kv = f"KV{self.kv_bits}" if self.kv_bits is not None else "KV16"
        if self.kv_format is not None:
            kv = f"KV {self.kv_format} static per-{'head' if self.kv_per_head else 'tensor'}"
        return f"{a} per-token {'sym' if self.symmetric else 'asym'}, {kv} per-head"


@register_pass
class ActivationQuantPass(Pass):
    """Attach per-token input quantizers to the targeted linears and a KV quantizer to every attention module."""

    name = "quantize_activations"
    config_cls = ActivationQuantConfig
    resumable: ClassVar[bool] = False  # a block restored from a checkpoint would come back without its quantizers

    def __init__(self, config: ActivationQuantConfig):
        super().__init__(config)
        self._amax: dict[str, float] = {}  # nvfp4, fp8-static: linear name -> largest |input| seen in calibration
        self._handles: list = []

    @property
    def requires_calibration(self) -> bool:  # type: ignore[override]
        """NVFP4 and static FP8 inputs and an FP8 KV cache need static scales, taken from the calibration data; the
        other grids are dynamic."""
        return self.config.format in STATIC_INPUTS or self.config.kv_format == "fp8"

    def begin_block(self, block: nn.Module, prefix: str) -> list[nn.Module] | None:
        """Record what the static scales need over the calibration batches: NVFP4's largest |input| of every
        targeted linear of ``block``; an FP8 KV cache's largest |k| and |v| (its quantizers attach now, observing).

        Returns:
            the observed linears, or None (full forwards) when the KV cache is observed: keys and values exist only
            inside attention, after its linears' inputs.
        """
        linears = self._linears(block, prefix, None) if self.config.format in STATIC_INPUTS else []
        for name, lin in linears:
            self._handles.append(lin.register_forward_pre_hook(lambda _m, args, name=name: self._observe(name, args[0])))
        if self.config.kv_format == "fp8":
            self._attach([], attention_modules(block, prefix))
            return None
        return [m for _, m in linears]

    def _observe(self, name: str, x) -> None:
        self._amax[name] = max(self._amax.get(name, 0.0), float(x.detach().abs().amax()))

    def end_block(self, block: nn.Module, prefix: str, **context: Any) -> None:
        """Attach the block's quantizers, NVFP4's with the global scales of the inputs just observed."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self.config.kv_format == "fp8":
            for _, attn in attention_modules(block, prefix):
                attn._modules[KV_CHILD].freeze()
            self._attach(self._linears(block, prefix, None), [])
        else:
            self.compress_block(block, prefix)
        self._amax.clear()

    def apply(self, model: nn.Module, *, quiet: bool = False, only: set[str] | None = None, **context: Any) -> None:
        """Quantize the activations of ``model`` in place.

        Args:
            model: a model; the KV part needs transformers attention modules.
            only: restrict the linears to these names and skip the KV cache
                (``compress`` passes the targets outside the decoder blocks here).
        """
        self._refuse_experts(model)
        if self.requires_calibration and only is None:
            raise ValueError("quantize_activations with format='nvfp4' / 'fp8-static' or kv_format='fp8' takes its static "
                             "scales from "
                             "calibration data: pass calibration=... to compress()")
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        linears = self._linears(model, "", head)
        if only is not None:
            self._attach([(n, m) for n, m in linears if n in only], [])
            return
        attention = attention_modules(model) if self.config.kv_bits is not None else []
        if self.config.kv_bits is not None and not attention:
            raise ValueError(f"quantize_activations: kv_bits={self.config.kv_bits} but {type(model).__name__} has no "
                             "transformers attention module (one dispatching through AttentionInterface); "
                             "set kv_bits: null")
        if self.config.bits is not None and not linears:
            raise ValueError(f"quantize_activations: no Linear matches targets={list(self.config.targets)} "
                             f"ignore={list(self.config.ignore)} (lm_head is never quantized); check the module "
                             "names with `compressor inspect`, or set bits: null")
        self._hint_r3(model)
        self._attach(linears, attention)
        log.info("quantize_activations: %s on %d linears, %d attention modules", self.config.describe(),
                 len(linears) if self.config.bits is not None else 0, len(attention))

    def compress_block(self, block: nn.Module, prefix: str) -> None:
        """Quantize the activations of one decoder block (sequential pipeline)."""
        kv = attention_modules(block, prefix) if self.config.kv_bits is not None else []
        self._attach(self._linears(block, prefix, None), kv)

    def plan(self, model: nn.Module, input_ids: Any, sweep: Any) -> None:
        """Refuse fused experts and say what a rotated model without R3 misses, before the block loop."""
        self._refuse_experts(model)
        self._hint_r3(model)

    def _refuse_experts(self, model: nn.Module) -> None:
        """Fail when the targets reach fused MoE experts, whose inputs this pass cannot quantize yet."""
        if self.config.bits is None:
            return
        experts = [n for n, m in select_modules(model, self.config) if is_experts_module(m)]
        if experts:
            raise ValueError(
                f"quantize_activations: bits={self.config.bits} would leave the inputs of the fused MoE experts "
                f"{experts[:2]}{' ...' if len(experts) > 2 else ''} in full precision: quantized expert inputs are "
                "not supported yet. To run the experts weight-only, add 'Experts' to this pass's ignore list")

    def _hint_r3(self, model: nn.Module) -> None:
        """Say so when a rotated model gets a quantized KV cache without R3 (QuaRot rotates its keys)."""
        if self.config.kv_bits is not None and getattr(model, "rotation_info", None) is not None \
                and not qk_rotations(model):
            log.info("quantize_activations: kv_bits=%d on a model rotated without r3; QuaRot also rotates queries "
                     "and keys after RoPE before quantizing the KV cache (rotate: {r3: true})", self.config.kv_bits)

    def _linears(self, root: nn.Module, prefix: str, head: nn.Module | None) -> list[tuple[str, nn.Linear]]:
        out = []
        for name, m in select_modules(root, self.config, prefix):
            if not isinstance(m, nn.Linear):
                continue
            if head is not None and m is head:
                log.info("quantize_activations: %s is the output embedding; it is never quantized", name)
                continue
            out.append((name, m))
        return out

    def _attach(self, linears: list[tuple[str, nn.Linear]], attention: list[tuple[str, nn.Module]]) -> None:
        c = self.config
        # attention first: a bad kv_group_size or attention implementation fails on the first module, before any change
        for name, attn in attention:
            try:
                heads = head_counts(attn.config)[1] if c.kv_per_head else 1
                attach_kv_quantizer(attn, KVQuantizer(c.kv_bits, symmetric=c.kv_symmetric, group_size=c.kv_group_size,
                                                      fmt=c.kv_format, per_head=c.kv_per_head, num_heads=heads))
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        learned, mismatched = [], []
        for name, lin in linears if c.bits is not None else []:
            clip = c.clip_ratio
            found = getattr(lin, LEARNED_CLIP, None)
            if found is not None:
                if c.format is None and found["bits"] == c.bits and found["symmetric"] == c.symmetric:
                    clip = found["clip_ratio"]
                    learned.append(clip)
                else:
                    mismatched.append(name)
            gs = static = None
            if c.format in STATIC_INPUTS:
                if name not in self._amax:
                    raise ValueError(f"{name}: no calibration input reached it, so its {c.format} static input scale "
                                     "is unknown; add it to ignore")
                gs, static = activation_static_scales(c.format, self._amax[name])
            try:
                if c.format is not None:
                    check_activation_format(c.format, lin.in_features)
                attach_input_quantizer(lin, ActivationQuantizer(c.bits, symmetric=c.symmetric, clip_ratio=clip,
                                                                fmt=c.format, global_scale=gs,
                                                                input_scale=static))
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
        if learned:
            log.info("quantize_activations: %d linears use the clip ratios learned for them (%.3f-%.3f) instead of "
                     "clip_ratio=%s", len(learned), min(learned), max(learned), c.clip_ratio)
        if mismatched:
            log.warning("quantize_activations: %d linears (%s, ...) carry clip ratios learned for another input grid "
                        "than A%d %s; they use clip_ratio=%s (train ostquant with this pass's bits/symmetric)",
                        len(mismatched), mismatched[0], c.bits, "sym" if c.symmetric else "asym", c.clip_ratio)

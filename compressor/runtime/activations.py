"""Activation and KV-cache fake quantization (in memory): per-token linear inputs, per-head keys and values.

Dynamic quantization: every token gets its own scale (and zero point) from its
own range at run time, as in QuaRot (arXiv 2404.00456, §3 "activations are
quantized per token") and SpinQuant / OSTQuant. Nothing is calibrated.

Grids, for ``b`` bits (``clip`` = ``clip_ratio``):

* symmetric: ``q ∈ [-2^(b-1), 2^(b-1) - 1]``, ``scale = clip * max|x| / (2^(b-1) - 1)``,
  ``x ≈ q * scale`` (the scale of vLLM's dynamic per-token int8);
* asymmetric: ``q ∈ [0, 2^b - 1]``, the range ``[min(x, 0), max(x, 0)] * clip``,
  ``scale = range / (2^b - 1)``, ``zp = round(-min / scale)``,
  ``x ≈ (q - zp) * scale`` (zero stays exact).

Values past the clipped range saturate at the grid edge. Half-precision
inputs are quantized in float32 and cast back.

Non-finite input: nothing raises in the forward path (a check would cost a
device sync per layer). A token holding NaN or inf comes out all NaN, so the
failure shows in the logits; the other tokens are unaffected.

Where the quantizers live:

* linear inputs: an :class:`ActivationQuantizer` child ``input_quantizer`` of
  the ``nn.Linear``, applied by a forward pre-hook. An online rotation
  (``input_transform``, :mod:`compressor.runtime.online`) on the same linear
  runs first: the quantizer sees ``x Q``, the input the fused weight multiplies.
* keys and values: a :class:`KVQuantizer` child ``kv_quantizer`` of the
  attention module, applied by our attention function, registered with
  transformers' ``AttentionInterface`` as ``compressor_kvquant:<base>``
  (``base``: the model's own implementation, ``sdpa`` or ``eager``). Attention
  modules call it with keys *after* RoPE and after the KV-cache update, so the
  quantized keys are the ones a quantized KV cache would hold.
* R3, the online Hadamard on queries and keys after RoPE (QuaRot, arXiv
  2404.00456, §4; SpinQuant, arXiv 2405.16406, R3): a :class:`QKRotation`
  child ``qk_rotation`` of the attention module, applied by the same attention
  function *before* the KV quantizer, so the quantizer sees rotated keys.
  Attached by the ``rotate`` pass (``r3: true``); it needs no quantizer.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Callable

import torch
from torch import nn

from compressor.core import floats
from compressor.core.arch import attention_function, base_attention, eager_attention, register_attention, set_attention
from compressor.core.fake_quant import (
    ACTIVATION_FORMATS,
    check_activation_format,
    check_bits,
    check_clip,
    check_group,
    fake_quant_float_per_token,
    fake_quant_per_head,
    fake_quant_per_token,
    straight_through,
)
from compressor.runtime import online
from compressor.runtime.online import OnlineHadamard

__all__ = [
    "ActivationQuantizer",
    "KVQuantizer",
    "QKRotation",
    "attach_input_quantizer",
    "attach_kv_quantizer",
    "attach_qk_rotation",
    "detach_qk_rotation",
    "wrapped_attention",
    "check_transform_first",
    "unwrapped_attention",
    "activation_quantizers",
    "qk_rotations",
    "quantizers_bypassed",
    "KV_ATTENTION_PREFIX",
]

log = logging.getLogger(__name__)

INPUT_CHILD = "input_quantizer"
KV_CHILD = "kv_quantizer"
QK_CHILD = "qk_rotation"
# attribute a transform pass that learns clip ratios (ostquant's learn_clip) leaves on a linear:
# {"bits": int, "symmetric": bool, "clip_ratio": float}; quantize_activations uses it when its grid matches
LEARNED_CLIP = "learned_clip"
KV_ATTENTION_PREFIX = "compressor_kvquant:"


class ActivationQuantizer(nn.Module):
    """Dynamic per-token fake quantization of a linear's input: x (..., K) → (..., K), same dtype.

    Gradients pass straight through (STE), so a later training pass (distill)
    can still train the layers before it.

    Args:
        bits: 2-16 (an integer grid), or the float format's width (8 for ``fp8``, 4 for ``nvfp4`` / ``mxfp4``).
        symmetric: signed grid without zero point, or unsigned with one (float formats: symmetric only).
        clip_ratio: in (0, 1] (float formats: 1).
        fmt: None (integer grid) or a float format of
            :data:`compressor.core.fake_quant.ACTIVATION_FORMATS`: ``"fp8"`` (E4M3 per token),
            ``"mxfp4"`` (E2M1 per 32, E8M0 scales) or ``"nvfp4"`` (E2M1 per 16, E4M3 scales).
        global_scale: NVFP4's static (1,) float32 input global scale (a non-persistent buffer;
            :func:`compressor.core.fake_quant.activation_global_scale`).
        input_scale: ``fp8-static``'s (1,) float32 input scale, ``max |x| / 448`` over the calibration inputs
            (a non-persistent buffer; :func:`compressor.core.fake_quant.activation_static_scale`).
    """

    bypass: bool = False  # True while :func:`quantizers_bypassed` holds (a class default: older pickles lack it)

    def __init__(self, bits: int, *, symmetric: bool = True, clip_ratio: float = 1.0, fmt: str | None = None,
                 global_scale: torch.Tensor | None = None, input_scale: torch.Tensor | None = None):
        super().__init__()
        check_bits(bits)
        check_clip(clip_ratio)
        if fmt is not None:
            check_activation_format(fmt)
            if bits != ACTIVATION_FORMATS[fmt][0] or not symmetric or clip_ratio != 1.0:
                raise ValueError(f"{fmt} activations are {ACTIVATION_FORMATS[fmt][0]}-bit, symmetric and unclipped: "
                                 f"got bits={bits}, symmetric={symmetric}, clip_ratio={clip_ratio}")
            if (fmt == "nvfp4") != (global_scale is not None):
                raise ValueError("nvfp4 activations need a global scale, and only they take one")
            if (fmt == "fp8-static") != (input_scale is not None):
                raise ValueError("fp8-static activations need a static input scale, and only they take one")
        self.bits, self.symmetric, self.clip_ratio, self.fmt = bits, symmetric, float(clip_ratio), fmt
        gs = None if global_scale is None else global_scale.detach().to(torch.float32).reshape(1).clone()
        self.register_buffer("global_scale", gs, persistent=False)
        s = None if input_scale is None else input_scale.detach().to(torch.float32).reshape(1).clone()
        self.register_buffer("input_scale", s, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) float → (..., K) on each token's grid (x itself while :func:`quantizers_bypassed` holds)."""
        if self.bypass:
            return x
        if self.fmt is not None:
            return straight_through(x, fake_quant_float_per_token(x, self.fmt, self.global_scale,
                                                                  getattr(self, "input_scale", None)))
        q = fake_quant_per_token(x, self.bits, symmetric=self.symmetric, clip_ratio=self.clip_ratio)
        return straight_through(x, q)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self.__dict__.setdefault("fmt", None)  # quantizers pickled before float formats

    def extra_repr(self) -> str:
        if self.fmt == "fp8-static":
            return "fp8, static per-tensor scale"
        if self.fmt is not None:
            return f"{self.fmt}, per-token{'' if ACTIVATION_FORMATS[self.fmt][1] is None else ' groups'}"
        return f"bits={self.bits}, {'sym' if self.symmetric else 'asym'}, per-token, clip_ratio={self.clip_ratio}"


class KVQuantizer(nn.Module):
    """Fake quantization of keys and values, just before attention.

    Integer grids (``fmt=None``): dynamic, per head and token (and group). FP8 (``fmt="fp8"``): E4M3 with static
    scales from calibration, one per tensor (``per_head=False``: what vLLM's FP8 KV cache reads as ``k_scale`` /
    ``v_scale``) or per KV head; while ``observing`` it records ``max |k|`` / ``max |v|`` (per head) and passes
    keys and values through unchanged, and :meth:`freeze` turns them into scales ``amax / 448``.

    Args:
        bits: 2-16 (FP8: 8).
        symmetric: usually False for integer KV caches (FP8: symmetric).
        group_size: head_dim columns per scale, or None for the whole head (integer grids).
        base: the attention implementation it wraps (``"sdpa"``, ``"eager"``), for display and unpickling.
        range_grad: in training, the gradient also flows through each scale
            (see :func:`fake_quant_per_token`); default: straight-through only.
        fmt: None (integer) or ``"fp8"``.
        per_head: FP8 scales per KV head instead of per tensor.
        num_heads: H_kv, for per-head FP8 scales.
    """

    range_grad: bool = False  # class default: KV quantizers pickled before the option unpickle without it
    fmt: str | None = None
    per_head: bool = False
    observing: bool = False
    bypass: bool = False  # True while :func:`quantizers_bypassed` holds: keys and values pass unchanged, unobserved

    def __init__(self, bits: int, *, symmetric: bool = False, group_size: int | None = None, base: str = "sdpa",
                 range_grad: bool = False, fmt: str | None = None, per_head: bool = False, num_heads: int = 1):
        super().__init__()
        check_bits(bits, "kv_bits")
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"kv_group_size={group_size!r} is invalid: use a positive divisor of head_dim or null")
        if fmt not in (None, "fp8"):
            raise ValueError(f"kv_format={fmt!r}: use 'fp8' or null (an integer grid)")
        if fmt == "fp8" and (bits != 8 or not symmetric or group_size is not None):
            raise ValueError("an FP8 KV cache is 8-bit and symmetric with one scale per tensor or head: set kv_bits: 8, "
                             "kv_symmetric: true and no kv_group_size")
        self.bits, self.symmetric, self.group_size, self.base = bits, symmetric, group_size, base
        self.range_grad = range_grad
        self.fmt, self.per_head, self.observing = fmt, per_head, fmt == "fp8"
        shape = (num_heads if per_head else 1,)
        self.register_buffer("k_scale", torch.zeros(shape) if fmt else None, persistent=False)  # amax while observing
        self.register_buffer("v_scale", torch.zeros(shape) if fmt else None, persistent=False)

    def forward(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """key, value (B, H_kv, T, D) → same shapes and dtypes, each on its grid."""
        if self.bypass:
            return key, value
        if self.fmt == "fp8":
            if self.observing:
                self._observe(key, value)
                return key, value
            return (straight_through(key, self._fp8(key, self.k_scale)),
                    straight_through(value, self._fp8(value, self.v_scale)))
        kw = {"symmetric": self.symmetric, "group_size": self.group_size}
        if self.range_grad:
            return (fake_quant_per_head(key, self.bits, range_grad=True, **kw),
                    fake_quant_per_head(value, self.bits, range_grad=True, **kw))
        return (straight_through(key, fake_quant_per_head(key, self.bits, **kw)),
                straight_through(value, fake_quant_per_head(value, self.bits, **kw)))

    def _observe(self, key: torch.Tensor, value: torch.Tensor) -> None:
        with torch.no_grad():
            for buf, t in ((self.k_scale, key), (self.v_scale, value)):
                amax = t.detach().abs().float().amax(dim=(0, 2, 3)) if self.per_head else t.detach().abs().float().amax()
                buf.copy_(torch.maximum(buf, amax.reshape(buf.shape).to(buf.device)))

    def freeze(self) -> None:
        """Turn the observed maxima into FP8 scales ``amax / 448`` (1 where nothing was seen) and stop observing."""
        with torch.no_grad():
            for buf in (self.k_scale, self.v_scale):
                scale = buf / 448.0
                buf.copy_(torch.where(scale > 0, scale, torch.ones_like(scale)))
        self.observing = False

    def _fp8(self, t: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        s = scale.to(t.device, torch.float32).reshape(1, -1, 1, 1)
        return (floats.round_to_grid(floats.E4M3, t.float() / s) * s).to(t.dtype)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _register_kv_attention(self.base)  # an unpickled model finds its attention function in a new process

    def extra_repr(self) -> str:
        if self.fmt == "fp8":
            return (f"fp8, static per-{'head' if self.per_head else 'tensor'} scales"
                    f"{' (observing)' if self.observing else ''}, base={self.base}")
        g = "head" if self.group_size is None else f"g{self.group_size}"
        return f"bits={self.bits}, {'sym' if self.symmetric else 'asym'}, per-token per-{g}, base={self.base}"


class QKRotation(nn.Module):
    """R3: the same online Hadamard on every query and key head, after RoPE (QuaRot, arXiv 2404.00456, §4).

    ``q ↦ q Q``, ``k ↦ k Q`` with ``Q = H_Dᵀ / √D`` orthogonal (D = head_dim),
    so every score ``q kᵀ = (q Q)(k Q)ᵀ`` is unchanged and the full-precision
    model computes the same function; the keys a quantized KV cache holds are
    ``k Q``, their outlier channels spread over the whole head. Values are not
    touched (R2 rotates them, fused into v_proj / o_proj).

    Args:
        head_dim: D, ``2^a * m`` (see :func:`compressor.core.hadamard.hadamard_factors`).
        base: the attention implementation it runs under (``"sdpa"``, ``"eager"``),
            for display and unpickling.

    Holds an :class:`~compressor.runtime.online.OnlineHadamard` child
    ``hadamard`` (a non-persistent buffer: nothing enters the state dict).
    """

    def __init__(self, head_dim: int, *, base: str = "sdpa"):
        super().__init__()
        self.hadamard = OnlineHadamard(head_dim)
        self.head_dim, self.base = head_dim, base

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """query (B, H, Tq, D), key (B, H_kv, Tk, D) → (query Q, key Q), same shapes and dtypes."""
        return self.hadamard(query), self.hadamard(key)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The orthogonal Q (D, D) with forward(q, k) = (q @ Q, k @ Q)."""
        return self.hadamard.matrix(dtype)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _register_kv_attention(self.base)  # an unpickled model finds its attention function in a new process

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, after RoPE, base={self.base}"


@contextmanager
def quantizers_bypassed(module: nn.Module) -> Iterator[int]:
    """Within the ``with``: every :class:`ActivationQuantizer` and :class:`KVQuantizer` under ``module`` passes its
    inputs through unchanged (a KV quantizer still observing records nothing), so ``module`` computes what it
    would without them. The sequential pipeline runs the full-precision stream of a paired calibration (GPTAQ)
    this way: that stream stands for the uncompressed model, whose activations are not quantized.

    Yields:
        how many quantizers were bypassed.
    """
    found = [m for m in module.modules() if isinstance(m, (ActivationQuantizer, KVQuantizer))]
    for m in found:
        m.bypass = True
    try:
        yield len(found)
    finally:
        for m in found:
            m.bypass = False


# ---------------------------------------------------------------- linear inputs


def _quantize_input(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: replace the linear's input x by ``module.input_quantizer(x)``.

    When the linear also has an online ``input_transform``, that transform's
    hook must already have run (it was attached first); a transform attached
    after the quantizer would rotate the quantized input, so that raises.
    """
    if online.TRANSFORM_CHILD in module._modules:
        check_transform_first(module)
    return online.map_input(module, args, kwargs, INPUT_CHILD)


def check_transform_first(module: nn.Module) -> None:
    """Raise unless ``module``'s online input transform (if any) runs before its input quantizer."""
    hooks = list(module._forward_pre_hooks.values())
    rotations = [i for i, h in enumerate(hooks) if online.is_input_transform_hook(h)]
    if rotations and rotations[0] > hooks.index(_quantize_input):
        raise ValueError(
            f"{type(module).__name__}: its online {online.TRANSFORM_CHILD} was attached after its {INPUT_CHILD}, so it "
            "would rotate already-quantized inputs; rotate the model first, then quantize activations "
            "(put the rotate pass first in the recipe)"
        )


def attach_input_quantizer(linear: nn.Linear, quantizer: ActivationQuantizer) -> None:
    """Fake-quantize every input of ``linear`` from now on (in place).

    An online rotation already on ``linear`` runs before the quantizer
    (pre-hooks run in the order they were registered).

    Raises:
        ValueError: ``linear`` is not an nn.Linear or already has an input quantizer.
    """
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"activation quantizers attach to nn.Linear, got {type(linear).__name__}")
    if INPUT_CHILD in linear._modules:
        raise ValueError(f"{linear} already has an {INPUT_CHILD}; quantize the activations of a model once")
    linear.add_module(INPUT_CHILD, quantizer)
    linear.register_forward_pre_hook(_quantize_input, with_kwargs=True)


# ---------------------------------------------------------------- keys and values


def _kv_attention(base: str) -> Callable:
    """Attention function: R3 on query and key, then fake-quantize key and value, each when the module has it; then ``base``."""
    shared = attention_function(base)

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs):
        # query (B, H, Tq, D); key, value (B, H_kv, Tk, D), after RoPE and the cache update
        rotation = module._modules.get(QK_CHILD)
        if rotation is not None:  # R3 first: the quantizer below sees k Q
            query, key = rotation(query, key)
        quantizer = module._modules.get(KV_CHILD)
        if quantizer is not None:
            key, value = quantizer(key, value)
        fn = shared if shared is not None else eager_attention(module)
        return fn(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"kvquant_{base}_attention"
    return attention


def unwrapped_attention(implementation: str) -> str:
    """The implementation underneath our KV wrapper's name (``compressor_kvquant:sdpa`` → ``sdpa``); others as given."""
    return implementation[len(KV_ATTENTION_PREFIX):] if implementation.startswith(KV_ATTENTION_PREFIX) else implementation


def _register_kv_attention(base: str) -> str:
    """Register ``compressor_kvquant:<base>`` with transformers (idempotent); returns the name."""
    name = KV_ATTENTION_PREFIX + base
    register_attention(name, _kv_attention(base), mask_like=base)
    return name


def wrapped_attention(attention: nn.Module, what: str) -> tuple[str, str]:
    """``(base, name)``: the module's own implementation and our registered wrapper of it; changes nothing on the module.

    The wrapper ``compressor_kvquant:<base>`` is registered with transformers once (its mask
    function is ``base``'s, so padding and causal masks are built exactly as for ``base``).

    Raises:
        ValueError: no ``config._attn_implementation``, or an implementation
            other than sdpa / eager (``what`` says which feature needed it).
    """
    base = base_attention(attention, what, KV_ATTENTION_PREFIX)
    return base, _register_kv_attention(base)


def attach_kv_quantizer(attention: nn.Module, quantizer: KVQuantizer) -> None:
    """Fake-quantize the keys and values ``attention`` attends over, from now on (in place).

    Switches ``attention.config._attn_implementation`` (the model's config,
    shared by every layer) from ``base`` to ``compressor_kvquant:<base>``;
    attention modules without a ``kv_quantizer`` run ``base`` unchanged
    through it. A ``qk_rotation`` (R3) on the same module runs first whatever
    the order of attachment: the quantizer always sees rotated keys.

    Raises:
        ValueError: no config / unsupported implementation, a group size that
            does not divide head_dim, or a module that already has one.
    """
    base, name = wrapped_attention(attention, "KV quantization")
    if KV_CHILD in attention._modules:
        raise ValueError(f"{type(attention).__name__} already has a {KV_CHILD}; quantize the KV cache of a model once")
    head_dim = getattr(attention, "head_dim", None)
    if isinstance(head_dim, int):
        check_group(quantizer.group_size, head_dim)
    quantizer.base = base
    attention.add_module(KV_CHILD, quantizer)
    set_attention(attention, name)


def attach_qk_rotation(attention: nn.Module, rotation: QKRotation) -> None:
    """Rotate the queries and keys of ``attention`` after RoPE (R3), from now on (in place).

    Exact in full precision (q kᵀ is invariant), so no weight changes. Uses
    the same attention function as :func:`attach_kv_quantizer`, which applies
    R3 before quantizing the keys.

    Raises:
        ValueError: no config / unsupported implementation, a rotation whose
            size is not the module's head_dim, or a module that already has one.
    """
    base, name = wrapped_attention(attention, "rotating queries and keys (R3)")
    if QK_CHILD in attention._modules:
        raise ValueError(f"{type(attention).__name__} already has a {QK_CHILD}; rotate a fresh model")
    head_dim = getattr(attention, "head_dim", None)
    if isinstance(head_dim, int) and head_dim != rotation.head_dim:
        raise ValueError(f"{type(attention).__name__} has head_dim={head_dim}, but the R3 rotation is "
                         f"{rotation.head_dim} wide")
    rotation.base = base
    attention.add_module(QK_CHILD, rotation)
    set_attention(attention, name)


def detach_qk_rotation(attention: nn.Module) -> bool:
    """Remove the R3 rotation :func:`attach_qk_rotation` gave ``attention``; True when it had one. The
    attention function stays the wrapper, which runs ``base`` unchanged without a ``qk_rotation``."""
    return attention._modules.pop(QK_CHILD, None) is not None


def activation_quantizers(model: nn.Module) -> list[str]:
    """Qualified names of the modules of ``model`` that quantize their inputs or their keys/values at run time."""
    return [name for name, m in model.named_modules() if INPUT_CHILD in m._modules or KV_CHILD in m._modules]


def qk_rotations(model: nn.Module) -> list[str]:
    """Qualified names of the attention modules of ``model`` that rotate queries and keys at run time (R3)."""
    return [name for name, m in model.named_modules() if QK_CHILD in m._modules]

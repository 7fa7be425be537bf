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
import sys
from typing import Callable

import torch
from torch import nn

from compressor.runtime import online
from compressor.runtime.online import OnlineHadamard

__all__ = [
    "fake_quant_per_token",
    "fake_quant_per_head",
    "ActivationQuantizer",
    "KVQuantizer",
    "QKRotation",
    "attach_input_quantizer",
    "attach_kv_quantizer",
    "attach_qk_rotation",
    "attention_modules",
    "activation_quantizers",
    "qk_rotations",
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
MAX_BITS = 16
KV_BASES = ("sdpa", "eager")  # attention implementations the KV quantizer wraps


def _check_bits(bits: int, what: str = "bits") -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= MAX_BITS:
        raise ValueError(f"{what}={bits!r} is not supported: use an integer from 2 to {MAX_BITS} (8 or 4 usually)")


def _check_clip(clip_ratio: float, what: str = "clip_ratio") -> None:
    if isinstance(clip_ratio, bool) or not isinstance(clip_ratio, (int, float)) or not 0.0 < clip_ratio <= 1.0:
        raise ValueError(f"{what}={clip_ratio!r} is out of range: use a ratio in (0, 1], e.g. 1.0 (no clipping) or 0.9")


def _round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward, identity gradient to ``x``."""
    return x + (torch.round(x) - x).detach()


def _fake_quant_rows(x: torch.Tensor, bits: int, symmetric: bool, clip_ratio: float | torch.Tensor,
                     range_grad: bool = False) -> torch.Tensor:
    """Fake-quantize each row of x (..., K) over its last dim; float32/float64 in and out.

    With ``range_grad`` (and ``x.requires_grad``) only the rounding is
    straight-through: the gradient also flows through each row's scale, i.e.
    its min / max (LSQ-style), so training sees that a smaller range means a
    finer grid. Otherwise the result carries no gradient. ``clip_ratio`` may
    be a 0-d float tensor that requires grad (a learned clip, OSTQuant's
    ``learn_clip``); with ``range_grad`` it gets a gradient through the scale.
    """
    rnd = _round_ste if range_grad and x.requires_grad else torch.round
    if symmetric:
        qmax = float((1 << (bits - 1)) - 1)
        qmin = -qmax - 1.0
        scale = x.abs().amax(dim=-1, keepdim=True) * clip_ratio / qmax  # (..., 1)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)  # an all-zero row stays zero
        return torch.clamp(rnd(x / scale), qmin, qmax) * scale
    qmax = float((1 << bits) - 1)
    lo = torch.clamp(x.amin(dim=-1, keepdim=True), max=0.0) * clip_ratio  # (..., 1), <= 0
    hi = torch.clamp(x.amax(dim=-1, keepdim=True), min=0.0) * clip_ratio  # (..., 1), >= 0
    scale = (hi - lo) / qmax
    scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    zp = torch.round(-lo / scale)  # in [0, qmax]; no gradient
    return (torch.clamp(rnd(x / scale) + zp, 0.0, qmax) - zp) * scale


def fake_quant_per_token(
    x: torch.Tensor, bits: int, *, symmetric: bool = True, clip_ratio: float | torch.Tensor = 1.0,
    range_grad: bool = False
) -> torch.Tensor:
    """Quantize-dequantize every token of ``x`` on its own grid (dynamic per-token).

    Args:
        x: (..., K) float activations; each row over the last dim is a token.
        bits: 2-16.
        symmetric: signed grid ``[-2^(b-1), 2^(b-1) - 1]`` without zero point,
            or unsigned ``[0, 2^b - 1]`` with an integer zero point.
        clip_ratio: in (0, 1]; the token's range is shrunk by it and values
            beyond saturate. May be a 0-d float tensor, e.g. a learned ratio
            that requires grad (OSTQuant's ``learn_clip``; with ``range_grad``
            it gets a gradient through the scale); its value is the caller's
            to keep in (0, 1], since checking it would synchronize the device.
        range_grad: when ``x`` requires grad, the result does too: the
            rounding is straight-through and the gradient also reaches each
            token's min / max through its scale (for training transforms that
            shrink the range; :mod:`compressor.algorithms.transforms.ostquant`). False:
            the result is constant (wrap it in a straight-through estimator).

    Returns:
        (..., K), same dtype as ``x``; each token holds at most ``2^bits``
        distinct values. Half precision is quantized in float32.

    Raises:
        ValueError: bad ``bits`` / ``clip_ratio`` or a non-float ``x``.
    """
    _check_bits(bits)
    if isinstance(clip_ratio, torch.Tensor):
        if clip_ratio.dim() != 0 or not clip_ratio.is_floating_point():
            raise ValueError(f"clip_ratio as a tensor must be a 0-d float tensor, got shape "
                             f"{tuple(clip_ratio.shape)} {clip_ratio.dtype}")
    else:
        _check_clip(clip_ratio)
        clip_ratio = float(clip_ratio)
    if not x.is_floating_point():
        raise ValueError(f"activation fake quantization needs a float tensor, got {x.dtype}")
    work = x if x.dtype in (torch.float32, torch.float64) else x.float()
    return _fake_quant_rows(work, bits, symmetric, clip_ratio, range_grad).to(x.dtype)


def fake_quant_per_head(
    x: torch.Tensor,
    bits: int,
    *,
    symmetric: bool = False,
    group_size: int | None = None,
    clip_ratio: float = 1.0,
    range_grad: bool = False,
) -> torch.Tensor:
    """Per-head, per-token fake quantization of keys or values (QuaRot §4 / OSTQuant KV cache).

    Args:
        x: (B, H, T, D) keys or values (``H`` kv heads, ``D`` head_dim).
        bits: 2-16.
        symmetric: as :func:`fake_quant_per_token` (KV caches are usually asymmetric).
        group_size: columns of head_dim sharing one scale; None means all of
            head_dim (one scale per batch, head and token). Must divide D.
        clip_ratio: in (0, 1].
        range_grad: as :func:`fake_quant_per_token`.

    Returns:
        (B, H, T, D), same dtype; one scale per (b, h, t, group).

    Raises:
        ValueError: ``x`` is not 4-D, or ``group_size`` does not divide D.
    """
    if x.ndim != 4:
        raise ValueError(f"per-head quantization expects (batch, heads, tokens, head_dim), got shape {tuple(x.shape)}")
    d = x.shape[-1]
    g = _check_group(group_size, d)
    grouped = x.reshape(*x.shape[:-1], d // g, g)  # (B, H, T, D/g, g)
    out = fake_quant_per_token(grouped, bits, symmetric=symmetric, clip_ratio=clip_ratio, range_grad=range_grad)
    return out.reshape(x.shape)


def _check_group(group_size: int | None, head_dim: int) -> int:
    """The group width for ``head_dim``; raises naming the valid divisors."""
    if group_size is None:
        return head_dim
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1 or head_dim % group_size:
        divisors = [k for k in range(1, head_dim + 1) if head_dim % k == 0]
        raise ValueError(f"kv_group_size={group_size!r} does not divide head_dim={head_dim}: use one of {divisors} "
                         "or null (the whole head)")
    return group_size


def _straight_through(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` in the forward, identity gradient to ``x`` (straight-through estimator) when training through it."""
    return x + (q - x).detach() if x.requires_grad else q


class ActivationQuantizer(nn.Module):
    """Dynamic per-token fake quantization of a linear's input: x (..., K) → (..., K), same dtype.

    Gradients pass straight through (STE), so a later training pass (distill)
    can still train the layers before it. Holds no tensors.

    Args:
        bits: 2-16.
        symmetric: signed grid without zero point, or unsigned with one.
        clip_ratio: in (0, 1].
    """

    def __init__(self, bits: int, *, symmetric: bool = True, clip_ratio: float = 1.0):
        super().__init__()
        _check_bits(bits)
        _check_clip(clip_ratio)
        self.bits, self.symmetric, self.clip_ratio = bits, symmetric, float(clip_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) float → (..., K) on each token's grid."""
        q = fake_quant_per_token(x, self.bits, symmetric=self.symmetric, clip_ratio=self.clip_ratio)
        return _straight_through(x, q)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, {'sym' if self.symmetric else 'asym'}, per-token, clip_ratio={self.clip_ratio}"


class KVQuantizer(nn.Module):
    """Per-head per-token fake quantization of keys and values, just before attention.

    Args:
        bits: 2-16.
        symmetric: usually False for KV caches.
        group_size: head_dim columns per scale, or None for the whole head.
        base: the attention implementation it wraps (``"sdpa"``, ``"eager"``), for display and unpickling.
        range_grad: in training, the gradient also flows through each scale
            (see :func:`fake_quant_per_token`); default: straight-through only.
    """

    range_grad: bool = False  # class default: KV quantizers pickled before the option unpickle without it

    def __init__(self, bits: int, *, symmetric: bool = False, group_size: int | None = None, base: str = "sdpa",
                 range_grad: bool = False):
        super().__init__()
        _check_bits(bits, "kv_bits")
        if group_size is not None and (isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1):
            raise ValueError(f"kv_group_size={group_size!r} is invalid: use a positive divisor of head_dim or null")
        self.bits, self.symmetric, self.group_size, self.base = bits, symmetric, group_size, base
        self.range_grad = range_grad

    def forward(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """key, value (B, H_kv, T, D) → same shapes and dtypes, each on its per-(b, h, t) grid."""
        kw = {"symmetric": self.symmetric, "group_size": self.group_size}
        if self.range_grad:
            return (fake_quant_per_head(key, self.bits, range_grad=True, **kw),
                    fake_quant_per_head(value, self.bits, range_grad=True, **kw))
        return (_straight_through(key, fake_quant_per_head(key, self.bits, **kw)),
                _straight_through(value, fake_quant_per_head(value, self.bits, **kw)))

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        _register_kv_attention(self.base)  # an unpickled model finds its attention function in a new process

    def extra_repr(self) -> str:
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


# ---------------------------------------------------------------- linear inputs


def _quantize_input(module: nn.Module, args: tuple, kwargs: dict):
    """Forward pre-hook: replace the linear's input x by ``module.input_quantizer(x)``.

    When the linear also has an online ``input_transform``, that transform's
    hook must already have run (it was attached first); a transform attached
    after the quantizer would rotate the quantized input, so that raises.
    """
    if online._CHILD in module._modules:
        _check_transform_first(module)
    return online.map_input(module, args, kwargs, INPUT_CHILD)


def _check_transform_first(module: nn.Module) -> None:
    hooks = list(module._forward_pre_hooks.values())
    if online._rotate_input in hooks and hooks.index(online._rotate_input) > hooks.index(_quantize_input):
        raise ValueError(
            f"{type(module).__name__}: its online {online._CHILD} was attached after its {INPUT_CHILD}, so it "
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


def _eager_attention(module: nn.Module) -> Callable:
    """The model family's own ``eager_attention_forward`` (it lives in the model's file, not in the registry)."""
    fn = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
    if fn is None:
        raise ValueError(f"{type(module).__name__} has no eager_attention_forward in its module: load the model "
                         "with attn_implementation='sdpa' before quantizing its KV cache")
    return fn


def _kv_attention(base: str, registry: dict) -> Callable:
    """Attention function: R3 on query and key, then fake-quantize key and value, each when the module has it; then ``base``."""
    shared = None if base == "eager" else registry[base]

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, **kwargs):
        # query (B, H, Tq, D); key, value (B, H_kv, Tk, D), after RoPE and the cache update
        rotation = module._modules.get(QK_CHILD)
        if rotation is not None:  # R3 first: the quantizer below sees k Q
            query, key = rotation(query, key)
        quantizer = module._modules.get(KV_CHILD)
        if quantizer is not None:
            key, value = quantizer(key, value)
        fn = shared if shared is not None else _eager_attention(module)
        return fn(module, query, key, value, attention_mask, **kwargs)

    attention.__name__ = f"kvquant_{base}_attention"
    return attention


def _register_kv_attention(base: str) -> str:
    """Register ``compressor_kvquant:<base>`` (attention and mask functions) with transformers; returns the name.

    Idempotent. The mask function is ``base``'s, so padding and causal masks
    are built exactly as for ``base``.
    """
    from transformers.masking_utils import AttentionMaskInterface
    from transformers.modeling_utils import AttentionInterface

    name = KV_ATTENTION_PREFIX + base
    if name in AttentionInterface._global_mapping:
        return name
    if base not in KV_BASES:  # flash / flex kernels take other masks and dtypes: not wrapped (untested)
        raise ValueError(f"cannot wrap attn_implementation={base!r}: load the model with "
                         "attn_implementation='sdpa' or 'eager'")
    masks = AttentionMaskInterface._global_mapping
    AttentionInterface.register(name, _kv_attention(base, AttentionInterface._global_mapping))
    AttentionMaskInterface.register(name, masks[base])
    return name


def attention_modules(root: nn.Module, prefix: str = "") -> list[tuple[str, nn.Module]]:
    """``(name, module)`` of the attention modules under ``root`` that dispatch through ``AttentionInterface``.

    An attention module is the innermost module whose class name ends in
    ``Attention``, that holds a ``config`` with ``_attn_implementation`` and
    whose defining file uses transformers' ``ALL_ATTENTION_FUNCTIONS`` (every
    modern transformers decoder: Llama, Mistral, Qwen2/3, Gemma, Phi-3...).
    """
    hits = []
    for name, m in root.named_modules():
        if not type(m).__name__.endswith("Attention") or not hasattr(getattr(m, "config", None), "_attn_implementation"):
            continue
        if getattr(sys.modules.get(type(m).__module__), "ALL_ATTENTION_FUNCTIONS", None) is None:
            continue
        hits.append((f"{prefix}.{name}" if prefix and name else (prefix or name), m))
    # BertAttention holds BertSelfAttention: keep the one that calls the attention function
    return [(n, m) for n, m in hits if not any(o.startswith(n + ".") for o, _ in hits)]


def _wrapped_attention(attention: nn.Module, what: str) -> tuple[str, str]:
    """``(base, name)``: the module's own implementation and our registered wrapper of it; changes nothing on the module.

    Raises:
        ValueError: no ``config._attn_implementation``, or an implementation
            other than sdpa / eager (``what`` says which feature needed it).
    """
    config = getattr(attention, "config", None)
    if not hasattr(config, "_attn_implementation"):
        raise ValueError(f"{type(attention).__name__} has no config._attn_implementation: {what} needs a "
                         "transformers attention module")
    impl = config._attn_implementation or "eager"
    base = impl[len(KV_ATTENTION_PREFIX):] if impl.startswith(KV_ATTENTION_PREFIX) else impl
    if base not in KV_BASES:
        raise ValueError(f"cannot {what} with attn_implementation={base!r}: load the model with "
                         "attn_implementation='sdpa' or 'eager'")
    if base == "eager":
        _eager_attention(attention)
    return base, _register_kv_attention(base)


def _switch_attention(attention: nn.Module, name: str) -> None:
    """Point ``attention.config._attn_implementation`` (shared by every layer) at our wrapper ``name``."""
    config = attention.config
    impl = config._attn_implementation
    if impl != name:
        config._attn_implementation = name
        log.info("attention implementation %s -> %s", impl, name)


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
    base, name = _wrapped_attention(attention, "KV quantization")
    if KV_CHILD in attention._modules:
        raise ValueError(f"{type(attention).__name__} already has a {KV_CHILD}; quantize the KV cache of a model once")
    head_dim = getattr(attention, "head_dim", None)
    if isinstance(head_dim, int):
        _check_group(quantizer.group_size, head_dim)
    quantizer.base = base
    attention.add_module(KV_CHILD, quantizer)
    _switch_attention(attention, name)


def attach_qk_rotation(attention: nn.Module, rotation: QKRotation) -> None:
    """Rotate the queries and keys of ``attention`` after RoPE (R3), from now on (in place).

    Exact in full precision (q kᵀ is invariant), so no weight changes. Uses
    the same attention function as :func:`attach_kv_quantizer`, which applies
    R3 before quantizing the keys.

    Raises:
        ValueError: no config / unsupported implementation, a rotation whose
            size is not the module's head_dim, or a module that already has one.
    """
    base, name = _wrapped_attention(attention, "rotating queries and keys (R3)")
    if QK_CHILD in attention._modules:
        raise ValueError(f"{type(attention).__name__} already has a {QK_CHILD}; rotate a fresh model")
    head_dim = getattr(attention, "head_dim", None)
    if isinstance(head_dim, int) and head_dim != rotation.head_dim:
        raise ValueError(f"{type(attention).__name__} has head_dim={head_dim}, but the R3 rotation is "
                         f"{rotation.head_dim} wide")
    rotation.base = base
    attention.add_module(QK_CHILD, rotation)
    _switch_attention(attention, name)


def activation_quantizers(model: nn.Module) -> list[str]:
    """Qualified names of the modules of ``model`` that quantize their inputs or their keys/values at run time."""
    return [name for name, m in model.named_modules() if INPUT_CHILD in m._modules or KV_CHILD in m._modules]


def qk_rotations(model: nn.Module) -> list[str]:
    """Qualified names of the attention modules of ``model`` that rotate queries and keys at run time (R3)."""
    return [name for name, m in model.named_modules() if QK_CHILD in m._modules]

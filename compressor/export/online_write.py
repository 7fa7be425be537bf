"""Writing an export's run-time parts (online Hadamards, input and KV quantizers) into ``quantization_config``;
the format is :mod:`compressor.export.online_format`."""

from __future__ import annotations

from typing import Any, NoReturn

import torch
from torch import nn

from compressor.core.arch import attention_implementation, attention_modules
from compressor.core.hadamard import hadamard_factors, hadamard_matrix, paley_matrix
from compressor.core.state import is_quantized
from compressor.export.online_format import EXTENSION_VERSION, R3, R4, RB, is_pow2
from compressor.runtime.activations import (
    INPUT_CHILD,
    KV_CHILD,
    QK_CHILD,
    ActivationQuantizer,
    KVQuantizer,
    QKRotation,
    check_transform_first,
    unwrapped_attention,
)
from compressor.runtime.online import TRANSFORM_CHILD, OnlineHadamard

__all__ = ["input_activation_args", "input_settings", "input_tensors", "kv_tensors", "check_online_exportable", "kv_cache_scheme", "transform_config",
           "transform_tensors", "extension"]


def _dynamic_args(bits: int, symmetric: bool, strategy: str, group_size: int | None) -> dict:
    """compressed-tensors ``QuantizationArgs`` (as a dict) of a dynamic integer quantizer."""
    return {
        "num_bits": bits,
        "type": "int",
        "symmetric": symmetric,
        "group_size": group_size,
        "strategy": strategy,
        "block_structure": None,
        "dynamic": True,
        "actorder": None,
        "observer": None,
        "observer_kwargs": {},
    }


def input_settings(linear: nn.Module) -> tuple[int, bool, float, str | None] | None:
    """``(bits, symmetric, clip_ratio, float format)`` of the ``input_quantizer`` of ``linear``, or None (the key of
    its config group)."""
    q = linear._modules.get(INPUT_CHILD)
    return None if q is None else (q.bits, q.symmetric, q.clip_ratio, getattr(q, "fmt", None))


def input_activation_args(bits: int, symmetric: bool, fmt: str | None = None) -> dict:
    """``input_activations`` of a config group: dynamic per-token quantization of the linear inputs.

    Integer grids: ``type: int``, ``strategy: token``. Float formats as compressed-tensors' presets write them:
    ``fp8`` as FP8_DYNAMIC's (``type: float``, ``strategy: token``, dynamic), ``mxfp4`` as MXFP4's (``strategy:
    group``, 32, dynamic, uint8 scales), ``nvfp4`` as NVFP4's (``strategy: tensor_group``, 16, ``dynamic: local``,
    E4M3 scales; the static global scale is the tensor ``<layer>.input_global_scale``). The clip ratio has no
    compressed-tensors field; :func:`extension` records it.
    """
    if fmt is None:
        return _dynamic_args(bits, symmetric, "token", None)
    args = {**_dynamic_args(bits, True, "token", None), "type": "float"}
    if fmt == "mxfp4":
        return {**args, "strategy": "group", "group_size": 32, "scale_dtype": "torch.uint8", "zp_dtype": "torch.uint8"}
    if fmt == "fp8-static":  # the FP8 preset's inputs: one static scale per layer, the tensor <layer>.input_scale
        return {**args, "strategy": "tensor", "dynamic": False, "observer": "minmax"}
    if fmt == "fp8-block":  # FP8_BLOCK's inputs: dynamic per token and 128 features
        return {**args, "strategy": "group", "group_size": 128}
    if fmt == "nvfp4":
        return {**args, "strategy": "tensor_group", "group_size": 16, "dynamic": "local", "observer": "static_minmax",
                "scale_dtype": "torch.float8_e4m3fn", "zp_dtype": "torch.float8_e4m3fn"}
    return args


def input_tensors(name: str, linear: nn.Module) -> dict[str, torch.Tensor]:
    """Stored tensors of ``linear``'s input quantizer: NVFP4's ``{name}.input_global_scale`` or static FP8's
    ``{name}.input_scale``, (1,) float32; else none."""
    q = linear._modules.get(INPUT_CHILD)
    out = {}
    for attr, key in (("global_scale", "input_global_scale"), ("input_scale", "input_scale")):
        t = getattr(q, attr, None)
        if t is not None:
            out[f"{name}.{key}"] = t.detach().cpu().to(torch.float32).reshape(1)
    return out


def _fail(where: str, what: str, fix: str) -> NoReturn:
    raise ValueError(f"{where}: {what}; {fix}")


def check_online_exportable(model: nn.Module) -> None:
    """Raise for run-time transforms or quantizers the export cannot record.

    Exportable: an :class:`OnlineHadamard` ``input_transform`` on any
    ``nn.Linear``; an :class:`ActivationQuantizer` ``input_quantizer`` on a
    linear whose weight is quantized; a :class:`QKRotation` (R3) on attention
    modules of one head_dim; one :class:`KVQuantizer` setting on every
    attention module.

    Raises:
        ValueError: naming the module, what is wrong and the fix.
    """
    for name, m in model.named_modules():
        t = m._modules.get(TRANSFORM_CHILD) if isinstance(m, nn.Linear) else None
        if t is not None and type(t) is not OnlineHadamard:
            _fail(name, f"its online {TRANSFORM_CHILD} is a {type(t).__name__}, and only online Hadamard transforms "
                  "(rotate: r4) can be exported", "rotate with r4=false or evaluate the model in memory")
        q = m._modules.get(INPUT_CHILD)
        if q is None:
            continue
        if not isinstance(q, ActivationQuantizer) or not isinstance(m, nn.Linear):
            _fail(name, f"its {INPUT_CHILD} is a {type(q).__name__} on a {type(m).__name__}; only per-token "
                  "ActivationQuantizers on nn.Linear can be exported", "quantize activations with quantize_activations")
        if not is_quantized(m):
            _fail(name, "its input is quantized but its weight is not, and compressed-tensors config groups record "
                  "input activations of quantized linears only", "give quantize_activations the same targets and "
                  "ignore as the weight quantization pass (or quantize this linear's weight too)")
        if t is not None:
            try:
                check_transform_first(m)
            except ValueError as err:
                raise ValueError(f"{name}: {err}") from None
    _kv_quantizer(model)
    _r3_head_dim(model)


def _kv_quantizer(model: nn.Module) -> KVQuantizer | None:
    """The one KV quantizer setting of ``model`` (or None); raises for a partial or mixed KV quantization."""
    attention = attention_modules(model)
    found = [(n, a._modules[KV_CHILD]) for n, a in attention if KV_CHILD in a._modules]
    known = {n for n, _ in attention}
    stray = [n for n, m in model.named_modules() if KV_CHILD in m._modules and n not in known]
    if stray:
        _fail(stray[0], f"holds a {KV_CHILD} but is not a transformers attention module", "remove it")
    if not found:
        return None
    if len(found) != len(attention):
        missing = next(n for n, a in attention if KV_CHILD not in a._modules)
        _fail(missing, f"has no {KV_CHILD} while {len(found)} other attention module(s) quantize their keys and "
              "values; kv_cache_scheme covers every attention module", "quantize the KV cache of every layer "
              "(quantize_activations with kv_bits) or of none")
    for n, q in found:
        if not isinstance(q, KVQuantizer):
            _fail(n, f"its {KV_CHILD} is a {type(q).__name__}", "quantize the KV cache with quantize_activations")
    settings = {(q.bits, q.symmetric, q.group_size, q.fmt, q.per_head) for _, q in found}
    if len(settings) > 1:
        _fail(found[0][0], f"attention modules quantize keys and values with different settings {sorted(settings, key=str)} "
              "(bits, symmetric, group_size, format, per head), and kv_cache_scheme holds one", "quantize the KV cache of every layer "
              "with the same settings")
    return found[0][1]


def _r3_head_dim(model: nn.Module) -> int | None:
    """head_dim of the R3 rotations of ``model`` (or None); raises for rotations the export cannot write."""
    found = [(n, m._modules[QK_CHILD]) for n, m in model.named_modules() if QK_CHILD in m._modules]
    for n, r in found:
        if not isinstance(r, QKRotation) or type(r.hadamard) is not OnlineHadamard:
            _fail(n, f"its {QK_CHILD} is not a Hadamard QKRotation", "rotate with r3=false or evaluate in memory")
    dims = {r.head_dim for _, r in found}
    if len(dims) > 1:
        _fail(found[0][0], f"R3 rotations of different head dims {sorted(dims)}; one R3 scheme holds one head_dim",
              "rotate with r3=false")
    return dims.pop() if dims else None


def kv_cache_scheme(model: nn.Module) -> dict | None:
    """``quantization_config["kv_cache_scheme"]`` of ``model``: dynamic int per (batch, kv head, token, group), or None."""
    q = _kv_quantizer(model)
    if q is None:
        return None
    if q.fmt == "fp8":  # static scales, k_scale / v_scale per attention module (compressed-tensors' FP8 KV cache)
        if q.observing:
            _fail("the KV quantizers", "are still calibrating (no scales yet)", "run the quantize_activations pass "
                  "through compress() with calibration data")
        return {**_dynamic_args(8, True, "attn_head" if q.per_head else "tensor", None), "type": "float",
                "dynamic": False}
    group = q.group_size or int(attention_modules(model)[0][1].head_dim)  # None: the whole head
    return _dynamic_args(q.bits, q.symmetric, "group", group)


def kv_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """An FP8 KV cache's static scales: ``{attn}.k_scale`` / ``{attn}.v_scale``, float32 (1,) per tensor or
    (H_kv, 1, 1) per head (compressed-tensors' ``attn_head`` shape); none for dynamic integer caches."""
    out = {}
    for name, attn in attention_modules(model):
        q = attn._modules.get(KV_CHILD)
        if q is None or q.fmt != "fp8":
            continue
        for leaf in ("k_scale", "v_scale"):
            t = getattr(q, leaf).detach().cpu().to(torch.float32)
            out[f"{name}.{leaf}"] = t.reshape(-1, 1, 1) if q.per_head else t.reshape(1)
    return out


def _linear_transforms(model: nn.Module) -> list[tuple[str, OnlineHadamard]]:
    return [(n, m._modules[TRANSFORM_CHILD]) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and TRANSFORM_CHILD in m._modules]


def _qk_transforms(model: nn.Module) -> list[tuple[str, OnlineHadamard]]:
    return [(n, m._modules[QK_CHILD].hadamard) for n, m in model.named_modules() if QK_CHILD in m._modules]


def _scheme(sizes: set[int], apply: list[dict], head_dim: int | None) -> dict:
    """A compressed-tensors ``TransformScheme`` dict of our (stored) Hadamard transforms."""
    return {
        "type": "hadamard" if all(is_pow2(s) for s in sizes) else "random-hadamard",
        "apply": apply,
        "randomize": False,
        "requires_grad": False,
        "head_dim": head_dim,
        "precision": "torch.float32",
    }


def _targs(targets: list[str], location: str, inverse: bool = False) -> dict:
    return {"targets": targets, "location": location, "inverse": inverse, "ignore": []}


def _block_group(block: int) -> str:
    """The transform group of the block-diagonal input Hadamards of blocks of ``block``."""
    return f"{RB}{block}"


def _input_groups(model: nn.Module) -> dict[str, list[tuple[str, OnlineHadamard]]]:
    """The linears' online Hadamards by transform group: full-width ones under ``R4``, block-diagonal ones under
    one group per block size (``head_dim`` = the block)."""
    groups: dict[str, list[tuple[str, OnlineHadamard]]] = {}
    for name, t in _linear_transforms(model):
        groups.setdefault(R4 if t.block is None else _block_group(t.block), []).append((name, t))
    return groups


def transform_config(model: nn.Module) -> dict | None:
    """``quantization_config["transform_config"]`` for the online transforms of ``model``, or None.

    Targets are exact module names (sorted). See the module docstring for the
    schemes.
    """
    groups = {}
    for group, items in _input_groups(model).items():
        names = sorted(n for n, _ in items)
        block = items[0][1].block
        groups[group] = _scheme({t.width for _, t in items}, [_targs(names, "input"),
                                                              _targs(names, "weight_input", True)], block)
    r3 = _qk_transforms(model)
    if r3:
        head_dim = _r3_head_dim(model)
        names = sorted(n for n, _ in r3)
        groups[R3] = _scheme({head_dim}, [_targs(names, "q_attn"), _targs(names, "k_cache")], head_dim)
    return {"config_groups": groups} if groups else None


def _hadamard_weight(transform: OnlineHadamard) -> torch.Tensor:
    """compressed-tensors' transform weight of ``transform``: H (b, b) float32, ±1, with forward(x) = x H / √b on
    each block of b (b = n for a full-width transform).

    OnlineHadamard computes x kron(H_{2^a}, H_m)ᵀ / √b with its Paley
    factor H_m as ``base``; built directly (no b×b transform of the identity).
    """
    n = transform.width
    _, m = hadamard_factors(n)
    base = None if transform.base is None else transform.base.detach().cpu()
    if (base is None) != (m == 1) or (base is not None and not torch.equal(base, paley_matrix(m).to(base.dtype))):
        raise ValueError(f"the online transform of size {n} holds a modified Hadamard factor; it cannot be exported")
    return hadamard_matrix(n, dtype=torch.float32).T.contiguous()


def transform_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The transform weights to store: one (b, b) float32 ±1 matrix per group and size, named
    ``<first target>.<group>_<location>.weight`` (R4 and the block groups: ``..._input``, R3: ``..._q_attn``, shared
    with ``k_cache``)."""
    out: dict[str, torch.Tensor] = {}
    parts = [(group, "input", items) for group, items in _input_groups(model).items()]
    for group, location, items in parts + [(R3, "q_attn", _qk_transforms(model))]:
        done: set[int] = set()
        for name, t in items:
            if t.width not in done:
                done.add(t.width)
                out[f"{name}.{group}_{location}.weight"] = _hadamard_weight(t)
    return out


def extension(model: nn.Module, clip_ratios: dict[str, float], weight_bits: dict[str, int] | None = None) -> dict | None:
    """``quantization_config["compressor"]``: settings compressed-tensors has no field for, or None when there are none.

    Args:
        model: the model being exported.
        clip_ratios: ``{config group name: clip_ratio}`` of the groups whose input quantizers clip (ratio != 1).
        weight_bits: ``{config group name: bits}`` of the groups whose codes use fewer bits than their
            ``num_bits`` says (7-bit codes in an 8-bit ``int-quantized`` group).
    """
    out: dict[str, Any] = {}
    if clip_ratios:
        out["input_activations"] = {g: {"clip_ratio": c} for g, c in clip_ratios.items()}
    if weight_bits:
        out["weights"] = {g: {"num_bits": b} for g, b in weight_bits.items()}
    kv = _kv_quantizer(model)
    if kv is not None and kv.fmt is None:  # FP8 caches are fully described by kv_cache_scheme and the scales
        out["kv_cache"] = {"num_bits": kv.bits, "symmetric": kv.symmetric, "group_size": kv.group_size}
    if kv is not None or _qk_transforms(model):
        out["attn_implementation"] = unwrapped_attention(attention_implementation(model))
    return {"version": EXTENSION_VERSION, **out} if out else None

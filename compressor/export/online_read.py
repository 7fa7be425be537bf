"""Reading an export's run-time parts back onto a loaded model (:mod:`compressor.export.online_format`)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from compressor.core.arch import attention_modules
from compressor.core.fake_quant import ACTIVATION_FORMATS
from compressor.core.hadamard import hadamard_matrix
from compressor.core.passes import matches
from compressor.export.online_format import EXTENSION, OFFLINE_LOCATIONS, is_pow2
from compressor.runtime.activations import (
    ActivationQuantizer,
    KVQuantizer,
    QKRotation,
    attach_kv_quantizer,
    attach_qk_rotation,
)
from compressor.runtime.online import TRANSFORM_CHILD, OnlineHadamard, attach_input_transform

__all__ = ["StoredHadamard", "input_quantizer", "check_input_activations", "attn_implementation", "check_transform_config", "pop_transform_tensors",
           "attach_transforms", "attach_kv_quantizers"]


class StoredHadamard(nn.Module):
    """x ↦ x W / √b with a transform weight W (b, b) read from a checkpoint (compressed-tensors' HadamardTransform),
    on the whole last dim (b = n) or, with ``size`` a multiple of b, on each of its blocks of b (``head_dim``).

    Used when the stored matrix is not the one :class:`OnlineHadamard` builds
    (e.g. a compressed-tensors or llm-compressor export); computes in float32
    (float64 inputs in float64) and casts back. W is a non-persistent buffer.
    """

    def __init__(self, weight: torch.Tensor, size: int | None = None):
        super().__init__()
        if weight.ndim != 2 or weight.shape[0] != weight.shape[1]:
            raise ValueError(f"a transform weight must be square, got shape {tuple(weight.shape)}")
        self.width = weight.shape[0]
        self.size = size or self.width
        if self.size % self.width:
            raise ValueError(f"a ({self.width}, {self.width}) transform weight does not tile width {self.size}")
        self.register_buffer("weight", weight.detach().to(torch.float32).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., n) → (..., n), same dtype."""
        if x.shape[-1] != self.size:
            raise ValueError(f"StoredHadamard({self.size}) got an input with last dim {x.shape[-1]}")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        blocks = x.to(work).reshape(*x.shape[:-1], self.size // self.width, self.width)
        return ((blocks @ self.weight.to(work)) / math.sqrt(self.width)).reshape(x.shape).to(x.dtype)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The (n, n) matrix Q with forward(x) = x @ Q (block-diagonal when the stored weight is narrower)."""
        q = self.weight.to(dtype) / math.sqrt(self.width)
        return torch.block_diag(*[q] * (self.size // self.width))

    def extra_repr(self) -> str:
        return f"size={self.size}" + (f", block={self.width}" if self.width != self.size else "")


def _our_weight(n: int) -> torch.Tensor | None:
    """H (n, n) float32 with OnlineHadamard(n)(x) = x H / √n, or None when n has no construction."""
    try:
        return hadamard_matrix(n, dtype=torch.float32).T.contiguous()
    except ValueError:
        return None


def _module_factory(weight: torch.Tensor, size: int | None = None) -> Callable[[], nn.Module]:
    """Makes the module applying ``weight`` (b, b) to inputs of width ``size`` (default b; a multiple of b applies it
    block by block): OnlineHadamard when it is exactly our matrix (bit-exact with the exported model), else
    StoredHadamard, every one sharing one float32 copy of ``weight``."""
    b = weight.shape[0]
    n = size or b
    ours = _our_weight(b)
    if ours is not None and torch.equal(weight.to(torch.float32), ours):
        return lambda: OnlineHadamard(n, block=b)
    shared = weight.detach().to(torch.float32).contiguous()
    return lambda: StoredHadamard(shared, n)


def input_quantizer(args: dict | None, extra: dict | None, where: str,
                    global_scale: torch.Tensor | None = None,
                    input_scale: torch.Tensor | None = None) -> ActivationQuantizer | None:
    """The input quantizer a config group's ``input_activations`` (and our extension entry ``extra``) describe, or None.

    Args:
        global_scale: NVFP4's stored ``input_global_scale`` of the layer (1,), when the group's inputs are NVFP4.
        input_scale: static FP8's stored ``input_scale`` of the layer (1,), when the group's inputs are FP8 per
            tensor, static.

    Raises:
        ValueError: anything other than dynamic per-token integer activations or the float formats
            :func:`compressor.export.online_write.input_activation_args` writes (FP8 per token, MXFP4 and
            NVFP4 groups), or NVFP4 inputs without their global scale.
    """
    if not args:
        return None
    fmt = check_input_activations(args, where)
    if fmt is not None:
        if fmt == "nvfp4" and global_scale is None:
            raise ValueError(f"{where}: NVFP4 input_activations need each layer's input_global_scale, which the "
                             "checkpoint lacks: it is incomplete or corrupt")
        if fmt == "fp8-static" and (input_scale is None or input_scale.numel() != 1):
            raise ValueError(f"{where}: static FP8 input_activations need each layer's (1,) input_scale, which the "
                             "checkpoint lacks: it is incomplete or corrupt")
        return ActivationQuantizer(ACTIVATION_FORMATS[fmt][0], fmt=fmt, global_scale=global_scale if fmt == "nvfp4" else None,
                                   input_scale=input_scale if fmt == "fp8-static" else None)
    return ActivationQuantizer(int(args["num_bits"]), symmetric=bool(args.get("symmetric", True)),
                               clip_ratio=float((extra or {}).get("clip_ratio", 1.0)))


def check_input_activations(args: dict, where: str) -> str | None:
    """Validate a config group's ``input_activations``; returns its float format (``fp8`` / ``mxfp4`` / ``nvfp4``)
    or None for dynamic per-token integers.

    Raises:
        ValueError: a scheme this loader does not run.
    """
    fmt = _float_input_format(args, where)
    if fmt is None and (args.get("type", "int") != "int" or args.get("strategy") != "token"
                        or args.get("dynamic") is not True):
        raise ValueError(f"{where}: input_activations {args} are not supported: this loader runs dynamic per-token "
                         "integer activations (type: int, strategy: token, dynamic: true) and dynamic FP8 / MXFP4 / "
                         "NVFP4 activations; load static activation schemes with vLLM")
    return fmt


def _float_input_format(args: dict, where: str) -> str | None:
    """Which float activation format a float ``input_activations`` entry is, or None for an integer one.

    Raises:
        ValueError: a float entry that is none of FP8 per token (dynamic), MXFP4 (group 32, dynamic) or
            NVFP4 (tensor_group 16, dynamic local).
    """
    if args.get("type") != "float":
        return None
    bits, strategy, group, dynamic = args.get("num_bits"), args.get("strategy"), args.get("group_size"), args.get("dynamic")
    if bits == 8 and strategy == "token" and dynamic is True:
        return "fp8"
    if bits == 8 and strategy == "tensor" and dynamic is False:
        return "fp8-static"
    if bits == 8 and strategy == "group" and group == 128 and dynamic is True:
        return "fp8-block"
    if bits == 4 and strategy == "group" and group == 32 and dynamic is True:
        return "mxfp4"
    if bits == 4 and strategy == "tensor_group" and group == 16 and dynamic == "local":
        return "nvfp4"
    raise ValueError(f"{where}: float input_activations {args} are not supported: this loader runs FP8 per token or per "
                     "128, FP8 per tensor (static), MXFP4 "
                     "(group 32) and NVFP4 (tensor_group 16, dynamic local) activations; load others with vLLM")


def attn_implementation(qcfg: dict) -> str | None:
    """The attention implementation an export's quantizers wrap (``sdpa`` / ``eager``), when recorded."""
    return (qcfg.get(EXTENSION) or {}).get("attn_implementation")


def _transform_groups(qcfg: dict) -> dict[str, dict]:
    return dict(((qcfg.get("transform_config") or {}).get("config_groups") or {}))


def pop_transform_tensors(qcfg: dict, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove and return the transform weights (``*.<group>_<location>.weight`` / ``.perm``) from ``tensors``."""
    prefixes = tuple(f"{g}_" for g in _transform_groups(qcfg))
    keys = [k for k in tensors if prefixes and "." in k and k.rsplit(".", 2)[-2].startswith(prefixes)]
    return {k: tensors.pop(k) for k in keys}


def _weight_for(tensors: dict[str, torch.Tensor], group: str, scheme: dict, location: str, name: str,
                size: int, where: str) -> torch.Tensor:
    """The stored (size, size) weight of ``group`` at ``name`` (own key, else the one shared by the group)."""
    own = tensors.get(f"{name}.{group}_{location}.weight")
    if own is not None:
        if tuple(own.shape) != (size, size):
            raise ValueError(f"{where}: {name}.{group}_{location}.weight has shape {tuple(own.shape)}, expected "
                             f"({size}, {size}): the checkpoint does not match its transform_config")
        return own
    shared = [t for k, t in tensors.items() if k.rsplit(".", 2)[-2].startswith(f"{group}_") and k.endswith(".weight")
              and tuple(t.shape) == (size, size)]
    if shared:
        return shared[0]
    if scheme.get("type") == "hadamard" and is_pow2(size):  # compressed-tensors builds Sylvester's matrix itself
        tensors[f"{name}.{group}_{location}.weight"] = _our_weight(size)  # built once, shared like a stored one
        return tensors[f"{name}.{group}_{location}.weight"]
    raise ValueError(f"{where}: transform group {group!r} has no stored weight of size {size} for {name}: the "
                     "checkpoint is incomplete or was written without its transform weights")


def check_transform_config(qcfg: dict, where: str) -> None:
    """Raise when ``transform_config`` holds a transform this loader cannot run (before any model is built).

    Supported: ``hadamard`` / ``random-hadamard`` schemes, not randomized, at
    ``input`` (linears) or ``q_attn`` + ``k_cache`` (R3); offline locations
    (``weight_input`` / ``weight_output``) are already in the weights.

    Raises:
        ValueError: naming the group, what is unsupported and the way out.
    """
    for group, scheme in _transform_groups(qcfg).items():
        if scheme.get("type") not in ("hadamard", "random-hadamard"):
            raise ValueError(f"{where}: transform group {group!r} has type {scheme.get('type')!r}; this loader runs "
                             "Hadamard transforms ('hadamard', 'random-hadamard') only: load it with vLLM")
        if scheme.get("randomize"):
            raise ValueError(f"{where}: transform group {group!r} is randomized per module (randomize: true); this "
                             "loader does not support permuted transforms: load it with vLLM")
        for a in scheme.get("apply", []):
            loc = a.get("location")
            if loc in OFFLINE_LOCATIONS:
                continue
            if loc not in ("input", "q_attn", "k_cache"):
                raise ValueError(f"{where}: transform group {group!r} applies at {loc!r}; this loader supports online "
                                 "transforms at 'input' (linears) and 'q_attn' + 'k_cache' (R3) only: load it with vLLM")
            if a.get("inverse") and loc != "input":
                raise ValueError(f"{where}: transform group {group!r}: inverse {loc} transforms are not supported")


def attach_transforms(model: nn.Module, qcfg: dict, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Reattach the online transforms of ``transform_config`` to a loaded model (in place).

    ``input`` → an ``input_transform`` on each targeted linear (``nn.Linear`` via
    :func:`attach_input_transform`, or a loader ``QuantLinear``, which applies it
    before its input quantizer); ``q_attn`` + ``k_cache`` → an R3
    :class:`QKRotation` on each targeted attention module. Offline locations
    are already fused into the stored weights. Each transform uses the stored
    matrix: :class:`OnlineHadamard` when it is exactly ours, else
    :class:`StoredHadamard`.

    Args:
        model: the loaded model.
        qcfg: ``quantization_config``.
        tensors: the transform weights (see :func:`pop_transform_tensors`), (n, n) each.
        where: the export path, for messages.

    Raises:
        ValueError: an unsupported scheme or location, a target the model lacks, a missing weight.
    """
    from compressor.runtime.float_linear import FloatQuantLinear
    from compressor.runtime.quant_linear import QuantLinear

    loaded = (QuantLinear, FloatQuantLinear)  # loader layers: the transform is their child, applied in forward
    check_transform_config(qcfg, where)
    modules = dict(model.named_modules())
    # one check and one copy per stored tensor, direction and input width
    factories: dict[tuple[int, bool, int | None], Callable[[], nn.Module]] = {}

    def module_for(weight: torch.Tensor, inverse: bool = False, size: int | None = None) -> nn.Module:
        key = (id(weight), inverse, size)
        if key not in factories:
            factories[key] = _module_factory(weight.transpose(0, 1) if inverse else weight, size)
        return factories[key]()
    for group, scheme in _transform_groups(qcfg).items():
        apply = [a for a in scheme.get("apply", []) if a.get("location") not in OFFLINE_LOCATIONS]

        def targets(a: dict, kinds: tuple[type, ...]) -> list[str]:
            pats, ignore = tuple(a.get("targets") or ()), tuple(a.get("ignore") or ())
            hits = [n for n, m in modules.items() if isinstance(m, kinds) and not matches(n, m, ignore)
                    and (matches(n, m, pats) or (isinstance(m, loaded) and "Linear" in pats))]
            if not hits:
                raise ValueError(f"{where}: transform group {group!r} targets {list(pats)[:3]} at {a['location']}, "
                                 "which match no module of the model: the checkpoint does not match its config")
            return hits

        for a in (a for a in apply if a["location"] == "input"):
            for name in targets(a, (nn.Linear, *loaded)):
                m = modules[name]
                size = scheme.get("head_dim") or m.in_features
                if m.in_features % size:
                    raise ValueError(f"{where}: transform group {group!r} is block-diagonal (head_dim={size}), which "
                                     f"does not tile {name}'s {m.in_features} inputs: the checkpoint does not match "
                                     "its config")
                t = module_for(_weight_for(tensors, group, scheme, "input", name, size, where), bool(a.get("inverse")),
                               m.in_features)
                if isinstance(m, loaded):
                    if TRANSFORM_CHILD in m._modules:
                        raise ValueError(f"{where}: {name} gets two input transforms; one per linear is supported")
                    m.add_module(TRANSFORM_CHILD, t)
                else:
                    attach_input_transform(m, t)
        qk = {a["location"]: a for a in apply if a["location"] in ("q_attn", "k_cache")}
        if qk:
            attn_kinds = tuple({type(m) for _, m in attention_modules(model)}) or (type(None),)
            names = {loc: set(targets(a, attn_kinds)) for loc, a in qk.items()}
            if set(names) != {"q_attn", "k_cache"} or names["q_attn"] != names["k_cache"]:
                raise ValueError(f"{where}: transform group {group!r} rotates queries and keys of different modules; "
                                 "R3 needs q_attn and k_cache on the same attention modules")
            for name in sorted(names["q_attn"]):
                attn = modules[name]
                size = scheme.get("head_dim") or getattr(attn, "head_dim", None)
                if not isinstance(size, int):
                    raise ValueError(f"{where}: transform group {group!r} has no head_dim for {name}")
                rotation = QKRotation(size)
                t = module_for(_weight_for(tensors, group, scheme, "q_attn", name, size, where))
                if not isinstance(t, OnlineHadamard):
                    rotation.hadamard = t
                try:
                    attach_qk_rotation(attn, rotation)
                except ValueError as err:
                    raise ValueError(f"{where}: {name}: {err}") from None


def _kv_settings(qcfg: dict, where: str) -> dict | None:
    ext = (qcfg.get(EXTENSION) or {}).get("kv_cache")
    if ext:
        g = ext.get("group_size")
        return {"bits": int(ext["num_bits"]), "symmetric": bool(ext["symmetric"]), "group_size": None if g is None else int(g)}
    args = qcfg.get("kv_cache_scheme")
    if not args:
        return None
    if args.get("type") == "float" and int(args.get("num_bits", 0)) == 8 and args.get("dynamic") is False \
            and args.get("strategy") in ("tensor", "attn_head"):
        return {"bits": 8, "symmetric": True, "group_size": None, "fmt": "fp8", "per_head": args["strategy"] == "attn_head"}
    if args.get("type", "int") != "int" or args.get("dynamic") is not True or args.get("strategy") != "group":
        raise ValueError(f"{where}: kv_cache_scheme {args} is not supported: this loader runs dynamic integer "
                         "per-token KV quantization (type: int, strategy: group, dynamic: true); load static or "
                         "float KV-cache schemes with vLLM")
    return {"bits": int(args["num_bits"]), "symmetric": bool(args.get("symmetric", True)),
            "group_size": int(args["group_size"])}


def attach_kv_quantizers(model: nn.Module, qcfg: dict, where: str,
                         scales: dict[str, torch.Tensor] | None = None) -> None:
    """Give every attention module of a loaded model the KV quantizer of ``qcfg`` (in place).

    Settings come from our extension when present (exact), else from
    ``kv_cache_scheme`` (dynamic int ``group`` strategy). Switches the
    attention implementation to ``compressor_kvquant:<base>``.

    Args:
        scales: an FP8 cache's stored ``{attn}.k_scale`` / ``{attn}.v_scale``.

    Raises:
        ValueError: an unsupported KV scheme, missing FP8 scales, or a model without transformers attention modules.
    """
    settings = _kv_settings(qcfg, where)
    if settings is None:
        return
    attention = attention_modules(model)
    if not attention:
        raise ValueError(f"{where}: the export quantizes its KV cache but {type(model).__name__} has no transformers "
                         "attention module to attach the quantizer to")
    scales = scales or {}
    for name, attn in attention:
        fp8 = settings.get("fmt") == "fp8"
        try:
            quantizer = KVQuantizer(settings["bits"], symmetric=settings["symmetric"], group_size=settings["group_size"],
                                    fmt=settings.get("fmt"), per_head=settings.get("per_head", False),
                                    num_heads=scales[f"{name}.k_scale"].numel() if fp8 and f"{name}.k_scale" in scales
                                    else 1)
            if fp8:
                for leaf in ("k_scale", "v_scale"):
                    stored = scales.get(f"{name}.{leaf}")
                    if stored is None:
                        raise ValueError(f"{leaf} is missing: the checkpoint is incomplete or corrupt")
                    getattr(quantizer, leaf).copy_(stored.reshape(-1).to(torch.float32))
                quantizer.observing = False
            attach_kv_quantizer(attn, quantizer)
        except ValueError as err:
            raise ValueError(f"{where}: {name}: {err}") from None

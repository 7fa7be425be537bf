"""The run-time parts of an export: online Hadamard transforms (R4, R3), per-token input quantizers, the KV quantizer.

They go into ``config.json["quantization_config"]`` beside the weight schemes,
in the keys compressed-tensors and llm-compressor write:

* ``config_groups[g]["input_activations"]``: compressed-tensors
  ``QuantizationArgs`` of a dynamic per-token quantizer (``strategy: token``,
  ``dynamic: true``), for the quantized linears of group ``g`` that carry an
  ``input_quantizer``; linears with other settings (or none) get other groups.
* ``kv_cache_scheme``: ``QuantizationArgs`` with ``strategy: group``,
  ``dynamic: true`` and ``group_size`` = ``kv_group_size`` or head_dim.
  compressed-tensors' dynamic group strategy takes one range per group of the
  last dim of the cached (B, H_kv, T, D) keys and values, i.e. one scale per
  (batch, kv head, token, group): exactly our per-head per-token KV quantizer.
* ``transform_config``: the ``TransformConfig`` of llm-compressor's
  SpinQuantModifier: group ``R4`` (location ``input`` on the linears that rotate
  their input, plus the ``weight_input`` inverse already fused into their
  weights) and group ``R3`` (``q_attn`` and ``k_cache`` on the attention
  modules, ``head_dim`` = D). The unnormalized matrix ``H`` (forward
  ``x ↦ x H / √n``, entries ±1, float32) is stored once per size in the
  safetensors under compressed-tensors' name for transform weights,
  ``<first target>.<group>_<location>.weight`` (e.g.
  ``model.layers.0.mlp.down_proj.R4_input.weight``), as ``save_pretrained``
  writes a transform shared by every target. The scheme ``type`` is
  ``hadamard`` when every size is a power of two (Sylvester's matrix, which
  compressed-tensors and vLLM's hadacore build identically), otherwise
  ``random-hadamard``: our Paley factors (e.g. 1536 = 128 * 12) differ from
  compressed-tensors' tables, and that type makes compressed-tensors and vLLM
  apply the stored matrix as a dense ``x H / √n``.
* ``compressor`` (:data:`EXTENSION`; other loaders ignore it): what
  ``QuantizationArgs`` cannot hold: ``clip_ratio`` per config group when it is
  not 1, the KV quantizer's exact settings (``group_size: null`` = the whole
  head) and the attention implementation the quantizers wrap (``sdpa`` /
  ``eager``).

:func:`compressor.export.loader.load_compressed` reads all of it back
(:func:`attach_transforms`, :func:`attach_kv_quantizers`,
:func:`input_quantizer`), so a reload computes the same logits.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NoReturn

import torch
from torch import nn

from compressor.runtime.activations import (
    INPUT_CHILD, KV_ATTENTION_PREFIX, KV_CHILD, QK_CHILD, ActivationQuantizer, KVQuantizer, QKRotation,
    _check_transform_first, attach_kv_quantizer, attach_qk_rotation, attention_modules,
)
from compressor.core.state import is_quantized
from compressor.recipe import matches
from compressor.core.hadamard import _paley, hadamard_factors, hadamard_matrix
from compressor.runtime.online import _CHILD as TRANSFORM_CHILD
from compressor.runtime.online import OnlineHadamard, attach_input_transform

__all__ = [
    "EXTENSION",
    "StoredHadamard",
    "input_activation_args",
    "input_settings",
    "check_online_exportable",
    "kv_cache_scheme",
    "transform_config",
    "transform_tensors",
    "extension",
    "input_quantizer",
    "attn_implementation",
    "check_transform_config",
    "pop_transform_tensors",
    "attach_transforms",
    "attach_kv_quantizers",
]

EXTENSION = "compressor"
EXTENSION_VERSION = 1
R4, R3 = "R4", "R3"
_OFFLINE = ("weight_input", "weight_output")  # fused into the stored weights; nothing to do at load


# ---------------------------------------------------------------- writing


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


def input_settings(linear: nn.Module) -> tuple[int, bool, float] | None:
    """``(bits, symmetric, clip_ratio)`` of the ``input_quantizer`` of ``linear``, or None (the key of its config group)."""
    q = linear._modules.get(INPUT_CHILD)
    return None if q is None else (q.bits, q.symmetric, q.clip_ratio)


def input_activation_args(bits: int, symmetric: bool) -> dict:
    """``input_activations`` of a config group: dynamic per-token integer quantization of the linear inputs.

    The clip ratio has no compressed-tensors field; :func:`extension` records it.
    """
    return _dynamic_args(bits, symmetric, "token", None)


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
                _check_transform_first(m)
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
    settings = {(q.bits, q.symmetric, q.group_size) for _, q in found}
    if len(settings) > 1:
        _fail(found[0][0], f"attention modules quantize keys and values with different settings {sorted(settings, key=str)} "
              "(bits, symmetric, group_size), and kv_cache_scheme holds one", "quantize the KV cache of every layer "
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
    group = q.group_size or int(attention_modules(model)[0][1].head_dim)  # None: the whole head
    return _dynamic_args(q.bits, q.symmetric, "group", group)


def _linear_transforms(model: nn.Module) -> list[tuple[str, OnlineHadamard]]:
    return [(n, m._modules[TRANSFORM_CHILD]) for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and TRANSFORM_CHILD in m._modules]


def _qk_transforms(model: nn.Module) -> list[tuple[str, OnlineHadamard]]:
    return [(n, m._modules[QK_CHILD].hadamard) for n, m in model.named_modules() if QK_CHILD in m._modules]


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _scheme(sizes: set[int], apply: list[dict], head_dim: int | None) -> dict:
    """A compressed-tensors ``TransformScheme`` dict of our (stored) Hadamard transforms."""
    return {
        "type": "hadamard" if all(_is_pow2(s) for s in sizes) else "random-hadamard",
        "apply": apply,
        "randomize": False,
        "requires_grad": False,
        "head_dim": head_dim,
        "precision": "torch.float32",
    }


def _targs(targets: list[str], location: str, inverse: bool = False) -> dict:
    return {"targets": targets, "location": location, "inverse": inverse, "ignore": []}


def transform_config(model: nn.Module) -> dict | None:
    """``quantization_config["transform_config"]`` for the online transforms of ``model``, or None.

    Targets are exact module names (sorted). See the module docstring for the
    schemes.
    """
    groups = {}
    r4 = _linear_transforms(model)
    if r4:
        names = sorted(n for n, _ in r4)
        groups[R4] = _scheme({t.size for _, t in r4}, [_targs(names, "input"), _targs(names, "weight_input", True)], None)
    r3 = _qk_transforms(model)
    if r3:
        head_dim = _r3_head_dim(model)
        names = sorted(n for n, _ in r3)
        groups[R3] = _scheme({head_dim}, [_targs(names, "q_attn"), _targs(names, "k_cache")], head_dim)
    return {"config_groups": groups} if groups else None


def _hadamard_weight(transform: OnlineHadamard) -> torch.Tensor:
    """compressed-tensors' transform weight of ``transform``: H (n, n) float32, ±1, with forward(x) = x H / √n.

    OnlineHadamard(n) computes x kron(H_{2^a}, H_m)ᵀ / √n with its Paley
    factor H_m as ``base``; built directly (no n×n transform of the identity).
    """
    n = transform.size
    _, m = hadamard_factors(n)
    base = None if transform.base is None else transform.base.detach().cpu()
    if (base is None) != (m == 1) or (base is not None and not torch.equal(base, _paley(m).to(base.dtype))):
        raise ValueError(f"the online transform of size {n} holds a modified Hadamard factor; it cannot be exported")
    return hadamard_matrix(n, dtype=torch.float32).T.contiguous()


def transform_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The transform weights to store: one (n, n) float32 ±1 matrix per group and size, named
    ``<first target>.<group>_<location>.weight`` (R4: ``..._input``, R3: ``..._q_attn``, shared with ``k_cache``)."""
    out: dict[str, torch.Tensor] = {}
    for group, location, items in ((R4, "input", _linear_transforms(model)), (R3, "q_attn", _qk_transforms(model))):
        done: set[int] = set()
        for name, t in items:
            if t.size not in done:
                done.add(t.size)
                out[f"{name}.{group}_{location}.weight"] = _hadamard_weight(t)
    return out


def extension(model: nn.Module, clip_ratios: dict[str, float]) -> dict | None:
    """``quantization_config["compressor"]``: settings compressed-tensors has no field for, or None when there are none.

    Args:
        model: the model being exported.
        clip_ratios: ``{config group name: clip_ratio}`` of the groups whose input quantizers clip (ratio != 1).
    """
    out: dict[str, Any] = {}
    if clip_ratios:
        out["input_activations"] = {g: {"clip_ratio": c} for g, c in clip_ratios.items()}
    kv = _kv_quantizer(model)
    if kv is not None:
        out["kv_cache"] = {"num_bits": kv.bits, "symmetric": kv.symmetric, "group_size": kv.group_size}
    if kv is not None or _qk_transforms(model):
        impl = model.config._attn_implementation or "eager"
        out["attn_implementation"] = impl[len(KV_ATTENTION_PREFIX):] if impl.startswith(KV_ATTENTION_PREFIX) else impl
    return {"version": EXTENSION_VERSION, **out} if out else None


# ---------------------------------------------------------------- reading


class StoredHadamard(nn.Module):
    """x ↦ x W / √n with a transform weight W (n, n) read from a checkpoint (compressed-tensors' HadamardTransform).

    Used when the stored matrix is not the one :class:`OnlineHadamard` builds
    (e.g. a compressed-tensors or llm-compressor export); computes in float32
    (float64 inputs in float64) and casts back. W is a non-persistent buffer.
    """

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        if weight.ndim != 2 or weight.shape[0] != weight.shape[1]:
            raise ValueError(f"a transform weight must be square, got shape {tuple(weight.shape)}")
        self.size = weight.shape[0]
        self.register_buffer("weight", weight.detach().to(torch.float32).contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., n) → (..., n), same dtype."""
        if x.shape[-1] != self.size:
            raise ValueError(f"StoredHadamard({self.size}) got an input with last dim {x.shape[-1]}")
        work = torch.float64 if x.dtype == torch.float64 else torch.float32
        return ((x.to(work) @ self.weight.to(work)) / math.sqrt(self.size)).to(x.dtype)

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """The (n, n) matrix Q with forward(x) = x @ Q."""
        return self.weight.to(dtype) / math.sqrt(self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}"


def _our_weight(n: int) -> torch.Tensor | None:
    """H (n, n) float32 with OnlineHadamard(n)(x) = x H / √n, or None when n has no construction."""
    try:
        return hadamard_matrix(n, dtype=torch.float32).T.contiguous()
    except ValueError:
        return None


def _module_factory(weight: torch.Tensor) -> Callable[[], nn.Module]:
    """Makes the module applying ``weight`` (n, n): OnlineHadamard when it is exactly our matrix (bit-exact with
    the exported model), else StoredHadamard, every one sharing one float32 copy of ``weight``."""
    n = weight.shape[0]
    ours = _our_weight(n)
    if ours is not None and torch.equal(weight.to(torch.float32), ours):
        return lambda: OnlineHadamard(n)
    shared = weight.detach().to(torch.float32).contiguous()
    return lambda: StoredHadamard(shared)


def input_quantizer(args: dict | None, extra: dict | None, where: str) -> ActivationQuantizer | None:
    """The input quantizer a config group's ``input_activations`` (and our extension entry ``extra``) describe, or None.

    Raises:
        ValueError: anything other than dynamic per-token integer activations.
    """
    if not args:
        return None
    if args.get("type", "int") != "int" or args.get("strategy") != "token" or args.get("dynamic") is not True:
        raise ValueError(f"{where}: input_activations {args} are not supported: this loader runs dynamic per-token "
                         "integer activations (type: int, strategy: token, dynamic: true); load static or float "
                         "activation schemes with vLLM")
    return ActivationQuantizer(int(args["num_bits"]), symmetric=bool(args.get("symmetric", True)),
                               clip_ratio=float((extra or {}).get("clip_ratio", 1.0)))


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
    if scheme.get("type") == "hadamard" and _is_pow2(size):  # compressed-tensors builds Sylvester's matrix itself
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
            if loc in _OFFLINE:
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
    from compressor.export.loader import QuantLinear

    check_transform_config(qcfg, where)
    modules = dict(model.named_modules())
    factories: dict[tuple[int, bool], Callable[[], nn.Module]] = {}  # one check and one copy per stored tensor

    def module_for(weight: torch.Tensor, inverse: bool = False) -> nn.Module:
        key = (id(weight), inverse)
        if key not in factories:
            factories[key] = _module_factory(weight.transpose(0, 1) if inverse else weight)
        return factories[key]()
    for group, scheme in _transform_groups(qcfg).items():
        apply = [a for a in scheme.get("apply", []) if a.get("location") not in _OFFLINE]

        def targets(a: dict, kinds: tuple[type, ...]) -> list[str]:
            pats, ignore = tuple(a.get("targets") or ()), tuple(a.get("ignore") or ())
            hits = [n for n, m in modules.items() if isinstance(m, kinds) and not matches(n, m, ignore)
                    and (matches(n, m, pats) or (isinstance(m, QuantLinear) and "Linear" in pats))]
            if not hits:
                raise ValueError(f"{where}: transform group {group!r} targets {list(pats)[:3]} at {a['location']}, "
                                 "which match no module of the model: the checkpoint does not match its config")
            return hits

        for a in (a for a in apply if a["location"] == "input"):
            for name in targets(a, (nn.Linear, QuantLinear)):
                m = modules[name]
                size = scheme.get("head_dim") or m.in_features
                if size != m.in_features:
                    raise ValueError(f"{where}: transform group {group!r} is block-diagonal (head_dim={size}) on "
                                     f"{name}; this loader supports full-width input transforms only")
                t = module_for(_weight_for(tensors, group, scheme, "input", name, size, where), bool(a.get("inverse")))
                if isinstance(m, QuantLinear):
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
    if args.get("type", "int") != "int" or args.get("dynamic") is not True or args.get("strategy") != "group":
        raise ValueError(f"{where}: kv_cache_scheme {args} is not supported: this loader runs dynamic integer "
                         "per-token KV quantization (type: int, strategy: group, dynamic: true); load static or "
                         "float KV-cache schemes with vLLM")
    return {"bits": int(args["num_bits"]), "symmetric": bool(args.get("symmetric", True)),
            "group_size": int(args["group_size"])}


def attach_kv_quantizers(model: nn.Module, qcfg: dict, where: str) -> None:
    """Give every attention module of a loaded model the KV quantizer of ``qcfg`` (in place).

    Settings come from our extension when present (exact), else from
    ``kv_cache_scheme`` (dynamic int ``group`` strategy). Switches the
    attention implementation to ``compressor_kvquant:<base>``.

    Raises:
        ValueError: an unsupported KV scheme, or a model without transformers attention modules.
    """
    settings = _kv_settings(qcfg, where)
    if settings is None:
        return
    attention = attention_modules(model)
    if not attention:
        raise ValueError(f"{where}: the export quantizes its KV cache but {type(model).__name__} has no transformers "
                         "attention module to attach the quantizer to")
    for name, attn in attention:
        try:
            attach_kv_quantizer(attn, KVQuantizer(settings["bits"], symmetric=settings["symmetric"],
                                                  group_size=settings["group_size"]))
        except ValueError as err:
            raise ValueError(f"{where}: {name}: {err}") from None

"""Reload a packed export as a model of :class:`QuantLinear` modules, with its run-time quantizers and transforms.

Besides the packed weights, an export may record per-token input quantizers
(``input_activations``), a KV quantizer (``kv_cache_scheme``) and online
Hadamard transforms (``transform_config``); the loader reattaches them
(:mod:`compressor.export.online_read`) so the reloaded model computes what the
exported one did.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from compressor.core.arch import expert_checkpoint_names, experts_layout
from compressor.core.atomic import MANIFEST, verify_manifest
from compressor.core.pack import pack
from compressor.core.passes import matches
from compressor.core.scheme import QuantScheme
from compressor.export import online_format, online_read
from compressor.runtime.activations import INPUT_CHILD
from compressor.runtime.float_linear import FloatQuantLinear
from compressor.runtime.quant_experts import QuantExperts
from compressor.runtime.quant_linear import QuantLinear

__all__ = ["load_compressed", "scheme_from_ct_args", "read_config", "is_readable_config", "READABLE_FORMATS"]

log = logging.getLogger(__name__)

_MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# compressed-tensors formats this loader reads: packed codes, int8 codes (W8A8), float weights, or a mix
_FLOAT_GROUP_FORMATS = ("float-quantized", "nvfp4-pack-quantized", "mxfp4-pack-quantized")
_GROUP_FORMATS = ("pack-quantized", "int-quantized") + _FLOAT_GROUP_FORMATS
READABLE_FORMATS = _GROUP_FORMATS + ("mixed-precision",)
_SCALE_DTYPES = {None: "float", "torch.float8_e4m3fn": "e4m3", "torch.uint8": "e8m0"}


def is_readable_config(qcfg: dict | None) -> bool:
    """Whether a ``quantization_config`` describes a compressed-tensors export :func:`load_compressed` reads."""
    qcfg = qcfg or {}
    return qcfg.get("quant_method") == "compressed-tensors" and qcfg.get("format") in READABLE_FORMATS


def scheme_from_ct_args(args: dict) -> QuantScheme:
    """QuantScheme from a compressed-tensors ``weights`` args dict.

    Raises:
        ValueError: for schemes this runtime cannot execute (float types, blocks, tensor strategy).
    """
    if args.get("type", "int") not in ("int", "float"):
        raise ValueError(f"unsupported weight type {args.get('type')!r}: integer and float weights are supported")
    strategy = args.get("strategy") or ("group" if args.get("group_size") else "channel")
    if args.get("type") == "float":
        scale_dtype = args.get("scale_dtype")
        block = args.get("block_structure")
        if strategy == "block" and int(args.get("num_bits", 0)) == 8 and scale_dtype is None \
                and isinstance(block, (list, tuple)) and len(block) == 2:
            return QuantScheme(bits=8, type="float", symmetric=True, group_size=int(block[1]), block_rows=int(block[0]))
        if strategy == "tensor" and int(args.get("num_bits", 0)) == 8 and scale_dtype is None:
            return QuantScheme(bits=8, type="float", symmetric=True, group_size=-1, block_rows=-1)
        if scale_dtype not in _SCALE_DTYPES or strategy not in ("group", "channel", "tensor_group"):
            raise ValueError(f"unsupported float weights (strategy {strategy!r}, scale_dtype {scale_dtype!r}): this "
                             "loader reads FP8 per tensor, channel, group or block, NVFP4 and MXFP4")
        return QuantScheme(bits=int(args["num_bits"]), type="float", symmetric=True,
                           group_size=int(args["group_size"]) if args.get("group_size") else -1,
                           scale_format=_SCALE_DTYPES[scale_dtype],
                           observer=args.get("observer") if args.get("observer") in ("minmax", "mse") else "minmax")
    if strategy not in ("group", "channel"):
        raise ValueError(f"unsupported weight strategy {strategy!r}: only 'group' and 'channel' are supported")
    return QuantScheme(
        bits=int(args["num_bits"]),
        group_size=int(args["group_size"]) if strategy == "group" else -1,
        symmetric=bool(args.get("symmetric", True)),
        observer=args.get("observer") if args.get("observer") in ("minmax", "mse") else "minmax",
    )


def _config_groups(qcfg: dict, path: Path) -> list[tuple]:
    """``(targets, weight scheme, actorder, input quantizer args or None, format)`` of each config group.

    Raises:
        ValueError: a group without weights, with output activations, unsupported input activations, or a
            storage format this loader does not read.
    """
    ext = (qcfg.get(online_format.EXTENSION) or {}).get("input_activations") or {}
    ext_weights = (qcfg.get(online_format.EXTENSION) or {}).get("weights") or {}  # true widths (7-bit W8A8 codes)
    groups = []
    for gname, g in qcfg["config_groups"].items():
        if not g.get("weights"):
            raise ValueError(f"{path}: config group {gname!r} has no weights; this loader supports weight-quantized "
                             "groups only: load the model with vLLM or transformers")
        if g.get("output_activations"):
            raise ValueError(f"{path}: config group {gname!r} quantizes output activations, which this loader does "
                             "not support: load the model with vLLM or transformers")
        act = None
        if g.get("input_activations"):
            act = (g["input_activations"], ext.get(gname), f"{path}: {gname}")
            online_read.check_input_activations(act[0], act[2])  # before any model is built
        fmt = g.get("format") or qcfg.get("format")
        if fmt not in _GROUP_FORMATS:
            raise ValueError(f"{path}: config group {gname!r} is stored {fmt!r}; this loader reads "
                             f"{' and '.join(_GROUP_FORMATS)}: load the model with vLLM or transformers")
        weights = {**g["weights"], **ext_weights.get(gname, {})}
        groups.append((g["targets"], scheme_from_ct_args(weights), bool(weights.get("actorder")), act, fmt))
    return groups


def _pack_int_quantized(tensors: dict[str, torch.Tensor], name: str, scheme: QuantScheme, path: Path) -> None:
    """Turn an ``int-quantized`` linear's ``weight`` (N, K) int8 codes (and unpacked zero point) into the packed
    tensors :class:`QuantLinear` holds, in place."""
    codes = tensors.pop(f"{name}.weight", None)
    if codes is None or codes.dtype != torch.int8 or codes.dim() != 2:
        found = "missing" if codes is None else f"{codes.dtype} {tuple(codes.shape)}"
        raise ValueError(f"{path}: {name}.weight should hold int8 (N, K) codes in an int-quantized group, "
                         f"but is {found}: the checkpoint does not match its config.json")
    lo, hi = -(2 ** (scheme.bits - 1)), 2 ** (scheme.bits - 1) - 1
    if int(codes.min()) < lo or int(codes.max()) > hi:
        raise ValueError(f"{path}: {name}.weight holds codes outside the {scheme.bits}-bit range [{lo}, {hi}]: "
                         "the checkpoint does not match its config.json")
    tensors[f"{name}.weight_packed"] = pack(codes, scheme.bits, dim=1)
    tensors[f"{name}.weight_shape"] = torch.tensor(list(codes.shape), dtype=torch.int64)
    zp = tensors.get(f"{name}.weight_zero_point")
    if zp is not None:
        tensors[f"{name}.weight_zero_point"] = pack(zp.to(torch.int8), scheme.bits, dim=0)


def _check_float_tensors(tensors: dict[str, torch.Tensor], name: str, module: nn.Linear, scheme: QuantScheme,
                         path: Path) -> None:
    """Refuse a float-format linear whose stored tensors do not have the layout its config group describes."""
    n, k = module.out_features, module.in_features
    g = -(-k // scheme.group_width(k))
    if scheme.bits == 8:
        want = {"weight": (torch.float8_e4m3fn, (n, k)),
                "weight_scale": (None, (1,) if scheme.per_tensor else (scheme.scale_rows(n), g))}
    else:
        want = {"weight_packed": (torch.uint8, (n, k // 2)),
                "weight_scale": (torch.float8_e4m3fn if scheme.scale_format == "e4m3" else torch.uint8, (n, g))}
        if scheme.scale_format == "e4m3":
            want["weight_global_scale"] = (torch.float32, (1,))
    for leaf, (dt, shape) in want.items():
        t = tensors.get(f"{name}.{leaf}")
        if t is None or tuple(t.shape) != shape or (dt is not None and t.dtype != dt):
            found = "missing" if t is None else f"{t.dtype} {tuple(t.shape)}"
            raise ValueError(f"{path}: {name}.{leaf} should be {dt or 'float'} {shape} for {scheme.describe()}, but "
                             f"is {found}: the checkpoint does not match its config.json")


def read_config(path: Path) -> dict:
    """config.json of a model directory, with clear errors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist: pass a Hugging Face model directory or an export")
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(f"{path} has no config.json: it is not a Hugging Face model directory")
    try:
        return json.loads(cfg.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{cfg} is not valid JSON ({err}): the checkpoint is corrupt") from None


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    tensors = {}
    for name in files:
        file = path / name
        if not file.is_file():
            raise FileNotFoundError(f"{file} is missing: the checkpoint is incomplete")
        try:
            tensors.update(load_file(str(file)))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{file} cannot be read ({err}): the file is corrupt or truncated; re-export it") from None
    return tensors


def _attach_quant_experts(model: nn.Module, tensors: dict[str, torch.Tensor], groups: list[tuple], names,
                          dtype: torch.dtype, backend: str, path: Path) -> None:
    """Replace each fused-experts module whose experts the export stores packed by a :class:`QuantExperts`."""
    ckpt = (names.name("gate_proj"), names.name("up_proj"), names.name("down_proj"))
    for name, module in list(model.named_modules()):
        layout = experts_layout(module)
        fp8 = tensors.get(f"{name}.0.{ckpt[0]}.weight")
        if layout is None or (f"{name}.0.{ckpt[0]}.weight_packed" not in tensors
                              and (fp8 is None or fp8.dtype != torch.float8_e4m3fn)):
            continue
        probe = names.to_checkpoint(f"{name}.0.{ckpt[0]}")
        # vLLM reads each expert as a Linear named probe: a "Linear" target covers it, as a name or regex may
        found = [(scheme, act) for targets, scheme, _, act, _ in groups
                 if matches(probe, nn.Linear(1, 1, device="meta"), tuple(targets))]
        if not found:
            raise ValueError(f"{path}: {probe}'s quantized weight is stored but no config group targets it: the "
                             "checkpoint does not match its config.json")
        scheme, act = found[0]
        if act is not None:
            raise ValueError(f"{path}: {name}: quantized inputs of fused experts are not supported by this loader")
        e, two_i, h = module.gate_up_proj.shape
        model.set_submodule(name, QuantExperts(e, h, two_i // 2, scheme, names=ckpt, act_fn=module.act_fn,
                                               dtype=dtype, backend=backend))


def _model_class(config):
    from transformers import AutoModel, AutoModelForCausalLM

    archs = getattr(config, "architectures", None) or []
    return AutoModelForCausalLM if any(a.endswith("ForCausalLM") for a in archs) else AutoModel


def load_compressed(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    device_map: str | dict | None = None,
    backend: str = "auto",
    verify: bool = True,
) -> nn.Module:
    """Load a compressed-tensors export with :class:`QuantLinear` layers (``pack-quantized``, ``int-quantized``) and
    :class:`FloatQuantLinear` layers (``float-quantized``, ``nvfp4-pack-quantized``, ``mxfp4-pack-quantized``).

    Input quantizers (``input_activations`` of a config group, clip ratio from
    our ``compressor`` extension key), online transforms (``transform_config``,
    with the stored matrices) and the KV quantizer (``kv_cache_scheme``, exact
    settings from the extension key) are reattached, and the attention
    implementation they wrap is restored, so the logits equal the exported
    model's (bit-exact on the reference backend in float32).

    Args:
        path: export directory (config.json with ``quantization_config``, safetensors).
        dtype: activation / scale dtype; default: the dtype of the stored scales.
        device_map: None (CPU) or an accelerate device map (``"auto"``, dict).
        backend: dequant-matmul backend (``"auto"``, ``"reference"``, ``"triton"``, ``"cpu"``; see :mod:`compressor.kernels.dispatch`).
        verify: check files against ``compressor_manifest.json`` when present.

    Returns:
        The model in eval mode.
    """
    from accelerate import init_empty_weights
    from transformers import AutoConfig

    path = Path(path)
    raw = read_config(path)
    qcfg = raw.get("quantization_config")
    if not is_readable_config(qcfg):
        raise ValueError(f"{path} is not a compressed-tensors export in a format this loader reads "
                         f"({', '.join(READABLE_FORMATS)}); load it with transformers instead")
    if verify and (path / MANIFEST).is_file():
        verify_manifest(path)
    online_read.check_transform_config(qcfg, str(path))
    tensors = _load_tensors(path)
    transform_tensors = online_read.pop_transform_tensors(qcfg, tensors)  # kept in float32, outside the state dict
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    if dtype is None:
        scales = [t for k, t in tensors.items() if k.endswith(".weight_scale") and t.dtype in _MODEL_DTYPES]
        others = [t for k, t in tensors.items() if t.dtype in _MODEL_DTYPES and not k.endswith("_global_scale")]
        dtype = scales[0].dtype if scales else others[0].dtype if others else torch.float32
    # assign=True below keeps each tensor's own dtype: cast the floating ones (weights, norms, scales) here; FP8
    # weights and scales and NVFP4's float32 global scales stay as stored
    tensors = {k: t.to(dtype) if t.dtype in _MODEL_DTYPES and not k.endswith(("_global_scale", ".k_scale", ".v_scale"))
               else t for k, t in tensors.items()}
    impl = online_read.attn_implementation(qcfg)  # the one the exported quantizers wrapped (sdpa / eager)
    with init_empty_weights(include_buffers=False):
        model = _model_class(config).from_config(config, dtype=dtype, **({"attn_implementation": impl} if impl else {}))
    groups = _config_groups(qcfg, path)
    names = expert_checkpoint_names(config)
    tensors = {names.from_checkpoint(k): t for k, t in tensors.items()}  # Mixtral's block_sparse_moe -> mlp
    ignore = tuple(names.from_checkpoint(n) for n in qcfg.get("ignore") or ())
    _attach_quant_experts(model, tensors, groups, names, dtype, backend, path)
    quantizers = {}  # attached after the transforms, so print(model) lists them in the order they run
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or matches(name, module, ignore):
            continue
        for targets, scheme, actorder, act, fmt in groups:
            if matches(name, module, tuple(targets)):
                if fmt in _FLOAT_GROUP_FORMATS:
                    _check_float_tensors(tensors, name, module, scheme, path)
                    q = FloatQuantLinear(module.in_features, module.out_features, scheme,
                                         bias=module.bias is not None, dtype=dtype, backend=backend)
                    if act is not None:
                        quantizers[name] = online_read.input_quantizer(
                            *act, global_scale=tensors.pop(f"{name}.input_global_scale", None),
                            input_scale=tensors.pop(f"{name}.input_scale", None))
                    model.set_submodule(name, q)
                    break
                if fmt == "int-quantized":
                    _pack_int_quantized(tensors, name, scheme, path)
                if f"{name}.weight_packed" not in tensors:
                    raise ValueError(f"{path}: {name}.weight_packed is missing: the checkpoint is incomplete or corrupt")
                q = QuantLinear(module.in_features, module.out_features, scheme, bias=module.bias is not None,
                                actorder=actorder, dtype=dtype, backend=backend)
                if act is not None:
                    quantizers[name] = online_read.input_quantizer(
                        *act, global_scale=tensors.pop(f"{name}.input_global_scale", None),
                        input_scale=tensors.pop(f"{name}.input_scale", None))
                model.set_submodule(name, q)
                break
    kv_scales = {k: tensors.pop(k) for k in [k for k in tensors if k.endswith((".k_scale", ".v_scale"))]}
    _, unexpected = model.load_state_dict(tensors, strict=False, assign=True)
    if unexpected:
        raise ValueError(f"{path}: unexpected tensors {unexpected[:5]}: the checkpoint does not match its config.json")
    model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.is_meta] + [n for n, b in model.named_buffers() if b.is_meta]
    if still_meta:
        raise ValueError(f"{path}: tensors missing from the checkpoint: {still_meta[:5]}")
    online_read.attach_transforms(model, qcfg, transform_tensors, str(path))
    for name, quantizer in quantizers.items():  # QuantLinear.forward runs input_transform, then input_quantizer
        model.get_submodule(name).add_module(INPUT_CHILD, quantizer)
    online_read.attach_kv_quantizers(model, qcfg, str(path), kv_scales)
    model.eval()
    if device_map is not None:
        from compressor.export.placement import place_model

        model = place_model(model, device_map)
    return model

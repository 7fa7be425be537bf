"""compressed-tensors ``pack-quantized`` export.

Per quantized linear ``name`` the checkpoint holds:

* ``name.weight_packed``     int32 (N, ceil(K*b/32)), codes + 2^(b-1), LSB first
* ``name.weight_scale``      (N, G) in the model's float dtype
* ``name.weight_zero_point`` int32 (ceil(N*b/32), G), packed along dim 0 (asymmetric only)
* ``name.weight_shape``      int64 (2,) = (N, K)
* ``name.weight_g_idx``      int32 (K,) (activation order only)

Fused MoE experts (:func:`compressor.core.arch.experts_layout`) are written one
linear per expert, as the family's checkpoints and vLLM's fused-MoE
compressed-tensors loader name them: ``{experts}.{e}.gate_proj.weight_packed``
and so on (Mixtral: ``w1`` / ``w3`` / ``w2`` under ``block_sparse_moe``; see
:data:`compressor.core.arch.EXPERT_CHECKPOINT_NAMES`), each with the four
tensors above. vLLM matches ``{experts}.0.gate_proj`` against the config
groups' targets, so a ``Linear`` target covers them.

and ``config.json["quantization_config"]`` describes the schemes so that
transformers (with compressed-tensors) and vLLM load the directory.

W8A8 (8-bit integer weights with 8-bit integer input quantizers) is written
``int-quantized`` instead, the layout vLLM's int8 W8A8 path
(``CompressedTensorsW8A8Int8``) reads: per linear ``name.weight`` int8 (N, K),
the codes themselves; ``name.weight_scale`` (N, G); ``name.weight_zero_point``
int8 (N, G), unpacked (asymmetric only); ``name.weight_g_idx`` (activation
order only). The config group says ``"format": "int-quantized"``; a model
whose groups differ says ``"mixed-precision"`` at the top, as compressed-tensors
does. W4A8 and W4A4 stay packed at 4 bits (``pack-quantized``).

Float weights (:mod:`compressor.core.floats`) use compressed-tensors' float formats, the layouts vLLM's
``CompressedTensorsW8A16Fp8`` / ``W8A8Fp8``, ``W4A16Fp4`` / ``W4A4Fp4`` (NVFP4) and MXFP4 schemes read:
FP8 ``float-quantized`` (``weight`` float8_e4m3fn (N, K) + ``weight_scale`` (N, G)); NVFP4
``nvfp4-pack-quantized`` (``weight_packed`` uint8 (N, K/2), E2M1 nibbles, even column low; ``weight_scale``
float8_e4m3fn (N, K/16); ``weight_global_scale`` float32 (1,), dequantized ``v * scale / global_scale``);
MXFP4 ``mxfp4-pack-quantized`` (``weight_packed`` as NVFP4, ``weight_scale`` uint8 E8M0 (N, K/32),
``2^(s - 127)``). Checked against compressed-tensors' own decompressors (tests/export).

W7A8 (7-bit weights, 8-bit inputs) is written the same way with ``num_bits: 8``
(the codes, in [-64, 63], are valid 8-bit codes; vLLM's W8A8 path wants 8) and
the true width in our extension (``compressor.weights.<group>.num_bits: 7``).
It is what vLLM's CPU build computes exactly on x86 CPUs without VNNI: there
oneDNN's int8 GEMM sums pairs of u8 x s8 products in int16
(``vpmaddubsw``), which saturates once a weight code passes 64 in magnitude
(docs/serving.md).

Run-time parts (per-token input quantizers, the KV quantizer, online Hadamard
transforms R4 / R3) go into ``input_activations``, ``kv_cache_scheme``,
``transform_config`` and our ``compressor`` extension key, with the transform
matrices as ``<module>.<group>_<location>.weight`` (see
:mod:`compressor.export.online_write`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from compressor.core.arch import ExpertCheckpointNames, expert_checkpoint_names, experts_layout, parameter_kinds
from compressor.core.atomic import atomic_directory, write_manifest
from compressor.core.pack import pack
from compressor.core import floats
from compressor.core.scheme import MXFP4_GROUP, NVFP4_GROUP, QParams, QuantScheme, dequantize, quantize
from compressor.core.sparsity import is_pruned, pruned_zeros
from compressor.core.state import experts_quant_state, is_experts_quantized, is_quantized, quant_state
from compressor.export import online_format, online_write, runtimes

__all__ = ["compress_module_state", "compress_experts_state", "scheme_to_ct_args", "quantization_config",
           "save_compressed", "group_format", "FORMAT", "INT_FORMAT", "MIXED_FORMAT", "FLOAT_FORMATS"]

log = logging.getLogger(__name__)

FORMAT = "pack-quantized"
INT_FORMAT = "int-quantized"  # unpacked int8 codes: W8A8
# float weights: (bits, scale_format) -> compressed-tensors format
FLOAT_FORMATS = {(8, "float"): "float-quantized", (4, "e4m3"): "nvfp4-pack-quantized",
                 (4, "e8m0"): "mxfp4-pack-quantized"}
MIXED_FORMAT = "mixed-precision"  # top-level format when config groups differ
_CT_VERSION_FALLBACK = "0.12.0"


def scheme_to_ct_args(scheme: QuantScheme, actorder: bool = False) -> dict:
    """compressed-tensors ``QuantizationArgs`` dict for a weight scheme.

    Raises:
        ValueError: the scheme has no compressed-tensors form (float zero points; FP4 other than NVFP4 / MXFP4;
            float weights with activation-order groups).
    """
    if scheme.is_float:
        return _float_ct_args(scheme, actorder)
    if scheme.float_zero_point:
        raise ValueError(
            "zero_point='float' (GGUF-style min offset) cannot be expressed in compressed-tensors; "
            "quantize with zero_point='int' to export"
        )
    per_channel = scheme.group_size == -1
    return {
        "num_bits": scheme.bits,
        "type": "int",
        "symmetric": scheme.symmetric,
        "group_size": None if per_channel else scheme.group_size,
        "strategy": "channel" if per_channel else "group",
        "block_structure": None,
        "dynamic": False,
        "actorder": "group" if actorder else None,
        "observer": scheme.observer,
        "observer_kwargs": {},
    }


def _float_ct_args(scheme: QuantScheme, actorder: bool) -> dict:
    """``QuantizationArgs`` of FP8 (``float-quantized``), NVFP4 and MXFP4 weights, as compressed-tensors'
    presets FP8_DYNAMIC / NVFP4A16 / MXFP4A16 write them."""
    if actorder:
        raise ValueError(f"{scheme.describe()}: activation-order groups (g_idx) have no float-format layout; "
                         "quantize with actorder: static or none")
    args = {"num_bits": scheme.bits, "type": "float", "symmetric": True, "dynamic": False, "block_structure": None,
            "actorder": None, "observer": scheme.observer, "observer_kwargs": {}}
    if scheme.bits == 8 and scheme.scale_format == "float" and scheme.per_tensor:
        return {**args, "group_size": None, "strategy": "tensor"}
    if scheme.bits == 8 and scheme.scale_format == "float" and scheme.block_rows is not None:
        if scheme.group_size == -1:
            raise ValueError(f"{scheme.describe()}: FP8 blocks need a column width (group_size), e.g. 128")
        return {**args, "group_size": None, "strategy": "block",
                "block_structure": [scheme.block_rows, scheme.group_size]}
    if scheme.bits == 8 and scheme.scale_format == "float":
        per_channel = scheme.group_size == -1
        return {**args, "group_size": None if per_channel else scheme.group_size,
                "strategy": "channel" if per_channel else "group"}
    if scheme.bits == 4 and scheme.scale_format == "e4m3" and scheme.group_size == NVFP4_GROUP:
        return {**args, "group_size": NVFP4_GROUP, "strategy": "tensor_group", "scale_dtype": "torch.float8_e4m3fn"}
    if scheme.bits == 4 and scheme.scale_format == "e8m0" and scheme.group_size == MXFP4_GROUP:
        return {**args, "group_size": MXFP4_GROUP, "strategy": "group", "scale_dtype": "torch.uint8"}
    raise ValueError(f"{scheme.describe()} has no compressed-tensors format: export FP8 with float scales "
                     f"(scale_format: float), NVFP4 (bits 4, group_size {NVFP4_GROUP}, scale_format e4m3) or MXFP4 "
                     f"(bits 4, group_size {MXFP4_GROUP}, scale_format e8m0)")


def group_format(scheme: QuantScheme, input_bits: int | None) -> str:
    """compressed-tensors format of a config group: ``int-quantized`` for W8A8 and W7A8, ``float-quantized`` for
    FP8 weights, ``nvfp4-pack-quantized`` / ``mxfp4-pack-quantized`` for FP4, else ``pack-quantized``.

    Args:
        scheme: the weight scheme.
        input_bits: bits of the group's per-token input quantizer, or None (weight-only).
    """
    if scheme.is_float:
        _float_ct_args(scheme, False)  # refuses float schemes without a format
        return FLOAT_FORMATS[(scheme.bits, scheme.scale_format)]
    return INT_FORMAT if scheme.bits in (7, 8) and input_bits == 8 else FORMAT


def compress_module_state(module: nn.Module, fmt: str = FORMAT) -> dict[str, torch.Tensor]:
    """Stored tensors of one quantized linear in format ``fmt`` (see the module docstring); the module is not modified.

    Raises:
        ValueError: the weight is not exactly on its quantization grid (it was
            changed after quantization), or the scheme cannot be exported.
    """
    state = quant_state(module)
    if state is None:
        raise ValueError("module is not quantized")
    if not isinstance(module, nn.Linear):
        raise ValueError(f"{type(module).__name__} layers cannot be exported yet: pack-quantized export covers nn.Linear")
    scheme, qp, g_idx = state
    out = _pack_matrix(module.weight.detach(), qp, scheme, g_idx, fmt)
    if getattr(module, "bias", None) is not None:
        out["bias"] = module.bias.detach().contiguous()
    return out


def _pack_matrix(w: torch.Tensor, qp: QParams, scheme: QuantScheme, g_idx: torch.Tensor | None = None,
                 fmt: str = FORMAT) -> dict[str, torch.Tensor]:
    """``weight_packed``, ``weight_scale``, ``weight_shape`` (and ``weight_zero_point``, ``weight_g_idx``) of one
    (N, K) dequantized matrix with its (N, G) qparams; for ``int-quantized``, ``weight`` int8 (N, K) in place of
    the packed codes and shape, and the zero point unpacked (N, G) int8.

    Raises:
        ValueError: ``w`` is not exactly on its grid, or the scheme cannot be exported.
    """
    scheme_to_ct_args(scheme, g_idx is not None)  # refuses unexportable schemes
    q = quantize(w, qp, scheme, g_idx)
    if not torch.equal(dequantize(q, qp, scheme, g_idx).to(w.dtype), w):
        raise ValueError(
            "weight is not on its quantization grid (modified after quantization?); "
            "re-run the quantization pass before exporting"
        )
    n, k = w.shape
    if scheme.is_float:
        return _float_tensors(q, qp, scheme, w.dtype)
    scale = qp.scale.detach().to(w.dtype).contiguous()
    zp = None if qp.zero_point is None else qp.zero_point.round().to(torch.int8)
    if fmt == INT_FORMAT:
        out = {"weight": q.to(torch.int8).contiguous(), "weight_scale": scale}
        if zp is not None:
            out["weight_zero_point"] = zp.contiguous()
    else:
        out = {"weight_packed": pack(q, scheme.bits, dim=1), "weight_scale": scale,
               "weight_shape": torch.tensor([n, k], dtype=torch.int64)}
        if zp is not None:
            out["weight_zero_point"] = pack(zp, scheme.bits, dim=0)
    if g_idx is not None:
        out["weight_g_idx"] = g_idx.to(torch.int32).contiguous()
    return out


def _float_tensors(codes: torch.Tensor, qp: QParams, scheme: QuantScheme, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Stored tensors of an (N, K) float-coded matrix (int8 storage codes from :func:`quantize`):

    * FP8 (``float-quantized``): ``weight`` float8_e4m3fn (N, K), ``weight_scale`` (N, G) in ``dtype``
      (block weights: (ceil(N / block_rows), G), compressed-tensors' ``block`` strategy; per tensor: (1,),
      its ``tensor`` strategy);
    * NVFP4: ``weight_packed`` uint8 (N, K/2), two E2M1 nibbles a byte, the even column in the low nibble;
      ``weight_scale`` float8_e4m3fn (N, K/16); ``weight_global_scale`` float32 (1,);
    * MXFP4: ``weight_packed`` as NVFP4; ``weight_scale`` uint8 E8M0 exponents (N, K/32).
    """
    n, k = codes.shape
    if scheme.bits == 8:
        scale = qp.scale.detach().to(dtype)
        if scheme.block_rows is not None:  # one scale per block of rows: (ceil(N / rows), G)
            rows = scheme.rows_per_scale(n)
            stored = scale[::rows]
            if not torch.equal(stored.repeat_interleave(rows, dim=0)[:n], scale):
                raise ValueError(f"{scheme.describe()}: the scales differ within a block of rows; re-run the "
                                 "quantization pass before exporting")
            scale = stored.reshape(1) if scheme.per_tensor else stored
        return {"weight": codes.contiguous().view(torch.uint8).view(torch.float8_e4m3fn),
                "weight_scale": scale.contiguous()}
    if k % scheme.group_size:
        raise ValueError(f"in_features={k} is not a multiple of {scheme.describe()}'s group size: FP4 formats have "
                         "no ragged last group; add the layer to ignore")
    nib = codes.to(torch.uint8)
    out = {"weight_packed": (nib[:, 0::2] | (nib[:, 1::2] << 4)).contiguous()}
    if scheme.scale_format == "e4m3":
        out["weight_scale"] = qp.scale.detach().float().to(torch.float8_e4m3fn).contiguous()
        out["weight_global_scale"] = qp.global_scale.detach().float().reshape(1).clone()  # siblings share the value
    else:
        out["weight_scale"] = floats.e8m0_encode(qp.scale).contiguous()
    return out


def compress_experts_state(module: nn.Module, names: ExpertCheckpointNames) -> dict[str, torch.Tensor]:
    """Packed tensors of a quantized fused-experts module, one linear per expert; the module is not modified.

    Returns:
        ``{"{e}.{linear}.{tensor}": ...}`` with ``linear`` the family's checkpoint name of each expert's
        gate / up / down projection and ``tensor`` as for :func:`compress_module_state`.

    Raises:
        ValueError: not quantized, a layout or family whose checkpoints keep experts fused, or an off-grid weight.
    """
    state = experts_quant_state(module)
    layout = experts_layout(module)
    if state is None or layout is None:
        raise ValueError("module is not a quantized fused-experts module")
    if names.fused:
        raise ValueError("this family's checkpoints keep the experts fused (e.g. Granite-MoE's input_linear), which "
                         "compressed-tensors loaders do not read quantized: add the experts to ignore to export")
    scheme, qparams = state
    out = {}
    for pname, splits in layout.params:
        if pname not in qparams:
            raise ValueError(f"{pname} was not quantized, but the module's other experts were")
        param, qp = getattr(module, pname).detach(), qparams[pname]
        for e in range(param.shape[0]):
            rows = param.shape[1] // len(splits)
            for i, linear in enumerate(splits):
                part = slice(i * rows, (i + 1) * rows)
                zp = None if qp.zero_point is None else qp.zero_point[e, part]
                gs = None if qp.global_scale is None else qp.global_scale[e]
                packed = _pack_matrix(param[e, part], QParams(qp.scale[e, part], zp, gs), scheme)
                out.update({f"{e}.{names.name(linear)}.{k}": v for k, v in packed.items()})
    return out


def _ct_version() -> str:
    try:
        from compressed_tensors import __version__
    except ImportError:
        return _CT_VERSION_FALLBACK
    return str(__version__)


def quantization_config(model: nn.Module, zeros: dict[str, int] | None = None) -> dict:
    """``config.json["quantization_config"]`` for the quantized linears of ``model``.

    One config group per distinct (weight scheme, activation order, input
    quantizer settings); ``input_activations``, ``kv_cache_scheme``,
    ``transform_config`` and the ``compressor`` extension describe the
    run-time quantizers and online transforms (:mod:`compressor.export.online_write`).

    ``zeros``: pruned zeros of modules whose weights are gone (a streamed run), by name.

    Raises:
        ValueError: no quantized layer, or run-time parts the format cannot record
            (see :func:`compressor.export.online_write.check_online_exportable`).
    """
    online_write.check_online_exportable(model)
    names = expert_checkpoint_names(model.config)
    groups: dict[tuple, list[str]] = {}
    linears = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            linears.append(name)
        if is_quantized(module):
            scheme, _, g_idx = quant_state(module)
            groups.setdefault((scheme, g_idx is not None, online_write.input_settings(module)), []).append(name)
        elif is_experts_quantized(module):  # vLLM matches "{name}.0.gate_proj" etc. against the targets
            linear_names = "|".join(names.name(n) for _, splits in experts_layout(module).params for n in splits)
            target = rf"re:^{_escape(names.to_checkpoint(name))}\.\d+\.({linear_names})$"
            groups.setdefault((experts_quant_state(module)[0], False, None), []).append(target)
    if not groups:
        raise ValueError("the model has no quantized layers: run a quantization pass before exporting")
    quantized = {n for group_names in groups.values() for n in group_names}
    config_groups, clip_ratios, weight_bits = {}, {}, {}
    for i, ((scheme, actorder, act), group_names) in enumerate(groups.items()):
        targets = ["Linear"] if len(groups) == 1 else sorted(names.to_checkpoint(n) for n in group_names)
        fmt = group_format(scheme, None if act is None else act[0])
        weights = scheme_to_ct_args(scheme, actorder)
        if fmt == INT_FORMAT and scheme.bits < 8:  # 7-bit codes, stored and declared as 8-bit ones
            weights["num_bits"], weight_bits[f"group_{i}"] = 8, scheme.bits
        config_groups[f"group_{i}"] = {
            "targets": targets,
            "weights": weights,
            "input_activations": None if act is None else online_write.input_activation_args(act[0], act[1], act[3]),
            "output_activations": None,
            "format": fmt,
        }
        if act is not None and act[2] != 1.0:
            clip_ratios[f"group_{i}"] = act[2]
    formats = {g["format"] for g in config_groups.values()}
    out = {
        "quant_method": "compressed-tensors",
        "format": formats.pop() if len(formats) == 1 else MIXED_FORMAT,
        "quantization_status": "compressed",
        "config_groups": config_groups,
        "ignore": sorted({names.to_checkpoint(n) for n in linears + _routers(model) if n not in quantized}),
        "kv_cache_scheme": online_write.kv_cache_scheme(model),
        "global_compression_ratio": None,
        "sparsity_config": sparsity_config(model, zeros),
        "version": _ct_version(),
    }
    transforms = online_write.transform_config(model)
    if transforms is not None:
        out["transform_config"] = transforms
    ext = online_write.extension(model, clip_ratios, weight_bits)
    if ext is not None:
        out[online_format.EXTENSION] = ext
    return out


def _routers(model: nn.Module) -> list[str]:
    """Names of the MoE routers (kept in full precision; listed in ``ignore`` so loaders leave them be)."""
    return sorted({name.rpartition(".")[0] for name, kind in parameter_kinds(model).items() if kind == "router"})


def _escape(name: str) -> str:
    return name.replace(".", "\\.")


def sparsity_config(model: nn.Module, zeros: dict[str, int] | None = None) -> dict | None:
    """``quantization_config["sparsity_config"]`` for the pruned linears of ``model``, or None.

    The zeros live in the (packed) weights themselves, so the format is
    compressed-tensors' ``"dense"`` (stored as is; loaders need no sparse
    decompression); the entry records which layers were pruned, the structure
    (``"2:4"`` = 2 non-zeros in every 4, or ``"unstructured"``) and
    ``global_sparsity``, the fraction of all the model's parameters pruned. ``zeros`` gives the count of
    modules whose weights are no longer in memory (a streamed run), by name.
    """
    pruned = {name: m for name, m in model.named_modules() if is_pruned(m)}
    if not pruned:
        return None
    structures = {m.sparsity_info.structure for m in pruned.values()}
    known = zeros or {}
    count = sum(known[n] if n in known else pruned_zeros(m) for n, m in pruned.items())
    total = sum(p.numel() for p in model.parameters())
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return {
        "format": "dense",
        "sparsity_structure": structures.pop() if len(structures) == 1 else "unstructured",
        "global_sparsity": count / total,
        "targets": sorted(pruned),
        "ignore": sorted(n for n in linears if n not in pruned),
    }


def _state_dict(model: nn.Module, root: nn.Module | None = None, prefix: str = "") -> dict[str, torch.Tensor]:
    """Model tensors with quantized linears and experts packed, named as the family's checkpoints name them
    (:class:`compressor.core.arch.ExpertCheckpointNames`); tied (shared) tensors stored once.

    With ``root`` (a submodule of ``model`` named ``prefix``, e.g. one decoder block) only its tensors, under
    their full names. Tensors on the ``meta`` device are left out: a streamed run already wrote them
    (:mod:`compressor.export.stream`).
    """
    root = model if root is None else root
    quantized = {name: m for name, m in root.named_modules(prefix=prefix) if is_quantized(m)}
    experts = {name: m for name, m in root.named_modules(prefix=prefix) if is_experts_quantized(m)}
    names = expert_checkpoint_names(model.config)
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for key, tensor in root.state_dict(prefix=f"{prefix}." if prefix else "", keep_vars=False).items():
        owner, _, leaf = key.rpartition(".")
        if owner in quantized or owner in experts or tensor.is_meta:
            continue
        ptr = tensor.data_ptr()
        if ptr in seen and tensor.numel():
            continue  # tied to an earlier tensor (e.g. lm_head ↔ embed_tokens)
        seen[ptr] = key
        out[names.to_checkpoint(key)] = tensor.detach().contiguous()
    for name, module in list(quantized.items()) + list(experts.items()):
        if module_is_meta(module):
            continue
        try:
            if name in quantized:
                packed = compress_module_state(module, group_format(module.quant_scheme, _input_bits(module)))
                packed.update({k[len(name) + 1:]: v for k, v in online_write.input_tensors(name, module).items()})
            else:
                packed = compress_experts_state(module, names)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from None
        out.update({names.to_checkpoint(f"{name}.{k}"): v for k, v in packed.items()})
    return out


def block_tensors(model: nn.Module, block: nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    """The export's tensors of one decoder block ``block`` (named ``prefix`` in ``model``), quantized linears packed:
    what :func:`save_compressed` writes for it. (N, K) weights become the layouts the module docstring lists."""
    return _state_dict(model, block, prefix)


def module_is_meta(module: nn.Module) -> bool:
    """Whether a module's own weight lives on the ``meta`` device (a streamed block already written and freed)."""
    weight = getattr(module, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.is_meta
    return any(p.is_meta for p in module.parameters(recurse=False))


def _input_bits(linear: nn.Module) -> int | None:
    settings = online_write.input_settings(linear)
    return None if settings is None else settings[0]


def _write_shards(tensors: dict[str, torch.Tensor], root: Path, max_shard_bytes: int) -> None:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = t
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(root / "model.safetensors"), metadata=meta)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(root / fname), metadata=meta)
        weight_map.update({k: fname for k in shard})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (root / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def save_compressed(
    model: nn.Module,
    output: str | Path,
    *,
    tokenizer: Any = None,
    recipe: Any = None,
    info: dict | None = None,
    overwrite: bool = False,
    max_shard_bytes: int = 5 * 2**30,
    stream: Any = None,
) -> Path:
    """Write ``model`` as a compressed-tensors directory (``pack-quantized``; W8A8 ``int-quantized``), atomically.

    Args:
        model: a Hugging Face model whose targeted linears carry quantization
            state (after a quantization pass); online Hadamard transforms (R4,
            R3), per-token input quantizers and a KV quantizer are recorded too.
        output: destination directory; must not exist unless ``overwrite``.
        tokenizer: saved beside the weights when given.
        recipe: a :class:`compressor.Recipe`, saved as ``recipe.yaml``.
        info: extra provenance (seed, calibration hash, source model) for the manifest.
        overwrite: replace an existing directory (only once the new one is complete).
        max_shard_bytes: safetensors shard size limit.
        stream: the :class:`compressor.export.stream.StreamedExport` of a streamed run: its blocks were written
            (and freed) as they finished; the rest is added to its shards.

    Returns:
        The output path.

    Raises:
        ValueError: nothing quantized, an off-grid weight, or a scheme / run-time
            part the format cannot record; nothing is written then.
    """
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = [type(model).__name__]
    config["quantization_config"] = quantization_config(model, zeros=None if stream is None else stream.zeros)
    if config.get("tie_word_embeddings"):
        out_emb, in_emb = model.get_output_embeddings(), model.get_input_embeddings()
        if out_emb is not None and in_emb is not None and out_emb.weight is not in_emb.weight:
            config["tie_word_embeddings"] = False  # lm_head was quantized on its own
    _note_runtimes(model, config["quantization_config"], output)
    tensors = _state_dict(model)
    tensors.update(online_write.transform_tensors(model))
    tensors.update(online_write.kv_tensors(model))  # an FP8 KV cache's k_scale / v_scale  # (n, n) float32 ±1, once per transform group and size
    with atomic_directory(output, overwrite=overwrite) as tmp:
        if stream is None:
            _write_shards(tensors, tmp, max_shard_bytes)
        else:
            stream.finish(tensors, tmp)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if recipe is not None:
            recipe.save(tmp / "recipe.yaml")
        write_manifest(tmp, {"compressor": _versions(), **(info or {}), **({"recipe": recipe.to_dict()} if recipe else {})})
    log.info("wrote %s", output)
    return Path(output)


def _note_runtimes(model: nn.Module, qcfg: dict, output: str | Path) -> None:
    """Say, in one line, when vLLM cannot serve the export, and which runtimes load it."""
    blockers = runtimes.vllm_blockers(qcfg)
    if blockers:
        shapes = {n: tuple(m.weight.shape) for n, m in model.named_modules() if is_quantized(m)}
        can = [r for r in runtimes.loaders(qcfg, shapes) if not r.startswith("not ")]
        log.warning("%s: vLLM cannot serve this export (%s); it loads with %s", output, "; ".join(blockers),
                    ", ".join(can))


def _versions() -> dict:
    import transformers

    from compressor._version import __version__

    versions = {"compressor": __version__, "torch": torch.__version__, "transformers": transformers.__version__}
    try:
        import compressed_tensors

        versions["compressed_tensors"] = str(compressed_tensors.__version__)
    except ImportError:
        pass
    return versions

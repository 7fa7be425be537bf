"""Reading a model directory or export without loading its weights (safetensors headers only): sizes, schemes,
bits per weight, which runtimes can load it, per-layer sparsity."""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path

from compressor.core.atomic import MANIFEST
from compressor.export.loader import read_config, scheme_from_ct_args
from compressor.export.runtimes import loaders

__all__ = ["summarize", "layer_sparsity"]

_DTYPE_BITS = {"F64": 64, "F32": 32, "F16": 16, "BF16": 16, "I64": 64, "I32": 32, "I16": 16, "I8": 8, "U8": 8, "BOOL": 8,
               "F8_E4M3": 8, "F8_E5M2": 8}


def _headers(path: Path) -> dict[str, dict]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        out.update(header)
    return out


def summarize(path: Path) -> dict:
    """Sizes, schemes, bits per weight and loaders of a model directory.

    Returns a dict with ``size_bytes`` (all files), ``weights_bytes`` (safetensors),
    ``params`` (original parameter count), ``bits_per_weight`` (bits of quantized
    linears incl. scales and zero points per weight, or the dtype width for an
    unquantized model), ``model_bits_per_param``, ``schemes``, ``layer_bits`` (each quantized linear's stored
    bits per weight, scales and zero points included, in checkpoint order), ``loaders`` and ``coverage``
    (what compress recorded in the manifest: :func:`compressor.core.coverage.coverage`, or None).
    """
    path = Path(path)
    if path.suffix == ".gguf" and path.is_file():
        from compressor.export.gguf import summarize_gguf

        return summarize_gguf(path)
    config = read_config(path)
    headers = _headers(path)
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    wbytes = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    qcfg = config.get("quantization_config") or {}
    layers: dict[str, dict] = {}
    params, qbits, qweights = 0, 0, 0
    # int-quantized (W8A8) layers store their codes unpacked as an int8 "weight" beside a "weight_scale"
    # so do float-quantized (FP8) layers, as float8_e4m3fn; packed FP4 (NVFP4 / MXFP4) keeps two codes a byte
    int_codes = {key.rpartition(".")[0]: tuple(meta["shape"]) for key, meta in headers.items()
                 if key.endswith(".weight") and meta["dtype"] in ("I8", "F8_E4M3")
                 and f"{key.rpartition('.')[0]}.weight_scale" in headers}
    int_codes.update({key.rpartition(".")[0]: (meta["shape"][0], 2 * meta["shape"][1]) for key, meta in headers.items()
                      if key.endswith(".weight_packed") and meta["dtype"] == "U8"})
    for key, meta in headers.items():
        nbytes = meta["data_offsets"][1] - meta["data_offsets"][0]
        owner, _, leaf = key.rpartition(".")
        if leaf == "weight_shape":
            continue
        if leaf.startswith("weight") and (f"{owner}.weight_packed" in headers or owner in int_codes):
            layers.setdefault(owner, {"bytes": 0})["bytes"] += nbytes
            continue
        params += math.prod(meta["shape"])
    schemes = {}
    true_bits = (qcfg.get("compressor") or {}).get("weights") or {}  # 7-bit codes declared 8-bit
    for name, group in (qcfg.get("config_groups") or {}).items():
        try:
            desc = scheme_from_ct_args({**group["weights"], **true_bits.get(name, {})}).describe()
        except (ValueError, KeyError) as err:
            desc = f"unsupported ({err})"
        act = group.get("input_activations")
        if act:
            desc += f", inputs A{act.get('num_bits')} per-token {'sym' if act.get('symmetric', True) else 'asym'}"
        fmt = group.get("format") or qcfg.get("format")
        schemes[name] = {"targets": group.get("targets"), "scheme": desc + (f" ({fmt})" if fmt else "")}
    shapes = {**_shapes(path), **int_codes} if layers else {}
    layer_bits = {}
    for owner in sorted(layers, key=_natural):
        n, k = shapes[owner]
        params += n * k
        qbits += layers[owner]["bytes"] * 8
        qweights += n * k
        layer_bits[owner] = round(layers[owner]["bytes"] * 8 / (n * k), 3)
    if qweights:
        bpw = round(qbits / qweights, 3)
    else:
        dtypes = [m["dtype"] for m in headers.values()]
        bpw = _DTYPE_BITS.get(max(set(dtypes), key=dtypes.count), None) if dtypes else None
    return {
        "path": str(path),
        "architecture": (config.get("architectures") or ["?"])[0],
        "size_bytes": size,
        "weights_bytes": wbytes,
        "params": params,
        "quantized_layers": len(layers),
        "bits_per_weight": bpw,
        "model_bits_per_param": round(wbytes * 8 / params, 3) if params else None,
        "schemes": schemes,
        "layer_bits": layer_bits,
        "ignore": qcfg.get("ignore", []),
        "loaders": loaders(qcfg, shapes if layers else {}),
        "coverage": _manifest(path).get("coverage"),
    }


def _natural(name: str) -> list:
    """Sort key putting ``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _manifest(path: Path) -> dict:
    """The export's manifest (provenance written by compress), or {} for a directory without one."""
    file = path / MANIFEST
    try:
        return json.loads(file.read_text(encoding="utf-8")) if file.is_file() else {}
    except (OSError, json.JSONDecodeError):
        return {}


def _shapes(path: Path) -> dict[str, tuple[int, int]]:
    """``weight_shape`` (N, K) of every packed layer (tiny tensors, read directly)."""
    from safetensors import safe_open

    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                if key.endswith(".weight_shape"):
                    n, k = fh.get_tensor(key).tolist()
                    out[key.rpartition(".")[0]] = (int(n), int(k))
    return out


def layer_sparsity(path: Path) -> dict[str, float]:
    """Fraction of exactly-zero weights of every linear in a model directory or export.

    A plain checkpoint's 2-D ``*.weight`` tensors are read as stored; a
    pack-quantized export's layers are dequantized first (a pruned weight is
    stored as the zero point's code, so it dequantizes to exactly 0).
    Embeddings are left out.

    Returns:
        module name → sparsity in [0, 1], in checkpoint order.
    """
    from safetensors import safe_open
    from torch import nn

    path = Path(path)
    config = read_config(path)
    out: dict[str, float] = {}
    from compressor.export.loader import is_readable_config

    if is_readable_config(config.get("quantization_config")):
        from compressor.export.loader import load_compressed
        from compressor.runtime.quant_linear import QuantLinear

        model = load_compressed(path, verify=False)
        for name, m in model.named_modules():
            if isinstance(m, QuantLinear):
                out[name] = float((m.dequantized_weight() == 0).float().mean())
            elif isinstance(m, nn.Linear) and m.weight is not model.get_input_embeddings().weight:
                out[name] = float((m.weight == 0).float().mean())
        return out
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            for key in fh.keys():
                if key.endswith(".weight") and "embed" not in key and len(fh.get_slice(key).get_shape()) == 2:
                    out[key[: -len(".weight")]] = float((fh.get_tensor(key) == 0).float().mean())
    return out

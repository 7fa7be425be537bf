"""Device placement through accelerate: device maps, memory limits, CPU and disk offload."""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

__all__ = ["input_device", "load_for_eval", "parse_max_memory", "place_model", "placement_summary"]

log = logging.getLogger(__name__)

_SIZE = re.compile(r"^\d+(\.\d+)?\s*([KMGT]i?B)?$", re.IGNORECASE)


def parse_max_memory(spec: str | dict | None) -> dict | None:
    """An accelerate ``max_memory`` dict from ``"cpu=200MB,0=10GiB"`` (a dict passes through).

    Keys are ``cpu``, ``mps``, ``disk`` or a GPU index; values are byte counts or sizes
    with a unit (``KB``, ``MB``, ``GB``, ``KiB``, ``MiB``, ``GiB``...).

    Raises:
        ValueError: an entry without ``=``, an unknown device or a size accelerate cannot read.
    """
    if spec is None or isinstance(spec, dict):
        return spec
    out: dict = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        device, sep, size = (s.strip() for s in entry.partition("="))
        if not sep or not size:
            raise ValueError(f"max_memory entry {entry!r} has no size: write DEVICE=SIZE, e.g. cpu=200MB,0=10GiB")
        if not (device.isdigit() or device in ("cpu", "mps", "disk")):
            raise ValueError(f"max_memory device {device!r} is unknown: use cpu, mps, disk or a GPU index (0, 1...)")
        if not _SIZE.match(size):
            raise ValueError(f"max_memory size {size!r} for {device} is not a size: use bytes or e.g. 200MB, 10GiB")
        key = int(device) if device.isdigit() else device
        out[key] = int(size) if size.isdigit() else size.upper().replace("IB", "iB")
    if not out:
        raise ValueError(f"max_memory={spec!r} is empty: write DEVICE=SIZE, e.g. cpu=200MB")
    return out


def place_model(model: nn.Module, device_map: str | dict, max_memory: dict | None = None,
                offload_folder: str | Path | None = None) -> nn.Module:
    """Place ``model`` with accelerate.

    Args:
        model: a model on CPU.
        device_map: ``"cpu"``, ``"auto"`` (fill GPUs, then CPU, then disk, with ``max_memory``
            limits) or an explicit ``{module_name: device}`` map (``"disk"`` allowed).
        max_memory: accelerate ``max_memory`` for ``"auto"``.
        offload_folder: where modules mapped to ``"disk"`` are written; use a fresh folder per
            model (accelerate reuses an ``index.json`` it finds there).

    Raises:
        ValueError: a device map that is not ``"cpu"``, ``"auto"`` or a dict; modules mapped
            to ``"disk"`` without ``offload_folder``.
    """
    from accelerate import dispatch_model, infer_auto_device_map

    if device_map == "cpu":
        return model.to("cpu")
    if device_map == "auto":
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        device_map = infer_auto_device_map(model, max_memory=dict(max_memory) if max_memory else None,
                                           no_split_module_classes=no_split)
    if not isinstance(device_map, dict):
        raise ValueError(f"device_map={device_map!r}: use 'cpu', 'auto' or a dict of module → device")
    if "disk" in device_map.values() and offload_folder is None:
        disk = [name or "(the whole model)" for name, dev in device_map.items() if dev == "disk"]
        raise ValueError(f"max_memory={max_memory} leaves {', '.join(disk[:3])} for disk offload: "
                         "pass an offload folder (--offload-folder DIR) or raise --max-memory")
    if set(device_map.values()) <= {"cpu"}:
        return model.to("cpu")
    if device_map.get("") == "disk":  # accelerate offloads named submodules: name the top-level ones
        device_map = {name: "disk" for name, _ in model.named_children()}
    log.info("device map: %s", device_map)
    return dispatch_model(model, device_map=device_map, offload_dir=str(offload_folder) if offload_folder else None)


def load_for_eval(
    path: str | Path,
    *,
    dtype: torch.dtype | None = None,
    backend: str = "auto",
    device_map: str | dict | None = None,
    max_memory: dict | None = None,
    offload_folder: str | Path | None = None,
    device: torch.device | str | None = None,
    trust_remote_code: bool = False,
) -> nn.Module:
    """Load a checkpoint or export for evaluation, placed by accelerate.

    Without ``max_memory`` and ``offload_folder`` this is :func:`compressor.api.load_model`.
    With them, a Hugging Face checkpoint streams into place through ``from_pretrained``
    (modules past the limits are offloaded to CPU, then to ``offload_folder``); an export
    is built on CPU and dispatched by :func:`place_model`.

    Args:
        path: model directory or export.
        dtype: parameter dtype (default: as stored).
        backend: dequant-matmul backend for exports.
        device_map: None (CPU), ``"auto"`` or an accelerate device map.
        max_memory: accelerate ``max_memory`` (see :func:`parse_max_memory`); needs a device map.
        offload_folder: a fresh folder for disk offload; needs a device map.
        device: without a device map, move the model there (one device per process under
            ``accelerate launch``).
        trust_remote_code: allow the checkpoint's own modelling code to run.

    Raises:
        ValueError: ``max_memory`` or ``offload_folder`` without a device map.
    """
    from compressor.api import check_checkpoint, is_export, load_model
    from compressor.export.loader import load_compressed
    from compressor.core.hub import check_remote_code

    if (max_memory or offload_folder) and device_map is None:
        raise ValueError("max_memory and offload_folder place the model with accelerate: add --device-map auto")
    if not (max_memory or offload_folder):
        model = load_model(path, dtype=dtype, device_map=device_map, backend=backend,
                           trust_remote_code=trust_remote_code)
        return model.to(device) if device is not None and device_map is None else model
    path = Path(path)
    check_checkpoint(path)
    max_memory = dict(max_memory) if max_memory else None  # accelerate converts the sizes in place
    if is_export(path):
        model = load_compressed(path, dtype=dtype, backend=backend)
        return place_model(model, device_map, max_memory, offload_folder)
    from transformers import AutoModelForCausalLM

    check_remote_code(path, trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype or "auto", device_map=device_map,
                                                 max_memory=max_memory, offload_folder=offload_folder,
                                                 use_safetensors=True, trust_remote_code=trust_remote_code)
    log.info("device map: %s", getattr(model, "hf_device_map", None))
    return model.eval()


def input_device(model: nn.Module) -> torch.device:
    """The device a model's input ids go to: its first execution device.

    For a model dispatched by accelerate that is the first module's device, with
    ``"cpu"``/``"disk"`` entries standing for the main (first non-offload) device;
    otherwise the device of the first parameter that is not on ``meta``.
    """
    hf_map = getattr(model, "hf_device_map", None)
    if hf_map:
        devices = [d for d in hf_map.values() if d not in ("cpu", "disk")]
        first = next(iter(hf_map.values()))
        dev = first if first not in ("cpu", "disk") else (devices[0] if devices else "cpu")
        return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def placement_summary(model: nn.Module) -> str:
    """Where a model's modules are: ``"cpu"``, ``"cuda:0"`` or counts such as ``"cpu:2 disk:3"``."""
    hf_map = getattr(model, "hf_device_map", None)
    if not hf_map or len(set(hf_map.values())) == 1 and "disk" not in hf_map.values():
        return str(input_device(model))
    counts = Counter(f"cuda:{d}" if isinstance(d, int) else str(d) for d in hf_map.values())
    return " ".join(f"{d}:{n}" for d, n in sorted(counts.items()))

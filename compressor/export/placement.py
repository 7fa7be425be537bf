"""Device placement through accelerate: device maps, memory limits, CPU and disk offload."""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import torch
from torch import nn

__all__ = ["input_device", "parse_max_memory", "place_model", "placement_summary"]

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

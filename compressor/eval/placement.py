"""Device placement through accelerate."""

from __future__ import annotations

import logging

from torch import nn

__all__ = ["place_model"]

log = logging.getLogger(__name__)


def place_model(model: nn.Module, device_map: str | dict, max_memory: dict | None = None) -> nn.Module:
    """Place ``model`` with accelerate.

    Args:
        model: a model on CPU.
        device_map: ``"cpu"``, ``"auto"`` (fill GPUs, then CPU, with ``max_memory``
            limits) or an explicit ``{module_name: device}`` map.
        max_memory: accelerate ``max_memory`` for ``"auto"``.
    """
    from accelerate import dispatch_model, infer_auto_device_map

    if device_map == "cpu":
        return model.to("cpu")
    if device_map == "auto":
        no_split = list(getattr(model, "_no_split_modules", None) or [])
        device_map = infer_auto_device_map(model, max_memory=max_memory, no_split_module_classes=no_split)
    if not isinstance(device_map, dict):
        raise ValueError(f"device_map={device_map!r}: use 'cpu', 'auto' or a dict of module → device")
    if set(device_map.values()) <= {"cpu"}:
        return model.to("cpu")
    log.info("device map: %s", device_map)
    return dispatch_model(model, device_map=device_map)

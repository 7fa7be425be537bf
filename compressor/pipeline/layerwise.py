"""Layer-by-layer calibration for models without repeated decoder blocks (CNNs, encoders).

For each targeted layer in module order: run the (partially compressed)
model on the calibration inputs until that layer, recording its inputs through
the pass's hooks, stop the forward there, and let the pass compress the layer.
Each layer therefore sees the inputs produced by the already-compressed layers
before it. Costs one truncated forward per layer; memory holds one layer's inputs.

Passes that reconstruct the full-precision model's outputs (``wants_fp_inputs``,
e.g. asymmetric AdaRound) also get the inputs the same layer sees in an
untouched copy of the model, on the same batches: twice the weights in memory
and a second truncated forward per layer.
"""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from compressor.core.layers import is_quantizable
from compressor.core.passes import Pass, select_modules
from compressor.core.progress import progress
from compressor.pipeline.cache import to_device

__all__ = ["run_layerwise"]

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised after the layer being calibrated has run."""


def _call(model: nn.Module, batch: torch.Tensor):
    return model(input_ids=batch) if batch.dtype == torch.int64 else model(batch)


def _raise(*_):
    raise _StopForward


@torch.no_grad()
def run_layerwise(model: nn.Module, passes: list[Pass], inputs: torch.Tensor, *, batch_size: int = 32,
                  device: torch.device | str = "cpu", quiet: bool = False) -> None:
    """Compress every targeted layer of ``model`` in place, in module order.

    Args:
        model: any module whose forward takes ``inputs`` batches (images (S, C, H, W)
            as the first argument, or int64 token ids as ``input_ids``).
        passes: calibrated passes exposing ``begin_block`` / ``end_block``; each
            layer is treated as a one-layer block.
        inputs: (S, ...) calibration inputs.
        batch_size: inputs per forward.
        device: where the model runs.
    """
    was_training = model.training
    model.eval()
    model.to(device)
    try:
        for p in passes:
            if not p.requires_calibration:
                p.apply(model, quiet=quiet)
                continue
            matched = select_modules(model, p.config)
            layers = [(n, m) for n, m in matched if not list(m.children())]
            skipped = [n for n, m in matched if list(m.children()) and is_quantizable(m)]
            if skipped:
                # e.g. a "SAME"-padding Conv2d subclass whose padding is a child module: its forward is
                # not the plain convolution the pass reconstructs, so it is left in full precision
                log.warning("%s: %d targeted layers have child modules and are left unquantized: %s",
                            p.name, len(skipped), ", ".join(skipped[:5]) + (" ..." if len(skipped) > 5 else ""))
            if not layers:
                raise ValueError(f"{p.name}: no layer matches targets={list(p.config.targets)}")
            fp_model = copy.deepcopy(model) if p.wants_fp_inputs else None
            fp_modules = dict(fp_model.named_modules()) if fp_model is not None else {}
            for name, layer in progress(layers, p.name, quiet=quiet):
                if fp_model is not None:
                    p.stream = "fp"
                    try:
                        p.begin_block(fp_modules[name], name)
                        _forwards_until(fp_model, fp_modules[name], inputs, batch_size, device)
                    finally:
                        p.stream = "compressed"
                p.begin_block(layer, name)
                _forwards_until(model, layer, inputs, batch_size, device)
                p.end_block(layer, name)
            del fp_model, fp_modules
    finally:
        model.train(was_training)


def _forwards_until(model: nn.Module, layer: nn.Module, inputs: torch.Tensor, batch_size: int, device) -> None:
    """Run every input batch through ``model``, stopping each forward once ``layer`` has run."""
    stop = layer.register_forward_pre_hook(_raise)  # after the pass's own pre-hook: the layer itself never runs
    try:
        for start in range(0, inputs.shape[0], batch_size):
            try:
                _call(model, to_device(inputs[start : start + batch_size], device))
            except _StopForward:
                pass
    finally:
        stop.remove()

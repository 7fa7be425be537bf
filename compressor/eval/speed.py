"""Prefill and greedy-decode speed of a causal LM, and the kernel backend it runs on."""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from compressor.export.placement import input_device

__all__ = ["SpeedResult", "decode_speed", "kernel_backend"]


@dataclass(frozen=True)
class SpeedResult:
    """Timings of one prompt and a greedy continuation with a KV cache (batch 1).

    Attributes:
        prefill_tok_s: prompt tokens / seconds of the prompt's forward pass (after one warm-up pass).
        decode_tok_s: 1 / median seconds of one decode step (one token in, one out).
        decode_ms: median milliseconds per decode step.
        steps: decode steps timed.
        peak_mem_mb: peak CUDA memory allocated during the run (MiB), None off CUDA.
    """

    prefill_tok_s: float
    decode_tok_s: float
    decode_ms: float
    steps: int
    peak_mem_mb: float | None


def _cache_kwarg(model: nn.Module) -> str:
    """The forward argument that takes the KV cache (``cache`` in transformers 5, ``past_key_values`` before)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def decode_speed(model: nn.Module, prompt: torch.Tensor, steps: int, *, warmup: int = 2) -> SpeedResult:
    """Time a prompt's prefill and ``steps`` greedy decode steps with a KV cache.

    Args:
        model: causal LM returning ``.logits`` (1, L, V), with a transformers KV cache.
        prompt: (P,) int64 prompt token ids.
        steps: decode steps to time (each step's time is measured on its own; the median is reported).
        warmup: untimed decode steps first (kernel repacks, allocator warm-up).

    Returns:
        :class:`SpeedResult`.

    Raises:
        ValueError: ``steps < 1``, or prompt + warmup + steps exceed the model's max_position_embeddings.
    """
    from transformers import DynamicCache

    if steps < 1:
        raise ValueError(f"decode steps={steps}: use at least 1 (or turn the speed measurement off)")
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    total = prompt.numel() + warmup + steps
    if limit and total > limit:
        raise ValueError(f"a {prompt.numel()}-token prompt and {warmup + steps} decode steps exceed the model's "
                         f"max_position_embeddings={limit}: decode fewer tokens")
    device = input_device(model)
    key = _cache_kwarg(model)
    x = prompt[None].to(device)  # (1, P)
    was = model.training
    model.eval()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model(input_ids=x, use_cache=False)  # warm-up: one-time kernel repacks and compilation
    _sync(device)
    cache = DynamicCache()
    start = time.perf_counter()
    out = model(input_ids=x, use_cache=True, **{key: cache})
    _sync(device)
    prefill = time.perf_counter() - start
    tok = out.logits[:, -1:].argmax(-1)  # (1, 1)
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        out = model(input_ids=tok, use_cache=True, **{key: cache})
        tok = out.logits[:, -1:].argmax(-1)
        _sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    model.train(was)
    med = statistics.median(times)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return SpeedResult(prefill_tok_s=prompt.numel() / prefill, decode_tok_s=1.0 / med, decode_ms=med * 1e3,
                       steps=steps, peak_mem_mb=peak)


def kernel_backend(model: nn.Module) -> str:
    """The dequant-matmul implementation the model's quantized linears run on.

    Resolves the first :class:`~compressor.runtime.quant_linear.QuantLinear`'s requested
    backend for its device, scheme, (N, K) shape and the model's activation dtype
    (the input embedding's dtype) with :func:`compressor.kernels.dispatch.resolve_backend`.

    Returns:
        ``"reference"``, ``"triton"`` or ``"cpu"`` for exports; ``"dense"`` for a model without QuantLinear.
    """
    from compressor.kernels.dispatch import resolve_backend
    from compressor.runtime.quant_linear import QuantLinear

    layer = next((m for m in model.modules() if isinstance(m, QuantLinear)), None)
    if layer is None:
        return "dense"
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    dtype = emb.weight.dtype if emb is not None else layer.weight_scale.dtype
    return resolve_backend(layer.backend, layer.weight_packed.device, dtype=dtype, scheme=layer.scheme,
                           shape=(layer.out_features, layer.in_features), g_idx=layer.weight_g_idx)

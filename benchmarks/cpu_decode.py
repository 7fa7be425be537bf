"""CPU decode latency of SmolLM2-135M at W4: the int4 CPU path against dequantize-then-matmul and dense models.

Compresses SmolLM2 with RTN at W4 (group 64 by default; round-to-nearest is
enough for latency, the codes do not change the work), exports it, loads the
export with :func:`compressor.load_compressed` and times greedy decoding with
a KV cache, one token at a time:

* ``fp32``: the original model, dense fp32;
* ``bf16``: the original model cast to bf16, dense;
* ``w4-reference``: the export in fp32 on the torch reference (each call
  unpacks and dequantizes the weight, then ``F.linear``);
* ``w4-int4cpu``: the export in bf16 on ``backend="auto"``, which takes torch's
  int4 CPU matmul (``compressor.kernels.cpu``).

Each line reports the median milliseconds per decoded token over ``--steps``
steps after a warm-up, and its ratio to fp32 measured in the same run; the
int4 line also reports the one-time repack of all layers. Usage::

    python benchmarks/cpu_decode.py                 # ~2 min on 2 cores
    python benchmarks/cpu_decode.py --setting w4g128 --steps 64 --output cpu_decode.jsonl
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common beside this file
import _common as common  # noqa: E402

log = logging.getLogger("benchmarks.cpu_decode")

BENCH = "cpu_decode"


def decode_ms(model, prompt_ids, steps: int, warmup: int = 4) -> list[float]:
    """Milliseconds of each greedy decode step (one token, KV cache) after ``warmup`` steps."""
    import torch
    from transformers import DynamicCache

    cache = DynamicCache()
    times = []
    with torch.inference_mode():
        out = model(input_ids=prompt_ids, cache=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
        for i in range(warmup + steps):
            start = time.perf_counter()
            out = model(input_ids=tok, cache=cache, use_cache=True)
            tok = out.logits[:, -1:].argmax(-1)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return times


def weight_mb(model) -> float:
    """Megabytes of the decoder blocks' parameters and buffers (embeddings and lm_head excluded)."""
    tensors = [t for n, t in list(model.named_parameters()) + list(model.named_buffers()) if ".layers." in n]
    return round(sum(t.numel() * t.element_size() for t in tensors) / 2**20, 2)


def repack_s(model) -> float:
    """Seconds to repack every QuantLinear for the int4 CPU op (the one-time cost at first use)."""
    import torch

    from compressor.export.loader import QuantLinear
    from compressor.kernels import cpu

    start = time.perf_counter()
    for m in model.modules():
        if isinstance(m, QuantLinear):
            cpu.prepare_int4(m.weight_packed, m.weight_scale, m.weight_zero_point, (m.out_features, m.in_features),
                             m.scheme, torch.bfloat16)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--setting", default="w4g64", help="a 4-bit setting the int4 op accepts, e.g. w4g64, w4g128, w4pc")
    parser.add_argument("--prompt", type=int, default=32, help="prompt tokens before decoding")
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    parser.add_argument("--output", default=None, help="also append the JSON lines to this file")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    common.setup_logging(args.verbose)
    import torch

    import compressor
    from compressor.kernels import dispatch

    if args.threads:
        torch.set_num_threads(args.threads)
    setting = common.parse_setting(args.setting)
    if setting.bits != 4:
        parser.error(f"--setting {args.setting}: the int4 CPU path takes 4-bit weights")
    path, tokenizer = common.load_tokenizer_and_path()
    ids = common.eval_ids(tokenizer)[: args.prompt][None]  # (1, prompt) from SOTU 2010-2021
    base = {"bench": BENCH, "model": common.MODEL_NAME, "setting": setting.name, "prompt": args.prompt,
            "steps": args.steps, "machine": common.machine_info(),
            "versions": common.versions("torch", "transformers", "compressor")}
    fp32 = common.load_fp32_model(path)
    rows = [("fp32", fp32, torch.float32)]
    rows.append(("bf16", common.load_fp32_model(path).to(torch.bfloat16), torch.bfloat16))
    with tempfile.TemporaryDirectory() as tmp:
        recipe = compressor.Recipe.from_dict({"passes": [{"rtn": {"scheme": setting.scheme()}}]})
        compressor.compress(common.load_fp32_model(path), recipe, output=Path(tmp) / "w4", tokenizer=tokenizer, quiet=True)
        rows.append(("w4-reference", compressor.load_compressed(Path(tmp) / "w4", dtype=torch.float32, backend="reference"),
                     torch.float32))
        rows.append(("w4-int4cpu", compressor.load_compressed(Path(tmp) / "w4", dtype=torch.bfloat16), torch.bfloat16))
    results = {}
    for name, model, dtype in rows:
        extra = {}
        if name == "w4-int4cpu":
            layer = next(m for m in model.modules() if hasattr(m, "weight_packed"))
            chosen = dispatch.resolve_backend("auto", torch.device("cpu"), dtype=dtype, scheme=layer.scheme,
                                              shape=(layer.out_features, layer.in_features))
            if chosen != "cpu":
                log.error("backend='auto' did not choose the int4 CPU path for %s (got %s)", setting.name, chosen)
                return 1
            extra["repack_s"] = round(repack_s(model), 3)
        times = decode_ms(model, ids, args.steps)
        results[name] = statistics.median(times)
        record = dict(base, variant=name, dtype=str(dtype).removeprefix("torch."), ms_per_token=round(results[name], 3),
                      tokens_per_s=round(1e3 / results[name], 2), decoder_weight_mb=weight_mb(model),
                      vs_fp32_speed=round(results["fp32"] / results[name], 3), status="ok", **extra)
        common.emit(record, args.output)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())

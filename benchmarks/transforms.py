"""Rotations before quantization on SmolLM2-135M: W4A16 and W4A4KV4, with and without Hadamard transforms.

Every (setting, transform, method) runs in its own subprocess, so ``peak_rss_mb``
is that run's alone. One protocol for all (DESIGN.md, "Measured starting
points"): calibration = 128 windows x 512 tokens of SOTU 1790-1999 at seeded
random starts (seed 0); evaluation = perplexity on the first 32768 tokens of
SOTU 2010-2021 in consecutive windows of 512; SmolLM2-135M-Instruct in fp32.

Settings (weights: every ``Linear`` but ``lm_head``, 4-bit per output channel,
asymmetric min-max grid, as in ``quant_quality.py``):

* ``w4a16``: weights only;
* ``w4a4kv4``: plus every linear input 4-bit per token (symmetric) and keys /
  values 4-bit per head and token (asymmetric), fake-quantized in memory by the
  ``quantize_activations`` pass, after the weight pass;
* ``w4a4kv4-clip`` (on request): the same with each token's input range clipped
  to 0.9 (QuaRot's activation clip ratio); llm-compressor's dynamic grids have
  no clip ratio, so the peers skip it.

Transforms (the ``rotate`` pass, first in the recipe):

* ``none``;
* ``hadamard``: QuaRot (arXiv 2404.00456) — norms folded, randomized Hadamard
  R1 and R2 fused, online Hadamards R4 before down_proj and across the heads
  before o_proj, and R3 on queries and keys after RoPE
  (``rotate: {seed: 0, r1: hadamard, r2: true, r3: true, r4: true, online_o: true}``);
* ``ostquant``: OSTQuant (arXiv 2501.13987) — the same folding, Hadamard
  init and online R3 / R4 / o_proj Hadamard, then R1, per-block R2 and the scaling vectors
  learned by KL-Top under the job's own fake quantization (weights as below;
  activations and KV cache as the setting; gradients through the grids'
  ranges, ``range_grad``), with one clip ratio per block input when the
  setting quantizes them (``learn_clip``; the setting's ``clip_ratio`` is the
  start, and ``quantize_activations`` uses the learned ones), then fused (``ostquant`` pass,
  first in the recipe; ``--ost-steps`` steps of one 512-token sequence drawn
  from the first 32 calibration windows). No fp32 line: the fused model keeps
  the fp function (tests/transforms/test_ostquant.py), and which quantization
  it was trained for depends on the setting.
* ``ostquant-rot`` (on request): the same with the rotations only
  (``smooth_*: false``), SpinQuant-style. Before GPTQ the scalings cost more
  weight error than they save in the activations on SmolLM2 (docs/ostquant.md).

Peers (opt-in, ``--transforms llmc-spinquant,llmc-spinquant-r3,llmc-quip``):
llm-compressor's ``SpinQuantModifier`` / ``QuIPModifier`` (Sylvester Hadamard
blocks of 64) then its ``QuantizationModifier`` (rtn) or ``GPTQModifier``
(gptq) with the same weight, activation and KV-cache grids, run by
``_peer_llmc_transforms.py`` in the peer venv (``--peer-python``) and scored
with the same perplexity protocol; rtn / gptq only, no fp32 line.

Methods: ``fp32`` (no weight pass: one line per transform; with ``hadamard``
it checks that the rotations keep the perplexity), ``rtn``, ``gptq`` (our
passes, default settings), and on request ``gptaq``: our ``gptq`` pass with
``asymmetric: true`` (GPTAQ, arXiv 2504.02692: each layer's rounding also
absorbs the error the quantized weights, inputs and KV cache of the blocks
before it left in its input; the peers skip it).

Results: one JSON line per run on stdout, appended to ``--output`` too; logs
on stderr. Fields are described in benchmarks/README.md.

    python -m benchmarks.transforms --quick
    python -m benchmarks.transforms --output out/bench/transforms.jsonl
    python -m benchmarks.transforms --settings w4a4kv4 --transforms hadamard --methods gptq
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import _common as common

log = logging.getLogger("benchmarks.transforms")

BENCH = "transforms"
PEER_MODULE = "_peer_llmc_transforms"
DEFAULT_PEER_PYTHON = common.PEER_PYTHON

WEIGHTS = {"bits": 4, "group_size": -1, "symmetric": False}  # W4 per-channel asymmetric (DESIGN.md's RTN)
# setting → quantize_activations config, or None for weight-only
SETTINGS: dict[str, dict[str, Any] | None] = {
    "w4a16": None,
    "w4a8": {"bits": 8, "symmetric": True, "clip_ratio": 1.0, "kv_bits": None, "kv_symmetric": False,
             "kv_group_size": None},
    "w4a4kv4": {"bits": 4, "symmetric": True, "clip_ratio": 1.0, "kv_bits": 4, "kv_symmetric": False,
                "kv_group_size": None},
    "w4a4kv4-clip": {"bits": 4, "symmetric": True, "clip_ratio": 0.9, "kv_bits": 4, "kv_symmetric": False,
                     "kv_group_size": None},
}
DEFAULT_SETTINGS = ("w4a16", "w4a4kv4")  # w4a8 and w4a4kv4-clip on request (--settings)
# transform → rotate config, or None for no rotation
TRANSFORMS: dict[str, dict[str, Any] | None] = {
    "none": None,
    "hadamard": {"seed": 0, "r1": "hadamard", "r2": True, "r3": True, "r4": True, "online_o": True},
    "ostquant": {"seed": 0, "r1_init": "hadamard", "rotate_ov": True, "r3": True, "online_o": True,
                 "smooth_norm": True, "smooth_ov": True, "smooth_up_down": True, "smooth_qk": True,
                 "range_grad": True},
}
TRANSFORMS["ostquant-rot"] = {**TRANSFORMS["ostquant"], "smooth_norm": False, "smooth_ov": False,
                              "smooth_up_down": False, "smooth_qk": False}
DEFAULT_TRANSFORMS = ("none", "hadamard", "ostquant")  # ostquant-rot on request
LEARNED = ("ostquant", "ostquant-rot")  # transforms trained for the job's setting: no fp32 line
# llm-compressor transforms (peer venv, opt-in): transform → (modifier, its arguments). Sylvester Hadamards
# need a power of two; 64 is the largest dividing SmolLM2's widths (576, 1536) and its head_dim.
HADAMARD_BLOCK = 64
SMOLLM2_HEAD_DIM = 64  # KV groups of one whole head, as ours (kv_group_size None)
PEER = "llm-compressor"
PEER_TRANSFORMS: dict[str, tuple[str, dict[str, Any]]] = {
    # rotations of llm-compressor's spinquant_example.py
    "llmc-spinquant": ("SpinQuantModifier", {"rotations": ["R1", "R2", "R4"], "transform_type": "hadamard",
                                             "transform_block_size": HADAMARD_BLOCK}),
    # plus R3 (queries and keys after RoPE); with a KV-cache scheme compressed-tensors then also
    # fake-quantizes the queries with the KV grid, which ours does not (see benchmarks/README.md)
    "llmc-spinquant-r3": ("SpinQuantModifier", {"rotations": ["R1", "R2", "R3", "R4"], "transform_type": "hadamard",
                                                "transform_block_size": HADAMARD_BLOCK}),
    # input-side rotations only: the modifier's default, which llm-compressor recommends over ["v", "u"]
    "llmc-quip": ("QuIPModifier", {"rotations": ["v"], "transform_type": "hadamard",
                                   "transform_block_size": HADAMARD_BLOCK}),
}
PEER_QUANTIZERS = {"rtn": "QuantizationModifier", "gptq": "GPTQModifier"}  # defaults otherwise
NO_FP32 = LEARNED + tuple(PEER_TRANSFORMS)
OST_STEPS = {"full": 100, "quick": 8}  # default --ost-steps
OST_SAMPLES = 32  # calibration windows OSTQuant trains on (the first ones)
METHODS = ("fp32", "rtn", "gptq", "gptaq")
DEFAULT_METHODS = ("fp32", "rtn", "gptq")  # gptaq on request
WEIGHT_PASSES = common.WEIGHT_PASSES  # method → (our weight pass, its options beyond the scheme)
# --quick without --methods: GPTQ (about 2 min even on the tiny calibration set) only in the full QuaRot job
QUICK_GPTQ = ("w4a4kv4", "hadamard")


# ---------------------------------------------------------------- planning (no model needed)


def _names(text: str | None, known, what: str) -> list[str] | None:
    """A comma list checked against ``known``; None when not given."""
    if text is None:
        return None
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    for name in names:
        if name not in known:
            raise ValueError(f"unknown {what} {name!r}: use a comma list of {', '.join(known)}")
    if not names:
        raise ValueError(f"--{what}s is empty: use a comma list of {', '.join(known)}")
    return list(dict.fromkeys(names))


def plan_jobs(methods: str | None = None, settings: str | None = None, transforms: str | None = None,
              *, quick: bool = False) -> list[dict[str, Any]]:
    """The runs, in order: for each transform its fp32 line, then every (setting, method).

    Args:
        methods, settings, transforms: comma lists, None for all (transforms:
            all of ours; the llm-compressor ones only when named). With
            ``quick`` and ``methods`` None, ``gptq`` runs only in the
            ``w4a4kv4`` + ``hadamard`` job (the smoke test stays within minutes).

    Returns:
        ``{"method", "setting", "transform"}`` dicts (``setting`` is ``"fp32"`` for fp32 lines).

    Raises:
        ValueError: an unknown or not-yet-built name, or an empty list.
    """
    m = _names(methods, METHODS, "method")
    s = _names(settings, tuple(SETTINGS), "setting") or list(DEFAULT_SETTINGS)
    t = _names(transforms, tuple(TRANSFORMS) + tuple(PEER_TRANSFORMS), "transform") or list(DEFAULT_TRANSFORMS)
    trim = quick and m is None
    m = m or list(DEFAULT_METHODS)
    jobs = []
    for transform in t:
        if "fp32" in m and transform not in NO_FP32:
            jobs.append({"method": "fp32", "setting": "fp32", "transform": transform})
        for setting in s:
            if transform in PEER_TRANSFORMS and SETTINGS[setting] and SETTINGS[setting]["clip_ratio"] != 1.0:
                log.info("%s skips %s: llm-compressor's dynamic grids have no clip ratio", transform, setting)
                continue
            for method in m:
                if method == "fp32" or (trim and method == "gptq" and (setting, transform) != QUICK_GPTQ):
                    continue
                if transform in PEER_TRANSFORMS and method not in PEER_QUANTIZERS:
                    log.info("%s skips %s: llm-compressor has no such weight method here", transform, method)
                    continue
                jobs.append({"method": method, "setting": setting, "transform": transform})
    return jobs


def recipe_dict(job: dict[str, Any]) -> dict[str, Any]:
    """The recipe of one job: ``rotate`` (if any), the weight pass (if any), ``quantize_activations`` (if any)."""
    if job["transform"] in PEER_TRANSFORMS:
        raise ValueError(f"{job['transform']} runs llm-compressor in the peer venv, not a recipe of ours: "
                         "see peer_modifiers()")
    passes: list[dict[str, Any]] = []
    rotate = TRANSFORMS[job["transform"]]
    if job["transform"] in LEARNED:
        if job["method"] == "fp32":
            raise ValueError(f"{job['transform']} is trained for a quantized setting: it has no fp32 line")
        acts = SETTINGS[job["setting"]] or {"bits": None, "kv_bits": None}
        train = {k: acts[k] for k in ("bits", "symmetric", "clip_ratio", "kv_bits", "kv_symmetric", "kv_group_size")
                 if k in acts}
        train["learn_clip"] = train["bits"] is not None  # one clip ratio per block input, used by quantize_activations
        steps = job.get("ost_steps") or OST_STEPS["full"]
        # trained under RTN weights before rtn; before gptq with fp weights, as SpinQuant does (GPTQ corrects them)
        weight = dict(WEIGHTS) if job["method"] == "rtn" else None  # gptq and gptaq: fp weights
        passes.append({"ostquant": {**rotate, "weight": weight, **train, "steps": steps,
                                          "samples": min(OST_SAMPLES, job.get("n_calib", OST_SAMPLES))}})
    elif rotate is not None:
        passes.append({"rotate": dict(rotate)})
    if job["method"] != "fp32":
        name, options = WEIGHT_PASSES[job["method"]]
        passes.append({name: {"scheme": dict(WEIGHTS), **options}})
        acts = SETTINGS[job["setting"]]
        if acts is not None:
            passes.append({"quantize_activations": dict(acts)})
    return {"seed": 0, "passes": passes}


def peer_modifiers(job: dict[str, Any], head_dim: int = SMOLLM2_HEAD_DIM) -> list[dict[str, Any]]:
    """llm-compressor's recipe for a peer job, as ``[{"modifier": class name, "args": keyword arguments}]``.

    The arguments are plain JSON (compressed-tensors' pydantic models take the
    dicts), so the record shows exactly what ``_peer_llmc_transforms.py`` built.
    Grids as ours: weights ``WEIGHTS``; linear inputs dynamic per token; keys
    and values dynamic per head and token (``group`` of ``head_dim`` over the
    last axis of ``(B, H, T, head_dim)``).

    Raises:
        ValueError: not a peer transform, fp32, or a grid llm-compressor cannot express.
    """
    if job["transform"] not in PEER_TRANSFORMS or job["method"] not in PEER_QUANTIZERS:
        raise ValueError(f"no llm-compressor recipe for {_label(job)}: peer transforms are "
                         f"{', '.join(PEER_TRANSFORMS)}, methods {', '.join(PEER_QUANTIZERS)}")
    bits, group = WEIGHTS["bits"], WEIGHTS["group_size"]
    weights = {"num_bits": bits, "type": "int", "symmetric": WEIGHTS["symmetric"],
               **({"strategy": "channel"} if group == -1 else {"strategy": "group", "group_size": group})}
    scheme: dict[str, Any] = {"targets": ["Linear"], "weights": weights}
    args: dict[str, Any] = {"config_groups": {"group_0": scheme}, "ignore": ["lm_head"]}
    acts = SETTINGS[job["setting"]]
    if acts is not None:
        if acts["clip_ratio"] != 1.0:
            raise ValueError(f"clip_ratio={acts['clip_ratio']}: llm-compressor's dynamic grids have no clip ratio")
        scheme["input_activations"] = {"num_bits": acts["bits"], "type": "int", "symmetric": acts["symmetric"],
                                       "strategy": "token", "dynamic": True}
        if acts["kv_bits"] is not None:
            args["kv_cache_scheme"] = {"num_bits": acts["kv_bits"], "type": "int", "symmetric": acts["kv_symmetric"],
                                       "strategy": "group", "group_size": acts["kv_group_size"] or head_dim,
                                       "dynamic": True}
    transform, transform_args = PEER_TRANSFORMS[job["transform"]]
    return [{"modifier": transform, "args": copy.deepcopy(transform_args)},
            {"modifier": PEER_QUANTIZERS[job["method"]], "args": args}]


def base_record(job: dict[str, Any]) -> dict[str, Any]:
    """The fields every line has; measurements start empty."""
    quantized = job["method"] != "fp32"
    acts = SETTINGS.get(job["setting"]) if quantized else None
    peer = job["transform"] in PEER_TRANSFORMS
    return {
        "bench": BENCH,
        "model": common.MODEL_NAME,
        "method": job["method"],
        "setting": job["setting"],
        "transform": job["transform"],
        "weights": dict(WEIGHTS) if quantized else None,
        "activations": {**{k: acts[k] for k in ("bits", "symmetric", "clip_ratio")},
                        # learned per block input from clip_ratio (the means are in rotation.clip_mean)
                        "learned_clip": job["transform"] in LEARNED and acts["bits"] is not None} if acts else None,
        "kv_cache": {"bits": acts["kv_bits"], "symmetric": acts["kv_symmetric"], "group_size": acts["kv_group_size"]}
        if acts and acts["kv_bits"] is not None else None,
        **({"peer": PEER, "modifiers": peer_modifiers(job), "recipe": None} if peer else {"recipe": recipe_dict(job)}),
        "ppl": None,
        "compress_s": None,
        "peak_rss_mb": None,
        "status": None,
    }


# ---------------------------------------------------------------- child


def run_one(job: dict[str, Any]) -> dict[str, Any]:
    """Load SmolLM2, compress with the job's recipe, measure perplexity (in this child process)."""
    import torch

    import compressor

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    record = base_record(job)
    record["machine"] = common.machine_info()
    record["versions"] = common.versions("torch", "transformers", "compressor")
    recipe = compressor.Recipe.from_dict(common.with_overrides(recipe_dict(job), job.get("set", [])))
    path, tokenizer = common.load_tokenizer_and_path()
    ids = common.eval_ids(tokenizer, job.get("split", "test"))
    model = common.load_fp32_model(path)
    if recipe.passes:
        kwargs = {}
        if any(p.requires_calibration for p in recipe.build()):
            calib = common.calibration_ids(tokenizer, job["n_calib"], job["calib_len"])
            record["calibration"] = calib.to_dict()
            kwargs["calibration"] = calib.input_ids
        try:
            start = time.perf_counter()
            model = compressor.compress(model, recipe, quiet=True, **kwargs)
            record["compress_s"] = round(time.perf_counter() - start, 2)
        except Exception as err:  # recorded as a finding (traceback in the log), not hidden
            log.error("%s failed:\n%s", _label(job), traceback.format_exc())
            record.update(status="failed", error=common.error_text(err))
            return record
        record["rotation"] = getattr(model, "rotation_info", None)
        record["attn_implementation"] = model.config._attn_implementation
    record.update(common.perplexity(model, ids, job["max_tokens"]))
    if job.get("reload") and job["method"] != "fp32":
        record.update(_reload(model, ids, job["max_tokens"]))
    record["status"] = "ok"
    return record


def _reload(model, ids, max_tokens: int) -> dict[str, Any]:
    """Export ``model`` to a temporary directory, reload it with ``load_compressed``, measure its perplexity."""
    import tempfile

    from compressor import load_compressed, save_compressed

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        out = save_compressed(model, Path(tmp) / "export")
        size = sum(f.stat().st_size for f in out.iterdir() if f.suffix == ".safetensors")
        reloaded = load_compressed(out)
        ppl = common.perplexity(reloaded, ids, max_tokens)["ppl"]
        return {"ppl_reloaded": ppl, "export_mb": round(size / 2**20, 1),
                "export_reload_s": round(time.perf_counter() - start, 2)}


# ---------------------------------------------------------------- parent


def _label(job: dict[str, Any]) -> str:
    return f"{job['method']}/{job['setting']}/{job['transform']}"


def run_job(job: dict[str, Any], verbose: bool, peer_python: Path = DEFAULT_PEER_PYTHON) -> dict[str, Any]:
    """Run one job in a fresh subprocess (a peer transform: in the peer venv); its peak RSS comes from ``wait4``."""
    if job["transform"] in PEER_TRANSFORMS:
        missing = common.missing_peer(peer_python)
        if missing:
            return {**base_record(job), "machine": common.machine_info(), **missing}
        command = common.module_command(PEER_MODULE, peer_python)
    else:
        command = [*common.module_command("transforms"), "--child"]
    log.info("running %s", _label(job))
    run = common.run_child(command, job, verbose=verbose)
    return common.child_record(run, base_record(job))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Rotations before W4A16 / W4A4KV4 quantization on SmolLM2-135M, one JSON line per result.",
        epilog="Cost on 2 cores: fp32 / rtn ~3 min per run, gptq ~7-10 min per run (full protocol, ~1 h for the "
        "grid); --quick ~6 min. See benchmarks/README.md.",
    )
    parser.add_argument("--settings", help=f"comma list of {', '.join(SETTINGS)} (default: "
                        f"{','.join(DEFAULT_SETTINGS)})")
    parser.add_argument("--reload", action="store_true", help="also export each quantized model (compressed-tensors), "
                        "reload it with load_compressed and report its perplexity as ppl_reloaded")
    parser.add_argument("--transforms", help=f"comma list of {', '.join(TRANSFORMS)} (default: "
                        f"{','.join(DEFAULT_TRANSFORMS)}) and "
                        f"llm-compressor's {', '.join(PEER_TRANSFORMS)} (peer venv; rtn / gptq only)")
    parser.add_argument("--ost-steps", type=int, help=f"OSTQuant training steps (default {OST_STEPS['full']}, "
                        f"{OST_STEPS['quick']} with --quick)")
    parser.add_argument("--methods", help=f"comma list of {', '.join(METHODS)} (default: "
                        f"{','.join(DEFAULT_METHODS)}; with --quick, gptq only for w4a4kv4 + hadamard)")
    common.add_protocol_args(parser, "smoke test: 8 calibration windows x 128 tokens, 2048 evaluation tokens")
    common.add_output_arg(parser, "transforms")
    common.add_set_arg(parser)
    parser.add_argument("--peer-python", type=Path, default=DEFAULT_PEER_PYTHON,
                        help="python of the peer venv, for the llmc-* transforms (default: %(default)s)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def plan(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[dict[str, Any]], dict[str, Any]]:
    """Parse the command line into ``(args, jobs, protocol)``; each job carries the protocol. Exits on bad input."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.output = common.output_path(args, "transforms")
    if args.child:
        return args, [], {}
    protocol = common.protocol_from_args(parser, args)
    try:
        jobs = plan_jobs(args.methods, args.settings, args.transforms, quick=args.quick)
    except ValueError as err:
        parser.error(str(err))
    if not jobs:
        parser.error("nothing to run: ostquant and the llmc-* transforms have no fp32 line; "
                     "add rtn or gptq to --methods")
    if args.ost_steps is not None and args.ost_steps < 1:
        parser.error(f"--ost-steps must be a positive integer, got {args.ost_steps}")
    protocol["ost_steps"] = args.ost_steps or OST_STEPS["quick" if args.quick else "full"]
    protocol["reload"] = args.reload
    if args.set:
        protocol["set"] = args.set
    return args, [{**job, **protocol} for job in jobs], protocol


def main(argv: list[str] | None = None) -> None:
    args, jobs, protocol = plan(argv)
    common.setup_logging(args.verbose)
    if common.run_child_job(args, run_one):
        return
    log.info("%d runs: %s", len(jobs), ", ".join(_label(j) for j in jobs))
    for job in jobs:
        record = run_job(job, args.verbose, args.peer_python)
        record["protocol"] = {"quick": args.quick, **protocol}
        common.emit(record, args.output)


if __name__ == "__main__":
    main()

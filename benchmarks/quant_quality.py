"""Weight-quantization quality on SmolLM2-135M: ours (rtn, gptq, adaround) beside llm-compressor.

Every (method, setting) runs in its own subprocess, so ``peak_rss_mb`` is that
run's alone and the peers run in their own venv (``benchmarks/setup_peers.sh``).
All runs share one protocol (DESIGN.md, "Measured starting points"):
calibration = 128 windows x 512 tokens of SOTU 1790-1999 at seeded random
starts; evaluation = perplexity on the first 32768 tokens of SOTU 2010-2021 in
consecutive windows of 512, with ``compressor.eval.perplexity``.

Results: one JSON line per (method, setting) on stdout, appended to ``--output``
too. Logs go to stderr. Fields are described in benchmarks/README.md.

    python -m benchmarks.quant_quality --quick     # smoke run: fp32, rtn, gptq at w4g64, our venv only
    python -m benchmarks.quant_quality --quick --methods rtn,llmc-gptq --settings w4g64
    python -m benchmarks.quant_quality --methods fp32,rtn,gptq --settings w4g64,w3g64 --output results.jsonl
"""

from __future__ import annotations

import argparse
import inspect
import logging
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import _common as common

log = logging.getLogger("benchmarks.quant_quality")

PEER_MODULE = "_peer_llmcompressor"
DEFAULT_PEER_PYTHON = common.PEER_PYTHON

# float grids: each group's scale searched by squared error over 20 ratios below its max and 20 above, up to 1.5
# (an NVFP4 group may map its max to 4 instead of 6: Four Over Six, arXiv 2512.02010)
MSE_GROW = {"observer": "mse", "mse_grid": 20, "mse_max_grow": 0.5, "mse_norm": 2.0}
# method → (our pass, its settings beyond the scheme)
# gptq-norefit: our GPTQ without the least-squares scale refit, the like-for-like twin of llm-compressor's GPTQ
# rtn-mse / gptq-mse: the scales searched per group (observer mse; the "scheme" entry merges into the setting's)
# awqa-qa-gptaq-mse: awqa-qa-gptaq whose GPTQ takes its static group scales from that search (AWQ's search keeps
# the plain scales: the observer would run at each of its 21 exponents)
# adaround-block: every linear of a block learns its rounding and its group scales together against the
# full-precision block output, the like-for-like answer to AutoRound's SignRound (which tunes rounding and clipping)
OUR_PASSES = common.WEIGHT_PASSES | {"gptq-norefit": ("gptq", {"refit_scales": False}), "adaround": ("adaround", {}),
                                     "adaround-block": ("adaround", {"granularity": "block", "learn_scale": True}),
                                     "rtn-mse": ("rtn", {"scheme": {"observer": "mse"}}),
                                     "gptq-mse": ("gptq", {"scheme": {"observer": "mse"}}),
                                     "rot-rtn": ("rtn", {}), "rot-gptq": ("gptq", {}), "gptq-fpprop": ("gptq", {}),
                                     "awq-rtn": ("rtn", {}), "awq-gptq": ("gptq", {}),
                                     "qa-gptaq": ("gptq", {"asymmetric": True}),
                                     "bh-rtn": ("rtn", {}), "bh-gptq": ("gptq", {}),
                                     "bh-qa-gptaq": ("gptq", {"asymmetric": True}),
                                     "awq-qa-gptaq": ("gptq", {"asymmetric": True}),
                                     "awqa-rtn": ("rtn", {}), "awqa-qa-gptaq": ("gptq", {"asymmetric": True}),
                                     "awqa-qa-gptaq-mse": ("gptq", {"asymmetric": True, "scheme": MSE_GROW})}
# methods whose recipe quantizes the linear inputs *before* the weight pass (settings with quantized inputs only):
# GPTAQ then fits each quantized layer on quantized inputs to the uncompressed model's outputs, so it also
# compensates the inputs' rounding (its full-precision stream bypasses the quantizers)
ACT_FIRST = {"qa-gptaq", "bh-qa-gptaq", "awq-qa-gptaq", "awqa-qa-gptaq", "awqa-qa-gptaq-mse"}
# methods that run the sequential pipeline otherwise than by default: method → PipelineConfig settings
# (gptq-fpprop: every block calibrated on the full-precision model's inputs, one forward per block instead of two)
PIPELINES = {"gptq-fpprop": {"propagate": "full_precision"}}
# methods whose recipe starts with another pass, given the setting's weight scheme: a rotation (QuaRot's R1-R4 plus
# the online o_proj Hadamard, what 4-bit inputs need) or AWQ's activation-aware scaling for that scheme
_ROTATE = [{"rotate": {"online_o": True}}]


def _rotate(scheme: dict[str, Any], setting: common.Setting) -> list[dict[str, Any]]:
    """rot-*: QuaRot's R1-R4 plus the online o_proj Hadamard."""
    return _ROTATE


def _block_rotate(scheme: dict[str, Any], setting: common.Setting) -> list[dict[str, Any]]:
    """bh-*: MR-GPTQ's block rotations, a Hadamard of the FP4 format's group size on every linear input."""
    return [{"hadamard_inputs": {"block": scheme["group_size"]}}]


def _awq(scheme: dict[str, Any], setting: common.Setting) -> list[dict[str, Any]]:
    """awq-*: AWQ's scales searched for the weight grid alone."""
    return [{"awq": {"scheme": scheme}}]


def _awq_inputs(scheme: dict[str, Any], setting: common.Setting) -> list[dict[str, Any]]:
    """awqa-*: AWQ's scales searched with the setting's input format applied too (SmoothQuant's migration)."""
    return [{"awq": {"scheme": scheme, "inputs": setting.fmt}}]


# method → its leading passes, given the setting's weight scheme and the setting
LEADING_PASSES = {"rot-rtn": _rotate, "rot-gptq": _rotate,
                  "bh-rtn": _block_rotate, "bh-gptq": _block_rotate, "bh-qa-gptaq": _block_rotate,
                  "awq-rtn": _awq, "awq-gptq": _awq, "awq-qa-gptaq": _awq,
                  "awqa-rtn": _awq_inputs, "awqa-qa-gptaq": _awq_inputs, "awqa-qa-gptaq-mse": _awq_inputs}
BLOCK_ROTATED = {"bh-rtn", "bh-gptq", "bh-qa-gptaq"}
# methods whose AWQ search quantizes the inputs too: the settings with float inputs only
INPUT_AWARE = {"awqa-rtn", "awqa-qa-gptaq", "awqa-qa-gptaq-mse"}
OUR_METHODS = tuple(OUR_PASSES)
PEER_METHODS = ("llmc-rtn", "llmc-gptq", "llmc-awq")
# peers in venvs of their own, each with its runner: peer → (runner module, default python, the command making it)
PEER_VENVS = {
    "autoround": ("_peer_autoround", common.AUTOROUND_PYTHON, "bash benchmarks/setup_peers.sh autoround"),
    "gptqmodel": ("_peer_gptqmodel", common.GPTQMODEL_PYTHON, "bash benchmarks/setup_peers.sh gptqmodel"),
}
# Intel's AutoRound (its default recipe and its light one) and ModelCloud's GPTQModel (its GPTQ): method → peer
VENV_METHODS = {"autoround": "autoround", "autoround-light": "autoround", "gptqmodel": "gptqmodel"}
VENV_LABELS = {"autoround": "AutoRound", "gptqmodel": "GPTQModel"}
ALL_METHODS = ("fp32",) + OUR_METHODS + PEER_METHODS + tuple(VENV_METHODS)
# the integer table's methods (make bench); the float formats add rtn-mse, gptq-mse and llmc-rtn (make bench-float)
DEFAULT_METHODS = ("fp32", "rtn", "gptq-norefit", "gptq", "gptaq", "adaround", "llmc-gptq", "llmc-awq")
# --quick without --methods / --settings: a smoke run of the harness in our venv alone (about 2 minutes on 2 cores)
QUICK_METHODS, QUICK_SETTINGS = ("fp32", "rtn", "gptq"), ("w4g64",)
FLOAT_METHODS = ("fp32", "rtn", "rtn-mse", "gptq", "gptq-mse", "llmc-rtn", "llmc-gptq")


# ---------------------------------------------------------------- child: our methods


def recipe_data(method: str, setting: common.Setting) -> dict[str, Any]:
    """The recipe (as a mapping) our ``method`` runs at ``setting``: what ``recipes/*.yaml`` ship."""
    pass_name, extra = OUR_PASSES[method]
    extra = dict(extra)
    base = setting.scheme()  # what a leading pass searches for: the weight pass's own observer stays its own
    scheme = {**base, **extra.pop("scheme", {})}
    lead = LEADING_PASSES.get(method)
    # mixed widths: allocate_bits plans each fused unit's grid on the model as the leading passes leave it
    allocate = [{"allocate_bits": {"target_bpw": setting.bpw}}] if setting.bpw is not None else []
    act_pass = setting.activation_pass()
    act = [] if act_pass is None else [act_pass]
    weight = [{pass_name: {"scheme": scheme, **extra}}]
    middle = [*act, *weight] if method in ACT_FIRST else [*weight, *act]
    return {"passes": [*(lead(base, setting) if lead else []), *allocate, *middle]}


def _unavailable_reason(method: str) -> str | None:
    """Why our pass cannot run yet (not registered, or compress() takes no calibration), else None."""
    import compressor
    from compressor.recipe import registered_passes

    passes = registered_passes()
    name, extra = OUR_PASSES[method]
    if name not in passes:
        return f"pass {name!r} is not registered (registered: {sorted(passes)})"
    unknown = set(extra) - set(passes[name].config_cls.__dataclass_fields__) - {"scheme"}
    if unknown:
        return f"pass {name!r} has no setting {sorted(unknown)} in this version"
    if passes[name].requires_calibration and "calibration" not in inspect.signature(compressor.compress).parameters:
        return f"pass {name!r} needs calibration data, but compressor.compress() takes no `calibration` argument yet"
    return None


def run_ours(job: dict) -> dict:
    """fp32 baseline or one of our passes, in this (child) process."""
    import torch

    method = job["method"]
    setting = None if method == "fp32" else common.setting_of(job)
    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    record = common.base_record(method, setting)
    record["machine"] = common.machine_info()
    record["versions"] = common.versions("torch", "transformers", "compressor")
    if method != "fp32":
        reason = _unavailable_reason(method)
        if reason:
            log.warning("%s: %s", method, reason)
            record.update(status="unavailable", error=reason)
            return record

    import compressor

    path, tokenizer = common.load_tokenizer_and_path()
    ids = common.eval_ids(tokenizer, job.get("split", "test"))
    model = common.load_fp32_model(path)
    if setting is not None:
        from compressor.recipe import apply_overrides

        data = recipe_data(method, setting)
        present = {next(iter(p)) for p in data["passes"]}
        sets = [o for o in job.get("set", []) if o.split("=", 1)[0].split(".")[0] in present]
        if sets:
            record["overrides"] = sets
        recipe = compressor.Recipe.from_dict(apply_overrides(data, sets))
        kwargs = {}
        # GPTQ, AWQ, NVFP4 / static-FP8 inputs: any pass of the recipe that needs data gets the calibration set
        if any(p.requires_calibration for p in recipe.build()):
            calib = common.calibration_ids(tokenizer, job["n_calib"], job["calib_len"])
            record["calibration"] = calib.to_dict()
            kwargs["calibration"] = calib.input_ids
        try:
            start = time.perf_counter()
            if method in PIPELINES:
                from compressor.pipeline.sequential import PipelineConfig

                kwargs["pipeline"] = PipelineConfig(quiet=True, **PIPELINES[method])
                record["pipeline"] = PIPELINES[method]
            model = compressor.compress(model, recipe, quiet=True, **kwargs)
            record["compress_s"] = round(time.perf_counter() - start, 2)
            if setting.bpw is not None:
                record.update(common.mixed_summary(model))
        except TypeError as err:
            if "calibration" not in str(err):
                raise
            record.update(status="unavailable", error=common.error_text(err))
            return record
        except Exception as err:  # recorded as a finding (with traceback in the log), not hidden
            log.error("%s %s failed:\n%s", method, setting.name, traceback.format_exc())
            record.update(status="failed", error=common.error_text(err))
            return record
    record.update(common.perplexity(model, ids, job["max_tokens"]))
    record["status"] = "ok"
    return record


# ---------------------------------------------------------------- parent


def _not_run_reason(method: str, setting: common.Setting | None) -> str | None:
    """Why ``method`` is not run at ``setting`` (None when it is): a peer without that setting, or one of our
    methods made for quantized inputs (:data:`ACT_FIRST`) at a weight-only setting."""
    if setting is None:
        return None
    if method in BLOCK_ROTATED and (setting.fmt == "int" or setting.group_size < 2):
        return (f"{method} rotates the inputs in blocks of the format's group: it runs the grouped float formats "
                f"(nvfp4, mxfp4 and their W4A4 settings), not {setting.name}")
    if method in INPUT_AWARE and not (setting.act and setting.fmt != "int"):
        return (f"{method} searches AWQ's scales with the inputs in their float format: it runs the settings with "
                f"float inputs ({', '.join(common.ACT_SETTINGS)}), not {setting.name}")
    if method in ACT_FIRST and not setting.act:
        return (f"{method} quantizes the linear inputs before its weight pass: it runs the settings with quantized "
                f"inputs ({', '.join(common.ACT_SETTINGS)}), not {setting.name}")
    if method in PEER_METHODS and setting.bpw is not None:
        return "llm-compressor chooses no per-layer widths under a bits-per-weight budget"
    peer = VENV_METHODS.get(method)
    if peer and setting.bpw is not None:
        return f"{VENV_LABELS[peer]} is not run under a bits-per-weight budget here (no mixed-precision search wired in)"
    if peer and setting.fmt != "int":
        return f"{VENV_LABELS[peer]} runs the integer settings only here, not {setting.name}"
    return None


def run_job(job: dict, peer_python: Path, verbose: bool, pythons: dict[str, Path] | None = None) -> dict:
    """Run one job in a fresh subprocess; its peak RSS comes from ``wait4``. ``peer_python`` runs llm-compressor,
    ``pythons`` (peer → python) overrides the :data:`PEER_VENVS` defaults."""
    method = job["method"]
    setting = None if method == "fp32" else common.setting_of(job)
    unavailable = _not_run_reason(method, setting)
    if unavailable:
        return {**common.base_record(method, setting), "machine": common.machine_info(), "status": "unavailable",
                "error": unavailable}
    if method in PEER_METHODS:
        missing = common.missing_peer(peer_python)
        if missing:
            return {**common.base_record(method, setting), "machine": common.machine_info(), **missing}
        command = common.module_command(PEER_MODULE, peer_python)
    elif method in VENV_METHODS:
        module, python, setup = PEER_VENVS[VENV_METHODS[method]]
        python = (pythons or {}).get(VENV_METHODS[method], python)
        missing = common.missing_peer(python, setup)
        if missing:
            return {**common.base_record(method, setting), "machine": common.machine_info(), **missing}
        command = common.module_command(module, python)
    else:
        command = [*common.module_command("quant_quality"), "--child"]
    log.info("running %s %s", method, setting.name if setting else "")
    run = common.run_child(command, job, verbose=verbose)
    return common.child_record(run, common.base_record(method, setting))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="W-only quantization quality on SmolLM2-135M: ours vs llm-compressor, one JSON line per result.",
        epilog="Cost on 2 cores: rtn ~1-2 min/setting, llm-compressor GPTQ ~10 min/setting, "
        "llm-compressor AWQ ~80 min/setting. See benchmarks/README.md.",
    )
    parser.add_argument("--methods",
                        help=f"comma list of {', '.join(ALL_METHODS)} (default: {','.join(DEFAULT_METHODS)}; with "
                        f"--quick {','.join(QUICK_METHODS)}; for the float formats: {','.join(FLOAT_METHODS)})")
    parser.add_argument("--settings",
                        help="comma list of w<bits>g<group> / w<bits>pc, all asymmetric, or float weight formats "
                        f"{', '.join(common.FLOAT_SETTINGS)} (default: {','.join(common.DEFAULT_SETTINGS)}; with "
                        f"--quick {','.join(QUICK_SETTINGS)})")
    common.add_protocol_args(parser, "smoke test: 8 calibration windows x 128 tokens, 2048 evaluation tokens")
    common.add_output_arg(parser, "quant_quality")
    parser.add_argument("--peer-python", type=Path, default=DEFAULT_PEER_PYTHON,
                        help="python of the llm-compressor peer venv (default: %(default)s)")
    for peer, (_, python, setup) in PEER_VENVS.items():
        parser.add_argument(f"--{peer}-python", type=Path, default=python,
                            help=f"python of the {VENV_LABELS[peer]} peer venv, made by `{setup}` (default: %(default)s)")
    parser.add_argument("--set", action="append", default=[], metavar="PASS.KEY=VALUE",
                        help="recipe override for our pass of that name, e.g. gptq.scheme.observer=mse, or "
                        "autoround.iters=N for a smoke run of AutoRound (repeatable; recorded in the protocol)")
    parser.add_argument("--verbose", action="store_true", help="debug logging")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--job", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    return parser


def default_selection(args: argparse.Namespace) -> None:
    """Fill ``--methods`` / ``--settings`` left out: the full table, or with ``--quick`` a smoke run that
    needs no peer venv (:data:`QUICK_METHODS` at :data:`QUICK_SETTINGS`)."""
    if args.methods is None:
        args.methods = ",".join(QUICK_METHODS if args.quick else DEFAULT_METHODS)
    if args.settings is None:
        args.settings = ",".join(QUICK_SETTINGS if args.quick else common.DEFAULT_SETTINGS)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.output = common.output_path(args, "quant_quality")
    common.setup_logging(args.verbose)
    if common.run_child_job(args, run_ours):
        return

    default_selection(args)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in ALL_METHODS]
    if unknown or not methods:
        parser.error(f"unknown method(s) {unknown}: use a comma list of {', '.join(ALL_METHODS)}")
    try:
        settings = common.parse_settings(args.settings)
    except ValueError as err:
        parser.error(str(err))
    if not settings and any(m != "fp32" for m in methods):
        parser.error("--settings is empty")
    protocol = {**common.protocol_from_args(parser, args), "set": args.set}

    jobs = []
    for method in methods:
        if method == "fp32":
            jobs.append({"method": method, "bits": None, "group_size": None, **protocol})
        else:
            jobs += [{"method": method, **s.job(), **protocol} for s in settings]
    log.info("%d runs: %s", len(jobs), ", ".join(f"{j['method']}:{j['bits']}/{j['group_size']}" for j in jobs))
    done = []
    for job in jobs:
        record = run_job(job, args.peer_python, args.verbose,
                         {peer: getattr(args, f"{peer}_python") for peer in PEER_VENVS})
        record["protocol"] = {"quick": args.quick, **protocol}
        common.emit(record, args.output)
        done.append(record)
    from benchmarks.report import float_formats, quant_quality

    table = float_formats(done) if all(s.fmt != "int" for s in settings) else quant_quality(done, source=None)
    log.info("this run (appended to %s):\n%s", args.output, table)


if __name__ == "__main__":
    main()

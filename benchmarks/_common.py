"""Shared pieces of the benchmark scripts: settings, protocol data, records, machine info.

Imported by ``benchmarks.quant_quality`` (dev venv) and by ``benchmarks._peer_llmcompressor``
(the peer venv ``.venv-bench``), so both sides use the same calibration windows,
the same evaluation tokens and the same record layout. Only the standard library
and torch are imported at module level; ``compressor`` is imported lazily.

``benchmarks`` is a package: every script runs from the repository root as
``python -m benchmarks.<name>`` (children too, see :func:`module_command`), so no
folder of ours is put on ``sys.path`` where its file names could shadow an
installed package (``benchmarks/kernels.py`` once hid Hugging Face's ``kernels``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("benchmarks")

ROOT = Path(__file__).resolve().parent.parent  # the repository root: children run from here
PEER_PYTHON = ROOT / ".venv-bench" / "bin" / "python"  # made by benchmarks/setup_peers.sh
AUTOROUND_PYTHON = ROOT / ".venv-autoround" / "bin" / "python"  # made by benchmarks/setup_peers.sh autoround
GPTQMODEL_PYTHON = ROOT / ".venv-gptqmodel" / "bin" / "python"  # made by benchmarks/setup_peers.sh gptqmodel
RESULTS = ROOT / "benchmarks" / "results"  # committed records: one <bench>.jsonl per benchmark
SMOKE_RESULTS = ROOT / "out" / "bench"  # --quick runs: smoke tests, never committed

BENCH = "quant_quality"
MODEL_NAME = "SmolLM2-135M-Instruct"
CALIB_SOURCE = "sotu:1790-1999"
EVAL_SOURCE = "sotu:2010-2021"  # the test split: scored once per reported setting, never used to choose anything
DEV_SOURCE = "sotu:2000-2009"  # the dev split: every hyper-parameter choice is made here
SPLITS = {"test": EVAL_SOURCE, "dev": DEV_SOURCE}
CALIB_SEED = 0
CTX = 512

# Full protocol (DESIGN.md, "Measured starting points") and the --quick smoke test.
FULL = {"n_calib": 128, "calib_len": 512, "max_tokens": 32768}
QUICK = {"n_calib": 8, "calib_len": 128, "max_tokens": 2048}

DEFAULT_SETTINGS = ("w4g64", "w4g128", "w4pc", "w3g64", "w3g128", "w2g64")
# weight method → (our pass, its options beyond the scheme), shared by quant_quality.py and transforms.py
WEIGHT_PASSES = {
    "rtn": ("rtn", {}),
    "gptq": ("gptq", {}),
    "gptaq": ("gptq", {"asymmetric": True}),  # GPTQ with asymmetric calibration (GPTAQ, arXiv 2504.02692)
}
_SETTING_RE = re.compile(r"^w([2-8])(?:g(\d+)|pc)$")
_MIXED_RE = re.compile(r"^mixed-?(\d+(?:\.\d+)?)(?:bpw)?$")  # mixed integer widths at a bits-per-weight budget
# float weight formats: name -> (bits, group size, our scale_format); weights symmetric, inputs in 16 bits
FLOAT_SETTINGS = {"fp8": (8, -1, "float"), "nvfp4": (4, 16, "e4m3"), "mxfp4": (4, 32, "e8m0")}
# SmolLM2-135M's targeted linears per decoder block (out, in) and its depth: q, k, v, o, gate, up, down
SMOLLM2_LINEARS = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)]
SMOLLM2_BLOCKS = 30
# weights and linear inputs in a float format: setting name -> the format (inputs dynamic per token / group;
# NVFP4's input global scale calibrated), as compressed-tensors' FP8_DYNAMIC, NVFP4 and MXFP4 presets
ACT_SETTINGS = {"w8a8-fp8": "fp8", "w4a4-nvfp4": "nvfp4", "w4a4-mxfp4": "mxfp4"}


@dataclass(frozen=True)
class Setting:
    """A weight-quantization setting: ``bits`` and ``group_size`` (-1 = per output channel), asymmetric integers;
    or, with ``fmt`` one of :data:`FLOAT_SETTINGS`, a float format (FP8 per channel, NVFP4, MXFP4); or, with
    ``bpw``, mixed integer widths under that bits-per-weight budget (our ``allocate_bits`` pass; ``bits`` and
    ``group_size`` are then only the base scheme the allocation replaces)."""

    bits: int
    group_size: int
    fmt: str = "int"
    act: bool = False  # the linear inputs too, in ``fmt`` (float formats only)
    bpw: float | None = None

    @property
    def name(self) -> str:
        if self.bpw is not None:
            return f"mixed-{self.bpw:g}bpw"
        if self.act:
            return next(n for n, f in ACT_SETTINGS.items() if f == self.fmt)
        if self.fmt != "int":
            return self.fmt
        return f"w{self.bits}" + ("pc" if self.group_size == -1 else f"g{self.group_size}")

    def scheme(self) -> dict[str, Any]:
        """Our recipe's ``scheme`` mapping."""
        if self.fmt != "int":
            return {"type": "float", "bits": self.bits, "group_size": self.group_size, "symmetric": True,
                    "scale_format": FLOAT_SETTINGS[self.fmt][2]}
        return {"bits": self.bits, "group_size": self.group_size, "symmetric": False}

    def job(self) -> dict[str, Any]:
        """The fields a child process rebuilds the setting from (:func:`setting_of`)."""
        return {"bits": self.bits, "group_size": self.group_size, "fmt": self.fmt, "act": self.act, "bpw": self.bpw}

    def activation_pass(self) -> dict[str, Any] | None:
        """Our recipe's ``quantize_activations`` pass for the inputs, or None (weight-only)."""
        return {"quantize_activations": {"format": self.fmt, "bits": self.bits}} if self.act else None


def smollm2_bits_per_weight(bits: int, group_size: int) -> float:
    """Bits per weight of SmolLM2's targeted linears at one uniform asymmetric integer grid, 16-bit scales and
    code-width zero points counted (:meth:`compressor.core.scheme.QuantScheme.bits_per_weight`)."""
    from compressor.core.scheme import QuantScheme

    scheme = QuantScheme(bits=bits, group_size=group_size)
    total = sum(n * k for n, k in SMOLLM2_LINEARS)
    return sum(scheme.bits_per_weight(k) * n * k for n, k in SMOLLM2_LINEARS) / total


def mixed_summary(model) -> dict[str, Any]:
    """``{"achieved_bpw", "allocation"}`` of a model whose linears carry their quantization schemes: the
    weight-weighted bits per weight (as :func:`smollm2_bits_per_weight` counts them) and how many linears took
    each grid (``w3g64``...)."""
    from torch import nn

    bits, weights, counts = 0.0, 0, {}
    for module in model.modules():
        scheme = getattr(module, "quant_scheme", None)
        if isinstance(module, nn.Linear) and scheme is not None:
            bits += scheme.bits_per_weight(module.in_features) * module.weight.numel()
            weights += module.weight.numel()
            name = f"w{scheme.bits}" + ("pc" if scheme.group_size == -1 else f"g{scheme.group_size}")
            counts[name] = counts.get(name, 0) + 1
    return {"achieved_bpw": round(bits / weights, 4) if weights else None, "allocation": dict(sorted(counts.items()))}


def setting_of(job: dict[str, Any]) -> Setting | None:
    """The setting of a child's job (None for the fp32 baseline)."""
    if job.get("bits") is None:
        return None
    return Setting(job["bits"], job["group_size"], job.get("fmt", "int"), bool(job.get("act", False)), job.get("bpw"))


def parse_setting(text: str, *, allow_lossless: bool = False) -> Setting:
    """``w4g64`` → Setting(4, 64); ``w4pc`` → Setting(4, -1); ``nvfp4`` → Setting(4, 16, "nvfp4");
    ``mixed-3.5bpw`` (or ``mixed3.5``) → mixed widths at 3.5 bits per weight.

    Raises:
        ValueError: an unknown form, or W4 g32 (SmolLM2's weights already lie on
            that grid, so every method is lossless there) unless ``allow_lossless``.
    """
    if text.strip().lower() in FLOAT_SETTINGS:
        fmt = text.strip().lower()
        return Setting(*FLOAT_SETTINGS[fmt][:2], fmt=fmt)
    if text.strip().lower() in ACT_SETTINGS:
        fmt = ACT_SETTINGS[text.strip().lower()]
        return Setting(*FLOAT_SETTINGS[fmt][:2], fmt=fmt, act=True)
    mixed = _MIXED_RE.match(text.strip().lower())
    if mixed:
        return Setting(4, 64, bpw=float(mixed.group(1)))
    match = _SETTING_RE.match(text.strip().lower())
    if not match:
        raise ValueError(f"unknown setting {text!r}: use w<bits>g<group> or w<bits>pc, e.g. w4g64, w3g128, w4pc, "
                         f"mixed-<bits per weight>bpw (e.g. mixed-3.5bpw), or a float format ({', '.join(FLOAT_SETTINGS)}; "
                         f"with inputs: {', '.join(ACT_SETTINGS)})")
    bits, group = int(match.group(1)), match.group(2)
    setting = Setting(bits, -1 if group is None else int(group))
    if setting.group_size == 0:
        raise ValueError(f"{text!r}: group size 0 is invalid; use e.g. g64 or pc (per channel)")
    if setting == Setting(4, 32) and not allow_lossless:
        raise ValueError(
            "w4g32 is not a benchmark point: SmolLM2-135M's weights came from GGUF Q4_1 and already lie "
            "on the W4 g32 asymmetric grid, so every method is lossless there; use w4g64 or w4g128"
        )
    return setting


def parse_settings(text: str) -> list[Setting]:
    return [parse_setting(part) for part in text.split(",") if part.strip()]


# ---------------------------------------------------------------- protocol data


def load_tokenizer_and_path():
    """The fp32 SmolLM2 fixture directory and its tokenizer."""
    from transformers import AutoTokenizer

    from compressor.fixtures import smollm2_dir

    path = smollm2_dir()
    return path, AutoTokenizer.from_pretrained(path)


def load_fp32_model(path):
    """SmolLM2 in fp32 on CPU, in eval mode (plain transformers: same in both venvs)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model


def calibration_ids(tokenizer, n: int, seq_len: int):
    """Our calibration set: ``n`` windows of ``seq_len`` tokens from SOTU 1790-1999, seed 0."""
    from compressor.calibration import calibration_set

    return calibration_set(CALIB_SOURCE, tokenizer, n=n, seq_len=seq_len, seed=CALIB_SEED)


def eval_ids(tokenizer, split: str = "test"):
    """The evaluation token stream, tokenized once: SOTU 2010-2021 (``"test"``) or 2000-2009 (``"dev"``)."""
    from compressor.calibration import load_text, tokenize

    if split not in SPLITS:
        raise ValueError(f"split={split!r}: use 'test' (SOTU 2010-2021) or 'dev' (SOTU 2000-2009)")
    return tokenize(load_text(SPLITS[split]), tokenizer)


def perplexity(model, ids, max_tokens: int) -> dict[str, Any]:
    """Our perplexity protocol: consecutive windows of 512 over the first ``max_tokens`` tokens."""
    from compressor.eval.perplexity import perplexity as ppl_fn

    result = ppl_fn(model, ids, ctx=CTX, max_tokens=max_tokens, quiet=True)
    return {"ppl": round(result.ppl, 4), "eval_tokens": result.tokens, "eval_windows": result.windows}


# ---------------------------------------------------------------- records


def machine_info() -> dict[str, Any]:
    """CPU model, the vector instructions torch uses on it, logical cores, torch version and intra-op threads.

    ``isa`` matters: the same "AMD EPYC" machine type came with AVX-512 on some days and AVX2 only on
    others, and CPU bfloat16 matmuls ran 7.5x slower than float32 ones on the AVX2 one.
    """
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass  # not Linux: keep platform.processor()
    return {
        "cpu": cpu,
        "isa": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def versions(*packages: str) -> dict[str, str | None]:
    """Installed distribution versions (None when absent)."""
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in packages:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    On Linux, ``VmHWM`` of ``/proc/self/status``: the high-water mark of this process's own address space.
    ``ru_maxrss`` (the fallback elsewhere) is not: a process started by fork + exec inherits the RSS its parent
    had at the fork as a floor (the kernel carries the pre-exec address space's high-water mark over), so a
    benchmark child started by a driver that had just built a 0.8 GB checkpoint reported at least the driver's
    2.4 GB whatever it used itself.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    scale = 1 if sys.platform == "darwin" else 1024
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20, 1)


def base_record(method: str, setting: Setting | None) -> dict[str, Any]:
    """The fields every result line has; measurement fields start empty."""
    return {
        "bench": BENCH,
        "model": MODEL_NAME,
        "method": method,
        "setting": setting.name if setting else "fp32",
        "bits": setting.bits if setting else None,
        "group_size": setting.group_size if setting else None,
        "symmetric": (setting.fmt != "int") if setting else None,
        **({"format": setting.fmt} if setting and setting.fmt != "int" else {}),
        **({"activations": setting.fmt} if setting and setting.act else {}),
        **({"target_bpw": setting.bpw} if setting and setting.bpw is not None else {}),
        "ppl": None,
        "compress_s": None,
        "peak_rss_mb": None,
        "status": None,
    }


# ---------------------------------------------------------------- peers' exports

CHECKED = ("model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj")  # one narrow, one wide input


def checked_weights(model, *, copy: bool = False) -> dict[str, Any]:
    """The (out, in) weights of the :data:`CHECKED` linears of a SmolLM2 model (detached copies with ``copy``)."""
    modules = dict(model.named_modules())
    return {name: modules[name].weight.detach().clone() if copy else modules[name].weight for name in CHECKED}


def grid_check(original: dict[str, Any], quantized, setting: Setting) -> dict[str, Any]:
    """Proof that a peer's model is quantized: the most distinct values in one weight group of the checked linears
    (at most ``2 ** bits`` on the setting's integer grid) and the share of their weights that changed from
    ``original`` (:func:`checked_weights` of the fp32 model, copied before the peer ran)."""
    import torch

    levels, changed, total = 0, 0, 0
    for name, w in checked_weights(quantized).items():
        w = w.detach()
        size = w.shape[1] if setting.group_size == -1 else setting.group_size
        for row in w[:64]:  # 64 rows are enough to see a grid, and keep this quick
            for group in torch.split(row, size):
                levels = max(levels, int(torch.unique(group).numel()))
        changed += int((w != original[name]).sum())
        total += w.numel()
    return {"layers": list(CHECKED), "max_levels": levels, "changed": round(changed / total, 4)}


def on_grid(check: dict[str, Any], setting: Setting) -> bool:
    """Whether a :func:`grid_check` shows the setting's grid (at most 2^bits values per group, most weights moved)."""
    return check["max_levels"] <= 2 ** setting.bits and check["changed"] >= 0.5


def peer_record(job: dict[str, Any], *packages: str, **fields: Any) -> tuple[Setting | None, dict[str, Any]]:
    """Start of a peer runner's record: the job's setting and :func:`base_record` with the machine, the versions of
    ``packages`` and ``fields``; sets torch's thread count when the job names one."""
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    setting = setting_of(job)
    record = base_record(job["method"], setting)
    record.update(fields, machine=machine_info(), versions=versions(*packages))
    return setting, record


def write_result(record: dict[str, Any], path: str | os.PathLike) -> None:
    """A child's result: one JSON object written to the file its parent named."""
    Path(path).write_text(json.dumps(record) + "\n", encoding="utf-8")


def git_state() -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool}`` of the repository the benchmarks run from.

    ``dirty`` says whether tracked files other than the records themselves differ from the commit.
    """
    def git(*argv: str) -> str | None:
        try:
            run = subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return run.stdout.strip() if run.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def stamp(record: dict[str, Any]) -> dict[str, Any]:
    """Add what every committed record carries, where the record lacks it: commit, date, machine, load.

    ``loadavg`` (1, 5, 15 minutes, when the record is written) tells whether the machine was shared:
    a 2-thread run on an idle 2-core machine stays near 2.
    """
    record.update({k: v for k, v in git_state().items() if k not in record})
    record.setdefault("date", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    record.setdefault("machine", machine_info())
    record.setdefault("loadavg", [round(x, 2) for x in os.getloadavg()])
    return record


def add_output_arg(parser: argparse.ArgumentParser, bench: str) -> None:
    """``--output``: where the JSON lines are appended (default: the committed records, see :func:`output_path`)."""
    parser.add_argument("--output", type=Path, default=None,
                        help=f"append the JSON lines to this file (default: benchmarks/results/{bench}.jsonl, "
                        f"the committed records; with --quick: out/bench/{bench}-quick.jsonl)")


def output_path(args, bench: str) -> Path:
    """``--output``, else ``benchmarks/results/<bench>.jsonl`` (full runs) or ``out/bench/<bench>-quick.jsonl``."""
    if args.output is not None:
        return Path(args.output)
    return SMOKE_RESULTS / f"{bench}-quick.jsonl" if getattr(args, "quick", False) else RESULTS / f"{bench}.jsonl"


def emit(record: dict[str, Any], output: str | os.PathLike | None = None) -> None:
    """Stamp the record (:func:`stamp`), print it as one JSON line on stdout (flushed) and append it to ``output``."""
    line = json.dumps(stamp(record))
    print(line, flush=True)
    if output is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        with open(output, "a", encoding="utf-8") as fh:
            fh.write(line + "\n")


def run_child_job(args, run: Callable[[dict[str, Any]], dict[str, Any]]) -> bool:
    """In a ``--child`` process: run the job, add its peak RSS, write the result. True when it did.

    A job with ``stop_after_s`` is stopped that many seconds in: the child writes ``{"status": "stopped",
    "stopped_after_s": ..., "self_peak_rss_mb": ...}`` (its peak so far: a lower bound on the whole run's) and
    exits at once, for runs too long to finish whose memory is still worth measuring.
    """
    if not args.child:
        return False
    job = json.loads(args.job)
    timer = None
    if job.get("stop_after_s"):
        import threading

        def stop():
            write_result({"status": "stopped", "stopped_after_s": job["stop_after_s"],
                          "self_peak_rss_mb": peak_rss_mb()}, args.result)
            os._exit(0)

        timer = threading.Timer(float(job["stop_after_s"]), stop)
        timer.daemon = True
        timer.start()
    record = run(job)
    if timer is not None:
        timer.cancel()
    record["self_peak_rss_mb"] = peak_rss_mb()
    write_result(record, args.result)
    return True


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def error_text(err: BaseException, limit: int = 2000) -> str:
    """``Type: message``, cut to ``limit`` characters (keeps the start, where the cause is)."""
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= limit else text[:limit] + " ...[cut]"


# ---------------------------------------------------------------- subprocess runs


@dataclass(frozen=True)
class ChildRun:
    """What a finished child left: its record (None if it wrote none), exit code, peak RSS, wall time."""

    record: dict[str, Any] | None
    returncode: int
    peak_rss_mb: float
    wall_s: float

    def failure(self) -> str:
        why = f"killed by signal {-self.returncode}" if self.returncode < 0 else f"exit status {self.returncode}"
        return f"the child process ended without a result ({why}); see its log on stderr"


def module_command(module: str, python: str | os.PathLike = sys.executable) -> list[str]:
    """``[python, "-m", "benchmarks.<module>"]``: how a benchmark starts a child (run from :data:`ROOT`)."""
    return [str(python), "-m", f"benchmarks.{module}"]


def run_child(command: list[str], job: dict[str, Any], *, verbose: bool = False, cwd: str | os.PathLike = ROOT) -> ChildRun:
    """Run ``command --job JSON --result FILE`` from ``cwd`` (the repository root) and collect its record and peak RSS.

    The child's stdout is sent to our stderr, so our stdout carries only result
    lines. Peak RSS is the child's own high-water mark (``self_peak_rss_mb`` of its record, taken by
    :func:`peak_rss_mb` as it finishes); ``wait4``'s ``ru_maxrss`` stands in only when the child wrote no
    record, since it includes the RSS this process had when it started the child (see :func:`peak_rss_mb`).
    """
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        result = Path(tmp) / "result.json"
        full = [*command, "--job", json.dumps(job), "--result", str(result)] + (["--verbose"] if verbose else [])
        start = time.perf_counter()
        child = subprocess.Popen(full, stdout=sys.stderr, cwd=cwd)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = round(time.perf_counter() - start, 2)
        record = json.loads(result.read_text(encoding="utf-8")) if result.is_file() else None
    peak = (record or {}).get("self_peak_rss_mb") or round(usage.ru_maxrss / 1024, 1)
    return ChildRun(record, child.returncode, peak, wall)


def add_protocol_args(parser: argparse.ArgumentParser, quick_help: str) -> None:
    """The protocol options every SmolLM2 benchmark takes: --quick, --n-calib, --calib-len, --max-tokens, --threads."""
    parser.add_argument("--quick", action="store_true", help=quick_help)
    parser.add_argument("--n-calib", type=int, help="calibration windows (default 128; 8 with --quick)")
    parser.add_argument("--calib-len", type=int, help="tokens per calibration window (default 512; 128 with --quick)")
    parser.add_argument("--max-tokens", type=int, help="evaluation tokens (default 32768; 2048 with --quick)")
    parser.add_argument("--threads", type=int, help="torch threads in each run (default: torch's own choice)")
    parser.add_argument("--split", choices=tuple(SPLITS), default="test",
                        help="evaluation text: test = SOTU 2010-2021 (reported numbers), dev = SOTU 2000-2009 "
                        "(for choosing hyper-parameters; default: %(default)s)")


def add_set_arg(parser: argparse.ArgumentParser) -> None:
    """``--set PASS.KEY=VALUE`` (repeatable): a recipe override for our pass of that name, recorded in the protocol
    (the report never shows such runs: they are for choosing settings on the dev split)."""
    parser.add_argument("--set", action="append", default=[], metavar="PASS.KEY=VALUE",
                        help="recipe override for our pass of that name, e.g. ostquant.lr_clip=0.01 (repeatable; "
                        "recorded in the protocol)")


def with_overrides(recipe: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``recipe`` with the ``--set`` overrides whose pass it contains applied (a copy)."""
    from compressor.recipe import apply_overrides

    present = {next(iter(p)) for p in recipe.get("passes", [])}
    return apply_overrides(recipe, [o for o in overrides if o.split("=", 1)[0].split(".")[0] in present])


def protocol_from_args(parser: argparse.ArgumentParser, args) -> dict[str, Any]:
    """``{n_calib, calib_len, max_tokens, threads, split}`` from :func:`add_protocol_args`'s options; exits on bad values."""
    for name in ("n_calib", "calib_len", "max_tokens", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
    base = QUICK if args.quick else FULL
    protocol = {key: getattr(args, key) or base[key] for key in ("n_calib", "calib_len", "max_tokens")}
    if protocol["max_tokens"] < CTX:
        parser.error(f"--max-tokens must be at least one window of {CTX} tokens")
    return {**protocol, "threads": args.threads, "split": args.split}


def missing_peer(peer_python: str | os.PathLike, setup: str = "bash benchmarks/setup_peers.sh") -> dict[str, Any] | None:
    """``{"status": "unavailable", "error": ...}`` when the peer venv's python does not exist, else None;
    ``setup`` is the command that makes that venv."""
    if Path(peer_python).is_file():
        return None
    return {"status": "unavailable", "error": f"peer venv python {peer_python} not found: run `{setup}` first"}


def child_record(run: ChildRun, fallback: dict[str, Any]) -> dict[str, Any]:
    """The child's result record, or ``fallback`` marked failed with why; the child's peak RSS and wall time added."""
    record = run.record
    if record is None:
        record = {**fallback, "machine": machine_info(), "status": "failed", "error": run.failure()}
    record["peak_rss_mb"] = run.peak_rss_mb  # the whole child process
    record["wall_s"] = run.wall_s
    return record


def peer_main(run: Callable[[dict[str, Any]], dict[str, Any]], description: str, job_help: str,
              argv: list[str] | None = None) -> None:
    """Entry point of a peer script run in the peer venv: ``--job JSON --result FILE``; the record gets its own peak RSS."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--job", required=True, help=f"JSON: {job_help}")
    parser.add_argument("--result", required=True, help="file to write the JSON result record to")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    record = run(json.loads(args.job))
    record["self_peak_rss_mb"] = peak_rss_mb()
    write_result(record, args.result)


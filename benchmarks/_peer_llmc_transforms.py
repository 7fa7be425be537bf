"""One llm-compressor transform run (SpinQuantModifier or QuIPModifier, then RTN or GPTQ) on SmolLM2, in the peer venv.

Run by ``transforms.py`` as ``.venv-bench/bin/python _peer_llmc_transforms.py
--job JSON --result FILE``; never imported by the dev venv. Like
``_peer_llmcompressor.py`` it takes the fixture path, the calibration windows
and the perplexity from ``_common`` (our package is installed in the peer venv
by ``setup_peers.sh``), so both sides share one protocol. The recipe is
``transforms.peer_modifiers(job)``: a transform modifier, then
``QuantizationModifier`` (rtn) or ``GPTQModifier`` (gptq) with our grids.

Pipeline: ``datafree`` when nothing needs data (rtn without a KV-cache scheme),
else ``sequential`` on our calibration windows (a ``kv_cache_scheme`` makes
llm-compressor ask for data even when, as here, it is dynamic). The model
``oneshot`` returns is scored in fake-quant mode (compressed-tensors status
``frozen``: every forward quantizes the weights, the linear inputs and the keys
and values on the fly).

Before scoring, :func:`probe` checks on the first evaluation window that what
the setting asks for is in that forward: effective weights on a 2^bits grid
per row, logits that move when the linear-input scheme is taken away, and
keys/values that the KV-cache module changes onto a 2^bits grid per head and
token. A check that fails turns the line into ``status: failed`` with the
measured perplexity kept as ``ppl_as_measured``, never a plain ``ppl``.
"""

from __future__ import annotations

import contextlib
import logging
import time
import traceback
from typing import Any

from benchmarks import _common as common
from benchmarks._peer_llmcompressor import _calibration_dataset
from benchmarks.transforms import SETTINGS, WEIGHTS, base_record, peer_modifiers

log = logging.getLogger("benchmarks.peer_transforms")


def build_recipe(specs: list[dict[str, Any]]) -> list:
    """The modifier objects of ``peer_modifiers`` specs (pydantic validates the nested dicts)."""
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform import QuIPModifier, SpinQuantModifier

    classes = {c.__name__: c for c in (SpinQuantModifier, QuIPModifier, QuantizationModifier, GPTQModifier)}
    return [classes[spec["modifier"]](**spec["args"]) for spec in specs]


def needs_data(job: dict[str, Any]) -> bool:
    """GPTQ needs Hessians; llm-compressor also asks for data whenever a KV-cache scheme is set."""
    acts = SETTINGS[job["setting"]]
    return job["method"] == "gptq" or (acts is not None and acts["kv_bits"] is not None)


def compress(model, tokenizer, job: dict[str, Any], calibration=None) -> tuple[Any, dict[str, Any]]:
    """Run ``oneshot`` with the job's modifiers; ``calibration`` (n, L) int64 when :func:`needs_data`."""
    from compressed_tensors.utils import get_head_dim
    from llmcompressor import oneshot

    specs = peer_modifiers(job, head_dim=get_head_dim(model.config))
    info: dict[str, Any] = {"modifiers": specs}
    kwargs: dict[str, Any] = {"pipeline": "datafree", "tokenizer": tokenizer}
    if needs_data(job):
        if calibration is None:
            raise ValueError(f"{job['method']}/{job['setting']} needs calibration windows")
        n, length = calibration.shape
        kwargs.update(pipeline="sequential", dataset=_calibration_dataset(calibration), num_calibration_samples=n,
                      max_seq_length=length, shuffle_calibration_samples=False, batch_size=1)
    info["pipeline"] = kwargs["pipeline"]
    start = time.perf_counter()
    model = oneshot(model=model, recipe=build_recipe(specs), **kwargs)
    info["compress_s"] = round(time.perf_counter() - start, 2)
    return model.float().eval(), info


# ---------------------------------------------------------------- is the quantization in the scored forward?


def _levels(x) -> int:
    """Largest number of distinct values in one row (last axis) of ``x``."""
    rows = x.detach().reshape(-1, x.shape[-1]).float().sort(dim=-1).values  # (R, K)
    return int(((rows.diff(dim=-1) != 0).sum(-1) + 1).max())


@contextlib.contextmanager
def _without_input_quantization(model):
    """Take ``input_activations`` off every quantized Linear's scheme (shared objects) for the block."""
    import torch

    schemes = {}
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if isinstance(module, torch.nn.Linear) and scheme is not None and scheme.input_activations is not None:
            schemes[id(scheme)] = (scheme, scheme.input_activations)
    for scheme, _ in schemes.values():
        scheme.input_activations = None
    try:
        yield len(schemes)
    finally:
        for scheme, args in schemes.values():
            scheme.input_activations = args


def probe(model, window, job: dict[str, Any]) -> dict[str, Any]:
    """What the scored forward really quantizes, measured on one window (L,) with ``use_cache=False``.

    Returns:
        ``weights`` (most distinct values in a row of any quantized Linear's
        effective weight, and whether that fits 2^bits), ``input_activations``
        (max |logit change| when the linear-input scheme is removed), ``kv_cache``
        (calls of compressed-tensors' KV-cache module in one forward, whether it
        changed the keys, most distinct values per head and token),
        ``queries_quantized`` (attention modules whose query is fake-quantized
        too, as compressed-tensors does when a hooked attention, R3, meets a
        KV-cache scheme). Unrequested parts are None.
    """
    import torch
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import forward_quantize

    acts = SETTINGS[job["setting"]]
    x = window[None]  # (1, L)

    def logits():
        with torch.no_grad():
            return model(input_ids=x, use_cache=False).logits  # (1, L, V)

    levels, linears = 0, 0
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        if not isinstance(module, torch.nn.Linear) or scheme is None or scheme.weights is None:
            continue
        weight = module.weight
        if getattr(module, "quantization_enabled", True) and module.quantization_status < QuantizationStatus.COMPRESSED:
            weight = forward_quantize(module, weight, "weight", scheme.weights)
        levels, linears = max(levels, _levels(weight)), linears + 1
    out: dict[str, Any] = {"weights": {"linears": linears, "max_levels_per_row": levels,
                                       "applied": linears > 0 and levels <= 2 ** WEIGHTS["bits"]}}

    kv = {"calls": 0, "changed": 0, "max_levels_per_head_token": 0}

    def kv_hook(module, args, kwargs, output):
        key = args[0] if args else kwargs["key_states"]  # (B, H, T, D) as it entered, after any R3 hook
        kv["calls"] += 1
        kv["changed"] += int(not torch.equal(key, output[0]))
        kv["max_levels_per_head_token"] = max(kv["max_levels_per_head_token"], _levels(output[0]), _levels(output[1]))

    caches = [m for m in model.modules() if type(m).__name__ == "QuantizedKVCache"]
    handles = [m.register_forward_hook(kv_hook, with_kwargs=True) for m in caches]
    try:
        base = logits()
    finally:
        for handle in handles:
            handle.remove()
    out["input_activations"] = None
    if acts is not None:
        with _without_input_quantization(model) as n_schemes:
            change = float((logits() - base).abs().max()) if n_schemes else 0.0
        out["input_activations"] = {"max_logit_change": change, "applied": change > 0}
    out["kv_cache"] = None
    if acts is not None and acts["kv_bits"] is not None:
        out["kv_cache"] = {**kv, "modules": len(caches),
                           "applied": kv["calls"] > 0 and kv["changed"] == kv["calls"]
                           and kv["max_levels_per_head_token"] <= 2 ** acts["kv_bits"]}
    out["queries_quantized"] = sum(1 for m in model.modules() if _quantizes_queries(m))
    return out


def _quantizes_queries(module) -> bool:
    """A hooked attention (``impl``, added for R3) fake-quantizes its queries with its scheme's input grid."""
    scheme = getattr(module, "quantization_scheme", None)
    return (hasattr(module, "impl") and scheme is not None and scheme.input_activations is not None
            and getattr(module, "quantization_enabled", True))


def _not_applied(checks: dict[str, Any]) -> list[str]:
    return [part for part in ("weights", "input_activations", "kv_cache")
            if checks[part] is not None and not checks[part]["applied"]]


# ---------------------------------------------------------------- the run


def run(job: dict[str, Any]) -> dict[str, Any]:
    """Transform + quantize with llm-compressor, check what is applied, measure perplexity; returns the record."""
    import torch

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    record = base_record(job)
    record["machine"] = common.machine_info()
    record["versions"] = common.versions("llmcompressor", "compressed-tensors", "transformers", "torch")
    path, tokenizer = common.load_tokenizer_and_path()
    ids = common.eval_ids(tokenizer, job.get("split", "test"))
    calibration = None
    if needs_data(job):
        calib = common.calibration_ids(tokenizer, job["n_calib"], job["calib_len"])
        calibration, record["calibration"] = calib.input_ids, calib.to_dict()
    model = common.load_fp32_model(path)
    try:
        model, info = compress(model, tokenizer, job, calibration)
        record.update(info)
        record["attn_implementation"] = model.config._attn_implementation
        record["quantization_status"] = sorted({getattr(m.quantization_status, "value", str(m.quantization_status))
                                                for m in model.modules() if hasattr(m, "quantization_status")})
        checks = probe(model, ids[: common.CTX], job)
    except Exception as err:  # a peer's failure is a finding: record it, never hide it
        log.error("%s/%s/%s failed:\n%s", job["method"], job["setting"], job["transform"], traceback.format_exc())
        record.update(status="failed", error=common.error_text(err))
        return record
    record["applied"] = checks
    for key, part in (("activations_applied", "input_activations"), ("kv_cache_applied", "kv_cache")):
        record[key] = None if checks[part] is None else checks[part]["applied"]
    result = common.perplexity(model, ids, job["max_tokens"])
    missing = _not_applied(checks)
    if missing:
        record.update(result, ppl=None, ppl_as_measured=result["ppl"], status="failed",
                      error=f"llm-compressor did not apply {', '.join(missing)} in the evaluated forward "
                      f"(see \"applied\"); the perplexity is kept as ppl_as_measured")
        return record
    record.update(result)
    record["status"] = "ok"
    return record


def main(argv: list[str] | None = None) -> None:
    common.peer_main(run, __doc__.splitlines()[0],
                     "method (rtn|gptq), setting, transform (llmc-*), n_calib, calib_len, max_tokens, threads", argv)


if __name__ == "__main__":
    main()

"""One llm-compressor run (GPTQModifier or AWQModifier) on SmolLM2, in the peer venv.

Run by ``quant_quality.py`` as ``.venv-bench/bin/python _peer_llmcompressor.py
--job JSON --result FILE``; never imported by the dev venv. It takes OUR
calibration windows (``compressor.calibration.calibration_set``) and scores the
model object ``oneshot`` returns with OUR perplexity function, in fp32, so the
protocol is identical to the ``rtn``/``gptq``/``adaround`` runs.

Peer-specific choices (see benchmarks/README.md):

* calibration goes in as a ``datasets.Dataset`` with ``input_ids`` and
  ``attention_mask`` columns: already tokenized, so llm-compressor does not
  re-tokenize; no shuffling, batch size 1, ``max_seq_length`` = window length;
* weights: ``QuantizationArgs(num_bits, type="int", symmetric=False,
  strategy="group"|"channel", group_size)``, every ``Linear`` except ``lm_head``;
* ``pipeline="sequential"`` (block by block, as our pipeline), on CPU;
* AWQ is the 0.14 form: ``AWQModifier()`` (scales only) followed by a
  ``QuantizationModifier`` with the same scheme. AWQ pins cached activations,
  which raises without an accelerator, so ``torch.Tensor.pin_memory`` is made a
  no-op there and the record says ``"patched": "pin_memory no-op"``.
* Ragged groups (576 columns at group 128) are refused by llm-compressor 0.14
  unless ``bypass_divisibility_checks=True``; every peer run passes it, as
  compressed-tensors' own loader handles a ragged last group.
"""

from __future__ import annotations

import logging
import time
import traceback

from benchmarks import _common as common

log = logging.getLogger("benchmarks.peer")

PEER_METHODS = ("llmc-rtn", "llmc-gptq", "llmc-awq")


# float settings -> llm-compressor's preset scheme (weight-only); FP8 per channel has no A16 preset: its weights
# are those of FP8_DYNAMIC
_FLOAT_PRESETS = {"nvfp4": "NVFP4A16", "mxfp4": "MXFP4A16"}
# the same formats with the linear inputs quantized too (FP8_DYNAMIC: dynamic per-token FP8 inputs)
_FLOAT_ACT_PRESETS = {"nvfp4": "NVFP4", "mxfp4": "MXFP4", "fp8": "FP8_DYNAMIC"}


def _quant_scheme(setting: common.Setting):
    """The compressed-tensors weight scheme for one setting (asymmetric int, or a float format; W-only)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    if setting.act:
        from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

        return {"group_0": preset_name_to_scheme(_FLOAT_ACT_PRESETS[setting.fmt], ["Linear"])}
    if setting.fmt in _FLOAT_PRESETS:
        from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

        return {"group_0": preset_name_to_scheme(_FLOAT_PRESETS[setting.fmt], ["Linear"])}
    if setting.fmt == "fp8":
        weights = QuantizationArgs(num_bits=8, type="float", symmetric=True, strategy="channel")
    elif setting.group_size == -1:
        weights = QuantizationArgs(num_bits=setting.bits, type="int", symmetric=False, strategy="channel")
    else:
        weights = QuantizationArgs(
            num_bits=setting.bits, type="int", symmetric=False, strategy="group", group_size=setting.group_size
        )
    return {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}


def _recipe(method: str, setting: common.Setting) -> list:
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.transform.awq import AWQModifier

    groups = _quant_scheme(setting)
    # SmolLM2's 576-wide inputs leave a ragged last group at g128; llm-compressor 0.14 refuses that
    # unless told the runtime copes (ours and compressed-tensors' loader do), so say so for every setting
    common_args = {"config_groups": groups, "targets": ["Linear"], "ignore": ["lm_head"], "bypass_divisibility_checks": True}
    if method == "llmc-gptq":
        return [GPTQModifier(**common_args)]
    if method == "llmc-rtn":  # round to nearest with llm-compressor's observers, no calibration needed
        return [QuantizationModifier(**common_args)]
    if method == "llmc-awq":
        return [AWQModifier(), QuantizationModifier(**common_args)]
    raise ValueError(f"unknown peer method {method!r}: use one of {PEER_METHODS}")


def _patch_pin_memory() -> str | None:
    """Without an accelerator, make ``Tensor.pin_memory`` return the tensor itself.

    Pinning page-locks host memory for fast host→device copies; with no device
    it raises ("Cannot access accelerator device when none is available"). This
    is the only change made to the peer's behaviour, and only in this process.
    """
    import torch

    if torch.accelerator.is_available():
        return None
    torch.Tensor.pin_memory = lambda self, *args, **kwargs: self  # type: ignore[method-assign]
    return "pin_memory no-op"


def _calibration_dataset(input_ids):
    """A tokenized ``datasets.Dataset`` of our windows: (n, L) int64 → rows of input_ids + attention_mask."""
    from datasets import Dataset

    rows = input_ids.tolist()
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})


def run(job: dict) -> dict:
    """Compress with llm-compressor and evaluate; returns the result record."""
    method = job["method"]
    setting, record = common.peer_record(job, "llmcompressor", "compressed-tensors", "transformers", "torch",
                                         "compressor")
    record["pipeline"] = "sequential"
    if method == "llmc-awq":
        patched = _patch_pin_memory()
        if patched:
            record["patched"] = patched

    from llmcompressor import oneshot

    path, tokenizer = common.load_tokenizer_and_path()
    ids = common.eval_ids(tokenizer, job.get("split", "test"))
    calib = common.calibration_ids(tokenizer, job["n_calib"], job["calib_len"])
    record["calibration"] = calib.to_dict()
    model = common.load_fp32_model(path)
    dataset = _calibration_dataset(calib.input_ids)
    try:
        recipe = _recipe(method, setting)
        log.info("%s %s: oneshot on %d x %d calibration tokens", method, setting.name, calib.n, calib.seq_len)
        start = time.perf_counter()
        model = oneshot(
            model=model,
            tokenizer=tokenizer,
            dataset=dataset,
            recipe=recipe,
            num_calibration_samples=calib.n,
            max_seq_length=calib.seq_len,
            shuffle_calibration_samples=False,
            batch_size=1,
            pipeline="sequential",
        )
        record["compress_s"] = round(time.perf_counter() - start, 2)
    except Exception as err:  # a peer's failure is a finding: record it, never hide it
        log.error("%s %s failed:\n%s", method, setting.name, traceback.format_exc())
        record.update(status="failed", error=common.error_text(err))
        return record
    model = model.float().eval()
    record.update(common.perplexity(model, ids, job["max_tokens"]))
    record["status"] = "ok"
    return record


def main(argv: list[str] | None = None) -> None:
    common.peer_main(run, __doc__.splitlines()[0], "method, bits, group_size, n_calib, calib_len, max_tokens, threads", argv)


if __name__ == "__main__":
    main()

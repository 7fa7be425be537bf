"""One AutoRound run (Intel's auto-round, SignRound) on SmolLM2, in the AutoRound peer venv.

Run by ``quant_quality.py`` as ``.venv-autoround/bin/python -m benchmarks._peer_autoround
--job JSON --result FILE``; never imported by the dev venv (``bash benchmarks/setup_peers.sh
autoround`` makes that venv). It takes OUR calibration windows and scores the
result with OUR perplexity function in fp32, so the protocol is identical to
the ``rtn`` / ``gptq`` / ``llmc-*`` runs.

Peer-specific choices (see benchmarks/README.md):

* two of AutoRound's own recipes (``auto_round.cli.main.RECIPES``):
  ``autoround`` is its default (200 iterations, learning rate 1/iters = 5e-3,
  batch 8) and ``autoround-light`` its light one (50 iterations, learning
  rate 5e-3, batch 8); ``nsamples`` and ``seqlen`` are the protocol's (128 x 512
  here, where AutoRound's recipes say 128 x 2048);
* weights: ``bits``, ``group_size`` (-1 = per output channel) and
  ``sym=False`` (asymmetric, as every integer setting here), every ``Linear``
  of the blocks (AutoRound leaves ``lm_head`` alone by default);
* calibration goes in as a list of (1, L) int64 tensors: AutoRound feeds
  tensors straight to the model, so it does not re-tokenize or re-sample;
* the model is saved in AutoRound's ``fake`` format (weights quantized and
  dequantized; on CPU it writes every tensor in bfloat16) to a temporary
  directory and loaded back with transformers in fp32, so what is scored is
  what AutoRound wrote; ``compress_s`` covers ``quantize_and_save``, the write
  included;
* one patch (the record's ``patched``): after saving, AutoRound 0.16.1 copies
  back every tensor of the source checkpoint that was float32 there and is
  16-bit in the export (``auto_round.utils.missing_tensors.
  restore_fp32_tensors_from_source``), the quantized linear weights included,
  so from our fp32 SmolLM2 its export held the unquantized model (a light W4
  g64 run: ``grid_check`` 0.0 changed, 32 levels per group of 64). The
  runner clears the model's source path before ``quantize_and_save``, so the
  export keeps AutoRound's quantized weights, then puts back from the fp32
  checkpoint only the tensors AutoRound does not quantize (embeddings, norms),
  as its restore means to;
* ``device_map="cpu"``: no accelerator here.
"""

from __future__ import annotations

import logging
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import _common as common

log = logging.getLogger("benchmarks.peer_autoround")

PEER = "auto-round"
# method -> AutoRound's recipe of that name (auto_round.cli.main.RECIPES, 0.16.1): iterations, learning rate
# (None: AutoRound's own 1 / iters), batch size
RECIPES: dict[str, dict[str, Any]] = {
    "autoround": {"recipe": "default", "iters": 200, "lr": None, "batch_size": 8},
    "autoround-light": {"recipe": "light", "iters": 50, "lr": 5e-3, "batch_size": 8},
}
PEER_METHODS = tuple(RECIPES)


def autoround_kwargs(method: str, setting: common.Setting, n_calib: int, calib_len: int,
                     iters: int | None = None) -> dict[str, Any]:
    """The keyword arguments of ``AutoRound(...)`` for one job (besides model, tokenizer and dataset).

    ``iters`` overrides the recipe's iteration count (smoke tests only, from
    ``--set autoround.iters=N``; the record says so). Raises ValueError for a method or setting AutoRound is
    not run at here.
    """
    if method not in RECIPES:
        raise ValueError(f"unknown AutoRound method {method!r}: use one of {PEER_METHODS}")
    if setting.fmt != "int" or setting.bpw is not None:
        raise ValueError(f"{method} runs the integer settings only (w<bits>g<group> / w<bits>pc), not {setting.name}")
    recipe = RECIPES[method]
    kwargs = {"bits": setting.bits, "group_size": setting.group_size, "sym": False,
              "iters": recipe["iters"] if iters is None else iters, "nsamples": n_calib, "seqlen": calib_len,
              "batch_size": min(recipe["batch_size"], n_calib), "seed": 42, "device_map": "cpu"}
    if recipe["lr"] is not None:
        kwargs["lr"] = recipe["lr"]
    return kwargs


def run(job: dict) -> dict:
    """Quantize with AutoRound, reload its fake-quantized export in fp32 and evaluate; returns the result record."""
    method = job["method"]
    setting, record = common.peer_record(job, "auto-round", "transformers", "torch", "compressor", peer=PEER)
    path, tokenizer = common.load_tokenizer_and_path()
    ids = common.eval_ids(tokenizer, job.get("split", "test"))
    calib = common.calibration_ids(tokenizer, job["n_calib"], job["calib_len"])
    record["calibration"] = calib.to_dict()
    try:
        kwargs = autoround_kwargs(method, setting, calib.n, calib.seq_len, _iters_override(job))
    except ValueError as err:
        record.update(status="unavailable", error=str(err))
        return record
    record["autoround"] = {**kwargs, "recipe": RECIPES[method]["recipe"]}
    if _iters_override(job) is not None:
        record["autoround"]["iters_override"] = True  # a smoke run: the report never shows it (a --set run)
    model = common.load_fp32_model(path)
    original = common.checked_weights(model, copy=True)
    dataset = [calib.input_ids[i:i + 1] for i in range(calib.n)]
    # without a source path AutoRound's post-save restore cannot put the fp32 originals back over its weights
    model.name_or_path = ""
    model.config._name_or_path = ""
    record["patched"] = ("model source path cleared: AutoRound 0.16.1's post-save restore of float32 source tensors "
                         "overwrote its quantized weights; the tensors it does not quantize come back from the fp32 "
                         "checkpoint instead")
    from auto_round import AutoRound

    with tempfile.TemporaryDirectory(prefix="autoround-") as tmp:
        try:
            log.info("%s %s: %s", method, setting.name, kwargs)
            start = time.perf_counter()
            rounder = AutoRound(model, tokenizer=tokenizer, dataset=dataset, **kwargs)
            rounder.quantize_and_save(output_dir=tmp, format="fake")
            record["compress_s"] = round(time.perf_counter() - start, 2)
            out = _saved_model_dir(Path(tmp))
            del rounder, model
            quantized = common.load_fp32_model(out)
            record["restored_fp32"] = restore_unquantized(quantized, Path(path))
            record["grid_check"] = common.grid_check(original, quantized, setting)
        except Exception as err:  # a peer's failure is a finding: record it, never hide it
            log.error("%s %s failed:\n%s", method, setting.name, traceback.format_exc())
            record.update(status="failed", error=common.error_text(err))
            return record
    if not common.on_grid(record["grid_check"], setting):
        record.update(status="failed", error=f"AutoRound's export is not {setting.name}-quantized: "
                      f"{record['grid_check']}")
        return record
    record.update(common.perplexity(quantized, ids, job["max_tokens"]))
    record["status"] = "ok"
    return record


def restore_unquantized(quantized, checkpoint: Path) -> int:
    """Copy into ``quantized`` (in place) every tensor of the fp32 ``checkpoint`` directory's safetensors files
    that is not the weight of a quantized linear (a ``Linear`` other than the output embedding): what AutoRound's
    own post-save restore does for the tensors it leaves in full precision. Tensors are read one at a time, so
    the restore adds no second model to the run's peak memory. Returns how many tensors were copied."""
    import torch
    from safetensors import safe_open
    from torch import nn

    head = quantized.get_output_embeddings()
    kept = {f"{name}.weight" for name, m in quantized.named_modules() if isinstance(m, nn.Linear) and m is not head}
    target = quantized.state_dict()
    copied = 0
    with torch.no_grad():
        for file in sorted(checkpoint.glob("*.safetensors")):
            with safe_open(str(file), framework="pt") as fh:
                for name in fh.keys():
                    if name in target and name not in kept:
                        target[name].copy_(fh.get_tensor(name))
                        copied += 1
    return copied


def _iters_override(job: dict) -> int | None:
    """``--set autoround.iters=N`` of the job (smoke tests: fewer iterations than the recipe), else None."""
    for item in job.get("set") or []:
        key, _, value = item.partition("=")
        if key.strip() == "autoround.iters":
            return int(value)
    return None


def _saved_model_dir(root: Path) -> Path:
    """The directory under ``root`` that holds the saved ``config.json`` (AutoRound may add a subfolder)."""
    found = sorted(p.parent for p in root.rglob("config.json"))
    if not found:
        raise FileNotFoundError(f"AutoRound wrote no config.json under {root}")
    return found[0]


def main(argv: list[str] | None = None) -> None:
    common.peer_main(run, __doc__.splitlines()[0],
                     "method, bits, group_size, n_calib, calib_len, max_tokens, threads, set", argv)


if __name__ == "__main__":
    main()

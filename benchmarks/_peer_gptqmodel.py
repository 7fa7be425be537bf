"""One GPTQModel run (ModelCloud's GPTQ) on SmolLM2, in the GPTQModel peer venv.

Run by ``quant_quality.py`` as ``.venv-gptqmodel/bin/python -m benchmarks._peer_gptqmodel
--job JSON --result FILE``; never imported by the dev venv (``bash benchmarks/setup_peers.sh
gptqmodel`` makes that venv). It takes OUR calibration windows and scores the
result with OUR perplexity function in fp32, so the protocol is identical to
the ``gptq`` / ``llmc-gptq`` runs.

Peer-specific choices (see benchmarks/README.md):

* ``GPTQConfig(bits, group_size, sym=False)`` (-1 = per output channel), all
  else GPTQModel's defaults (7.6.0: ``desc_act=False``, ``act_group_aware=True``,
  damping 0.05, ``true_sequential=True``, ``lm_head`` left alone), except that
  per-channel needs ``act_group_aware=False`` (its default raises there); the
  record keeps the whole config GPTQModel saved;
* calibration: our windows as ``{"input_ids", "attention_mask"}`` rows of one
  window each, ``batch_size=1``;
* GPTQModel keeps its quantized layers packed (and offloaded to disk while it
  works), and its CPU kernels run only float16 / bfloat16. So the model is
  saved in its GPTQ checkpoint format and :func:`dequantize_gptq` unpacks that
  checkpoint into the fp32 SmolLM2 for the fp32 perplexity. The record's
  ``dequant_check`` compares our unpacking with GPTQModel's own
  ``dequantize_weight`` (its loader, float16) on two layers, and ``grid_check``
  shows the weights are on the setting's grid; a run failing either is
  recorded as failed, not scored. ``compress_s`` covers ``quantize`` and ``save``;
* on a machine with fewer than 4 cores GPTQModel's default CPU worker pool (1)
  is smaller than the 2 workers its model loader asks for, and ``quantize``
  raises; ``GPTQMODEL_CPU_WORKERS=2`` is set there (the record's ``patched``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks import _common as common

log = logging.getLogger("benchmarks.peer_gptqmodel")

PEER = "gptqmodel"
PEER_METHODS = ("gptqmodel",)
PACK_BITS = 32  # GPTQ checkpoints pack codes into int32 words


def quantize_config_kwargs(setting: common.Setting) -> dict[str, Any]:
    """``GPTQConfig(**kwargs)`` for one setting: the grid only, GPTQModel's defaults otherwise.

    Raises ValueError for a setting GPTQModel's GPTQ is not run at here.
    """
    if setting.fmt != "int" or setting.bpw is not None:
        raise ValueError(f"gptqmodel runs the integer settings only (w<bits>g<group> / w<bits>pc), not {setting.name}")
    kwargs = {"bits": setting.bits, "group_size": setting.group_size, "sym": False}
    if setting.group_size == -1:
        # its default act_group_aware=True raises at per-channel ("requires `group_size > 0`, got `-1`", recorded
        # 2026-12-06): off is the only way GPTQModel quantizes per output channel
        kwargs["act_group_aware"] = False
    return kwargs


def unpack_codes(packed, bits: int, count: int):
    """Codes packed little-endian as one bit stream along dim 0 of int32 words (GPTQ's layout for 2, 3, 4, 8 bits;
    3-bit codes straddle words).

    Args:
        packed: (W, C) int32 words.
        bits: bits per code.
        count: codes to read along dim 0 (at most ``W * 32 // bits``).

    Returns:
        (count, C) int64 codes in ``[0, 2**bits)``.
    """
    import torch

    if count * bits > packed.shape[0] * PACK_BITS:
        raise ValueError(f"{count} codes of {bits} bits need {count * bits} bits, the words hold "
                         f"{packed.shape[0] * PACK_BITS}")
    words = packed.to(torch.int64) & 0xFFFFFFFF  # unsigned
    words = torch.cat([words, torch.zeros_like(words[:1])])  # a last code may read one word past the end
    offsets = torch.arange(count, dtype=torch.int64) * bits
    index, shift = offsets // PACK_BITS, (offsets % PACK_BITS)[:, None]
    # two consecutive words as one 64-bit window: shifts stay below 32 and only the low bits are kept
    window = words[index] | (words[index + 1] << PACK_BITS)
    return (window >> shift) & ((1 << bits) - 1)


def dequantize_gptq(qweight, qzeros, scales, g_idx, bits: int):
    """One linear of a GPTQ checkpoint (``checkpoint_format: gptq``, zeros stored minus one) as an fp32 weight.

    Args:
        qweight: (in * bits / 32, out) int32, codes packed along the input dim.
        qzeros: (groups, out * bits / 32) int32, zero points minus one, packed along the output dim.
        scales: (groups, out) float16 / float32.
        g_idx: (in,) int32, the group of each input column.
        bits: bits per code.

    Returns:
        (out, in) float32 weight: ``scales[g, o] * (code[i, o] - zero[g, o])`` with ``g = g_idx[i]``.
    """
    import torch

    n_in, n_out = g_idx.numel(), scales.shape[1]
    codes = unpack_codes(qweight, bits, n_in)  # (in, out)
    zeros = unpack_codes(qzeros.t().contiguous(), bits, n_out).t() + 1  # (groups, out); stored as zero - 1
    g = g_idx.long()
    weight = scales.float()[g] * (codes - zeros[g]).float()
    return weight.t().contiguous().to(torch.float32)


def load_dequantized(out: Path, model) -> int:
    """Write every linear of the GPTQ checkpoint in ``out`` into ``model`` (fp32 SmolLM2) as its dequantized weight;
    returns how many linears were replaced. Raises ValueError when a quantized linear has no counterpart."""
    from safetensors.torch import load_file

    config = json.loads((out / "quantize_config.json").read_text())
    tensors: dict[str, Any] = {}
    for shard in sorted(out.glob("*.safetensors")):
        tensors.update(load_file(shard))
    modules = dict(model.named_modules())
    names = sorted(k[: -len(".qweight")] for k in tensors if k.endswith(".qweight"))
    for name in names:
        if name not in modules:
            raise ValueError(f"GPTQ checkpoint has {name}, which the fp32 model does not")
        weight = dequantize_gptq(tensors[f"{name}.qweight"], tensors[f"{name}.qzeros"], tensors[f"{name}.scales"],
                                 tensors[f"{name}.g_idx"], config["bits"])
        target = modules[name].weight
        if weight.shape != target.shape:
            raise ValueError(f"{name}: dequantized {tuple(weight.shape)}, model has {tuple(target.shape)}")
        target.data.copy_(weight)
    return len(names)


def _their_dequantized(out: Path) -> dict[str, Any]:
    """GPTQModel's own dequantization of the :data:`common.CHECKED` linears, through its loader (float16, CPU):
    (out, in) float32 weights."""
    import torch
    from gptqmodel import BACKEND, GPTQModel

    loaded = GPTQModel.load(str(out), device="cpu", backend=BACKEND.TORCH, dtype=torch.float16)
    modules = dict(loaded.model.named_modules())
    return {name: modules[name].dequantize_weight().t().float() for name in common.CHECKED}


def run(job: dict) -> dict:
    """Quantize with GPTQModel, unpack its checkpoint into fp32 SmolLM2 and evaluate; returns the result record."""
    import torch

    method = job["method"]
    setting, record = common.peer_record(job, "gptqmodel", "transformers", "torch", "compressor", peer=PEER)
    if (os.cpu_count() or 1) < 4 and "GPTQMODEL_CPU_WORKERS" not in os.environ:
        os.environ["GPTQMODEL_CPU_WORKERS"] = "2"
        record["patched"] = "GPTQMODEL_CPU_WORKERS=2 (its default pool of 1 CPU worker is below its loader's 2)"
    try:
        kwargs = quantize_config_kwargs(setting)
    except ValueError as err:
        record.update(status="unavailable", error=str(err))
        return record
    path, tokenizer = common.load_tokenizer_and_path()
    ids = common.eval_ids(tokenizer, job.get("split", "test"))
    calib = common.calibration_ids(tokenizer, job["n_calib"], job["calib_len"])
    record["calibration"] = calib.to_dict()
    rows = [{"input_ids": row[None], "attention_mask": torch.ones_like(row)[None]} for row in calib.input_ids]
    from gptqmodel import GPTQConfig, GPTQModel

    with tempfile.TemporaryDirectory(prefix="gptqmodel-") as tmp:
        out = Path(tmp) / "export"
        home = os.getcwd()
        os.chdir(tmp)  # GPTQModel writes logs/gptq_log_*.log under the working directory: keep them out of the tree
        try:
            log.info("%s %s: GPTQConfig(%s) on %d x %d calibration tokens", method, setting.name, kwargs, calib.n,
                     calib.seq_len)
            peer_model = GPTQModel.load(str(path), GPTQConfig(**kwargs), dtype=torch.float32, device="cpu")
            start = time.perf_counter()
            peer_model.quantize(rows, batch_size=1)
            peer_model.save(str(out))
            record["compress_s"] = round(time.perf_counter() - start, 2)
            del peer_model
            record["gptqmodel"] = json.loads((out / "quantize_config.json").read_text())
            model = common.load_fp32_model(path)
            original = common.checked_weights(model, copy=True)
            record["linears"] = load_dequantized(out, model)
            record["grid_check"] = common.grid_check(original, model, setting)
            theirs = _their_dequantized(out)
        except Exception as err:  # a peer's failure is a finding: record it, never hide it
            log.error("%s %s failed:\n%s", method, setting.name, traceback.format_exc())
            record.update(status="failed", error=common.error_text(err))
            return record
        finally:
            os.chdir(home)
    ours = common.checked_weights(model)
    # relative to each weight's largest magnitude: GPTQModel's float16 dequantization rounds to ~1e-3
    diff = max(float((ours[n] - theirs[n]).abs().max() / ours[n].abs().max()) for n in common.CHECKED)
    record["dequant_check"] = {"layers": list(common.CHECKED), "max_rel_diff_vs_gptqmodel_fp16": round(diff, 6)}
    if diff > 2e-3 or not common.on_grid(record["grid_check"], setting):
        record.update(status="failed", error=f"our unpacking of GPTQModel's checkpoint disagrees with its own or is "
                      f"off the grid: {record['dequant_check']}, {record['grid_check']}")
        return record
    record.update(common.perplexity(model, ids, job["max_tokens"]))
    record["status"] = "ok"
    return record


def main(argv: list[str] | None = None) -> None:
    common.peer_main(run, __doc__.splitlines()[0],
                     "method, bits, group_size, n_calib, calib_len, max_tokens, threads", argv)


if __name__ == "__main__":
    main()

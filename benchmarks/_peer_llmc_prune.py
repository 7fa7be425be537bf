"""One llm-compressor pruning run (WandaPruningModifier or SparseGPTModifier) on SmolLM2, in the peer venv.

Run by ``pruning.py`` as ``.venv-bench/bin/python _peer_llmc_prune.py --job JSON
--result FILE``; never imported by the dev venv. Same protocol as our runs: OUR
calibration windows (given to ``oneshot`` already tokenized, unshuffled, batch
size 1, ``pipeline="sequential"``), every ``Linear`` but ``lm_head`` pruned,
and the model ``oneshot`` returns scored by OUR perplexity function in fp32.
The modifiers' own defaults are kept otherwise (SparseGPT: block 128,
dampening 0.01, as ours). ``mask_structure`` is ``"0:0"`` (unstructured) or
the job's ``"N:M"``, which means N non-zeros in every M in both projects.
"""

from __future__ import annotations

import logging
import time
import traceback

from benchmarks import _common as common
from benchmarks._peer_llmcompressor import _calibration_dataset
from benchmarks.pruning import block_sparsity, record_for

log = logging.getLogger("benchmarks.peer_prune")


def _modifier(method: str, sparsity: str):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    if ":" in sparsity:
        n, m = (int(v) for v in sparsity.split(":"))
        args = {"sparsity": 1 - n / m, "mask_structure": sparsity}
    else:
        args = {"sparsity": float(sparsity), "mask_structure": "0:0"}
    cls = {"llmc-wanda": WandaPruningModifier, "llmc-sparsegpt": SparseGPTModifier}[method]
    # lm_head needs the regex form: the modifier matches "<layer>.<name>" names, so a plain "lm_head" never hits
    return cls(targets=["Linear"], ignore=["re:.*lm_head"], **args)


def run(job: dict) -> dict:
    """Prune with llm-compressor and evaluate; returns the result record."""
    import torch
    from llmcompressor import oneshot

    if job.get("threads"):
        torch.set_num_threads(job["threads"])
    record = record_for(job)
    record["versions"] = common.versions("llmcompressor", "compressed-tensors", "transformers", "torch", "compressor")
    record["pipeline"] = "sequential"
    path, tokenizer = common.load_tokenizer_and_path()
    ids = common.eval_ids(tokenizer, job.get("split", "test"))
    calib = common.calibration_ids(tokenizer, job["n_calib"], job["calib_len"])
    record["calibration"] = calib.to_dict()
    model = common.load_fp32_model(path)
    try:
        start = time.perf_counter()
        model = oneshot(model=model, tokenizer=tokenizer, dataset=_calibration_dataset(calib.input_ids),
                        recipe=[_modifier(job["method"], job["sparsity"])], num_calibration_samples=calib.n,
                        max_seq_length=calib.seq_len, shuffle_calibration_samples=False, batch_size=1,
                        pipeline="sequential")
        record["compress_s"] = round(time.perf_counter() - start, 2)
    except Exception as err:  # a peer's failure is a finding: record it, never hide it
        log.error("%s failed:\n%s", job, traceback.format_exc())
        record.update(status="failed", error=common.error_text(err))
        return record
    model = model.float().eval()
    record["achieved_sparsity"] = block_sparsity(model)
    record.update(common.perplexity(model, ids, job["max_tokens"]))
    record["status"] = "ok"
    return record


def main(argv: list[str] | None = None) -> None:
    common.peer_main(run, __doc__.splitlines()[0], "method, sparsity, n_calib, calib_len, max_tokens, threads", argv)


if __name__ == "__main__":
    main()

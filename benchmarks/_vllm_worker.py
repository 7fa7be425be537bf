"""One model through vLLM (its CPU build), for ``benchmarks.serve_check``; runs in ``.venv-vllm``.

Started as ``.venv-vllm/bin/python benchmarks/_vllm_worker.py JOB.json RESULT.json`` (a script file: vLLM
spawns its engine process, which re-imports the main module). Imports vLLM and the standard library only:
our package is not installed in that venv (vLLM pins other transformers / compressed-tensors versions).

The job gives token ids, never text, so both sides see the same tokens:

* ``prompts``: lists of ids; greedy continuation of ``new_tokens`` tokens each, with the ``top_k``
  logprobs of every generated position (the first position's are compared);
* ``text``: one list of ids; the logprob vLLM gives each of its tokens (``prompt_logprobs``);
* ``speed`` (optional): ``{"batches": [1, 16], "new_tokens": 64}``: decode tokens/s, greedy, EOS ignored.

A job ``{"probe": {"shapes": [[M, K, N], ...], "limits": [64, 128]}}`` instead measures vLLM's CPU int8
GEMM alone (:func:`int8_probe`), without loading a model.

The result holds the same keys filled in, plus load time, versions, and the linear kernels vLLM chose
(from its log lines).
"""

from __future__ import annotations

import json
import sys
import time


def int8_probe(shapes: list[list[int]], limits: list[int], seed: int = 0) -> list[dict]:
    """vLLM's CPU int8 GEMM (oneDNN, as ``CPUInt8ScaledMMLinearKernel`` calls it) against the exact integer product.

    For each (M, K, N) and each code limit L: weight codes uniform in [-L, L - 1], inputs standard normal
    quantized per token by vLLM's own op; returns the relative error of the output. An error far above float
    rounding means the kernel saturates (no VNNI: pairs of u8 x s8 products summed in int16).
    """
    import torch
    from vllm import _custom_ops as ops

    gen = torch.Generator().manual_seed(seed)
    rows = []
    for m, k, n in shapes:
        for limit in limits:
            x = torch.randn(m, k, generator=gen)
            w = torch.randint(-limit, limit, (n, k), generator=gen, dtype=torch.int8)
            ws = torch.rand(n, 1, generator=gen) * 0.01 + 1e-3
            handler = ops.create_onednn_scaled_mm(w.t(), ws, torch.float32, True, False, 32)
            xq, xs, xzp = ops.onednn_scaled_int8_quant(x, None, None, True)
            out = torch.empty(m, n)
            ops.onednn_scaled_mm(handler, xq, out, xs, xzp, None, None)
            exact = (xq.double() @ w.double().t()) * xs.view(-1, 1).double() * ws.view(1, -1).double()
            rows.append({"m": m, "k": k, "n": n, "code_limit": limit,
                         "rel_err": float((out.double() - exact).norm() / exact.norm())})
    return rows


def main(job_path: str, result_path: str) -> None:
    job = json.loads(open(job_path, encoding="utf-8").read())
    if "probe" in job:
        import vllm

        with open(result_path, "w", encoding="utf-8") as fh:
            json.dump({"vllm": vllm.__version__, "probe": int8_probe(**job["probe"])}, fh)
        return

    import vllm
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    t0 = time.perf_counter()
    llm = LLM(model=job["model"], tokenizer=job.get("tokenizer") or job["model"], dtype=job["dtype"],
              max_model_len=job.get("max_model_len", 1024), enforce_eager=True, seed=0,
              gpu_memory_utilization=job.get("memory_fraction", 0.2), max_num_seqs=job.get("max_num_seqs", 16))
    load_s = time.perf_counter() - t0
    out = {"vllm": vllm.__version__, "load_s": round(load_s, 2)}

    greedy = SamplingParams(max_tokens=job["new_tokens"], temperature=0.0, logprobs=job["top_k"], ignore_eos=True)
    gens = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in job["prompts"]], greedy, use_tqdm=False)
    out["greedy"] = [list(g.outputs[0].token_ids) for g in gens]
    out["first_top"] = [{str(t): lp.logprob for t, lp in g.outputs[0].logprobs[0].items()} for g in gens]

    scoring = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    (scored,) = llm.generate([TokensPrompt(prompt_token_ids=job["text"])], scoring, use_tqdm=False)
    ids = job["text"]
    # position 0 has no logprob; at i the entry holds the logprob of the token actually at i
    out["text_logprobs"] = [None] + [scored.prompt_logprobs[i][ids[i]].logprob for i in range(1, len(ids))]

    speed = job.get("speed")
    if speed:
        out["speed"] = []
        params = SamplingParams(max_tokens=speed["new_tokens"], temperature=0.0, ignore_eos=True)
        for batch in speed["batches"]:
            prompts = [TokensPrompt(prompt_token_ids=job["prompts"][i % len(job["prompts"])]) for i in range(batch)]
            llm.generate(prompts[:1], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
            t0 = time.perf_counter()
            done = llm.generate(prompts, params, use_tqdm=False)
            seconds = time.perf_counter() - t0
            tokens = sum(len(d.outputs[0].token_ids) for d in done)
            out["speed"].append({"batch": batch, "new_tokens": speed["new_tokens"], "tokens": tokens,
                                 "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2)})
    with open(result_path, "w", encoding="utf-8") as fh:
        json.dump(out, fh)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])

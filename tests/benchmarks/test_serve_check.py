"""benchmarks/serve_check.py without vLLM: the comparison, the pass rules, the expectations, the log parsing, and
the worker script's isolation (it must not import our package: it runs in vLLM's venv)."""

from __future__ import annotations

import ast

from benchmarks import _common as common
from benchmarks import report, serve_check as sc
from compressor.export import runtimes


def _answers(greedy, text, top=None):
    return {"greedy": greedy, "first_top": top or [{"1": -0.1, "2": -2.0}] * len(greedy), "text_logprobs": [None, *text]}


def test_compare_counts_identical_continuations_and_where_others_part():
    a = _answers([[1, 2, 3], [4, 5, 6], [7, 8, 9]], [-1.0, -2.0, -3.0])
    b = _answers([[1, 2, 3], [4, 5, 0], [0, 8, 9]], [-1.5, -2.0, -2.0], top=[{"1": -0.2, "3": -1.0}] * 3)
    out = sc.compare(a, b)
    assert out["greedy_equal"] == 1 and out["parted_at"] == [0, 2]
    assert out["top_k_overlap_min"] == 1 and out["top_k_max_abs_diff"] == 0.1
    assert out["text_mean_abs_diff"] == 0.5 and out["text_max_abs_diff"] == 1.0
    assert out["text_nll_ours"] == 2.0 and out["text_nll_vllm"] == 1.83333


def _record(equal, mean, nll_ours=3.3, nll_vllm=3.3, acts=False):
    passes = [{"rtn": {}}] + ([{"quantize_activations": {"bits": 8}}] if acts else [])
    return {"greedy_equal": equal, "prompts": 8, "text_mean_abs_diff": mean, "text_nll_ours": nll_ours,
            "text_nll_vllm": nll_vllm, "recipe": {"passes": passes}}


def _floor(equal, mean, shift=0.0):
    return {"greedy_equal": equal, "prompts": 8, "text_mean_abs_diff": mean, "text_nll_shift": shift}


def test_weight_only_schemes_are_held_token_for_token():
    floor = _floor(8, 1e-6)
    assert sc.verdict_of(_record(8, 1e-4), floor, "float32") == (True, "")
    ok, why = sc.verdict_of(_record(6, 1e-4), floor, "float32")
    assert not ok and "greedy 6/8" in why
    ok, why = sc.verdict_of(_record(8, 0.05), floor, "float32")
    assert not ok and "0.05 > 0.02" in why
    ok, why = sc.verdict_of(_record(8, 1e-4, 3.3, 3.33), floor, "float32")
    assert not ok and "NLL" in why


def test_weight_only_schemes_in_bfloat16_are_held_to_the_dtype_tolerance_and_the_floors_tokens():
    """In bfloat16 our own loader, nudged by half a rounding step, keeps only a few continuations: vLLM must keep
    as many, and its |d logprob| stays within TEXT_TOLERANCE (the 2026-12-06 w4a16-asym record: 0.0629, 5 of 8,
    NLL 3.5042 against our 3.5080, floor 3 of 8 and 0.0498)."""
    floor = _floor(3, 0.04984, shift=0.0035)
    rec = _record(5, 0.06292, 3.50803, 3.5042)
    assert sc.verdict_of(rec, floor, "bfloat16") == (True, "")
    assert rec["tolerance"] == {"min_greedy_equal": 3, "text_mean_abs_diff": 0.15, "text_nll_abs_diff": 0.01}
    ok, why = sc.verdict_of(_record(2, 0.06), floor, "bfloat16")
    assert not ok and "greedy 2/8 identical (need 3)" in why
    ok, why = sc.verdict_of(_record(5, 0.2), floor, "bfloat16")
    assert not ok and "0.2 > 0.15" in why


def test_activation_quantized_schemes_are_held_to_the_floor():
    floor = _floor(3, 0.2, shift=0.008)  # a 1e-6 nudge already parts 5 of 8 continuations
    rec = _record(1, 0.24, 3.3, 3.315, acts=True)
    assert sc.verdict_of(rec, floor, "float32") == (True, "")
    assert rec["tolerance"] == {"text_mean_abs_diff": 0.25, "text_nll_abs_diff": 0.016}
    ok, why = sc.verdict_of(_record(2, 0.28, acts=True), floor, "float32")
    assert not ok and "0.28 > 0.25" in why
    ok, why = sc.verdict_of(_record(2, 0.21, 3.31, 3.38, acts=True), floor, "float32")  # saturated kernels: NLL 2% worse
    assert not ok and "NLL" in why
    assert sc.verdict_of(_record(2, 0.21, 3.31, 3.318, acts=True), _floor(3, 0.2, shift=0.001), "float32")[0]  # 0.01 at least


def test_the_floor_is_the_worst_seed():
    mine = _answers([[1, 2], [3, 4]], [-1.0, -1.0])
    nudged = [_answers([[1, 2], [3, 4]], [-1.0, -1.2]), _answers([[1, 2], [3, 0]], [-1.1, -1.0])]
    floor = sc.floor_of(mine, nudged)
    assert floor == {"seeds": 2, "prompts": 2, "greedy_equal": 1, "text_mean_abs_diff": 0.1, "text_max_abs_diff": 0.2,
                     "text_nll_shift": 0.1}


def test_expectations_follow_the_rules_and_the_cpu():
    assert sc.expectation(runtimes.YES, set()) == (True, True)
    assert sc.expectation(runtimes.WITH_VNNI, {"avx2"}) == (True, False)
    assert sc.expectation(runtimes.WITH_VNNI, {"avx2", "avx512_vnni"}) == (True, True)
    assert sc.expectation(runtimes.AVX512_ONLY, {"avx2"}) == (False, False)
    assert sc.expectation(runtimes.AVX512_ONLY, {"avx512f"}, "bfloat16") == (True, True)
    # cpu_gemm_wna16 dispatches on bfloat16 / float16 only: a float32 model fails on an AVX-512 CPU too
    assert sc.expectation(runtimes.AVX512_ONLY, {"avx512f"}, "float32") == (False, False)
    assert sc.expectation(runtimes.AVX512_ONLY, {"avx2"}, "bfloat16") == (False, False)
    assert sc.expectation(runtimes.NO, {"avx512f", "amx_int8"}) == (False, False)
    amx = {"avx512f", "avx512_vnni", "amx_int8", "amx_tile"}
    # AMX: symmetric int8 inputs need 16-bit compute; WNA16 runs in 16 bits but with other rounding
    assert sc.expectation(runtimes.YES, amx, sym_int8=True) == (False, False)
    assert sc.expectation(runtimes.WITH_VNNI, amx, sym_int8=True) == (False, False)
    assert sc.expectation(runtimes.YES, amx, "bfloat16", sym_int8=True) == (True, True)
    assert sc.expectation(runtimes.YES, amx) == (True, True)  # asymmetric inputs run
    assert sc.expectation(runtimes.YES, {"avx512f", "avx512_vnni"}, sym_int8=True) == (True, True)
    assert sc.expectation(runtimes.AVX512_ONLY, amx, "bfloat16") == (True, False)
    sym = {"config_groups": {"g": {"input_activations": {"num_bits": 8, "type": "int", "symmetric": True}}}}
    asym = {"config_groups": {"g": {"input_activations": {"num_bits": 8, "type": "int", "symmetric": False}}}}
    assert runtimes.sym_int8_inputs(sym) and not runtimes.sym_int8_inputs(asym)
    assert not runtimes.sym_int8_inputs(None)
    assert not runtimes.sym_int8_inputs({"config_groups": {"g": {"weights": {"num_bits": 4}}}})
    assert sc.expectation(runtimes.AMX_ONLY, {"avx512f", "avx512_vnni"}) == (False, False)
    assert sc.expectation(runtimes.AMX_ONLY, {"avx512f", "amx_tile"}) == (True, True)


def test_our_side_answers_and_a_floor_run_leaves_the_model_as_it_was():
    from tests.helpers import tiny_llama

    model = tiny_llama()
    job = {"prompts": [[1, 2, 3], [4, 5]], "text": list(range(10, 30)), "new_tokens": 4, "top_k": 5}
    first = sc.ours(model, job)
    assert [len(g) for g in first["greedy"]] == [4, 4] and len(first["first_top"][0]) == 5
    assert first["text_logprobs"][0] is None and len(first["text_logprobs"]) == 20
    nudged = sc.ours(model, job, perturb=1e-3, seed=1)
    assert nudged["text_logprobs"] != first["text_logprobs"]
    assert sc.ours(model, job) == first  # the nudge was for that call only


def test_log_parsing():
    log = ("(Worker pid=1) INFO [__init__.py:846] Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8\n"
           "(Worker pid=1) INFO [__init__.py:846] Selected CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8\n"
           "Traceback (most recent call last):\n"
           "AttributeError: '_OpNamespace' '_C' object has no attribute 'cpu_gemm_wna16'\n"
           "done\n")
    assert sc.kernels(log) == ["CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"]
    assert "cpu_gemm_wna16" in sc.vllm_error(log)
    wrapped = ("(Worker pid=6) ERROR 12-04 22:50:23 [multiproc_executor.py:953] ValueError: Failed to find a kernel. "
               "Reasons: \n(Worker pid=6) ERROR 12-04 22:50:23 [multiproc_executor.py:953]  CPUWNA16LinearKernel "
               "cannot implement due to: Quant type (uint8b128) not supported\n"
               "RuntimeError: Engine core initialization failed. See root cause above.\n")
    assert sc.vllm_error(wrapped) == ("ValueError: Failed to find a kernel. Reasons:; CPUWNA16LinearKernel cannot "
                                      "implement due to: Quant type (uint8b128) not supported")


def test_every_scheme_recipe_parses():
    from compressor import Recipe

    for name, recipe in sc.SCHEMES.items():
        assert recipe is None or Recipe.from_dict(recipe).passes, name


def test_worker_imports_nothing_of_ours():
    tree = ast.parse((common.ROOT / "benchmarks" / "_vllm_worker.py").read_text())
    imported = {a.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__", "json", "sys", "time", "torch", "vllm"}


def test_report_tables_from_synthetic_records():
    checks = [{"scheme": "w7a8", "dtype": "float32", "format": "int-quantized", "verdict": "yes", "ran": True,
               "kernels": ["CPUInt8ScaledMMLinearKernel for CompressedTensorsW8A8Int8"], "greedy_equal": 2,
               "prompts": 8, "text_mean_abs_diff": 0.2, "text_nll_ours": 3.3, "text_nll_vllm": 3.31,
               "floor": {"greedy_equal": 3, "text_mean_abs_diff": 0.19}, "status": "pass", "commit": "c0ffee00"},
              {"scheme": "w8a16", "dtype": "float32", "format": "pack-quantized", "verdict": "no", "ran": False,
               "error": "NotImplementedError: no kernel", "status": "pass", "commit": "c0ffee00"}]
    table = report.serve_check(checks)
    assert "| w7a8 | float32 | int-quantized | yes | yes (CPUInt8ScaledMMLinearKernel) | 2/8 (floor 3/8) " in table
    assert "| w8a16 | float32 | pack-quantized | no | no: `NotImplementedError: no kernel` |" in table
    speed = [{"scheme": "none", "dtype": "bfloat16", "batch": b, "tokens_per_s": t, "commit": "c0ffee00"}
             for b, t in ((1, 20.0), (16, 150.5))]
    assert "| none | bfloat16 | 20.0 | 150.5 |" in report.vllm_decode(speed)
    probe = [{"m": 1, "k": 576, "n": 192, "code_limit": lim, "rel_err": err, "vnni": False, "amx": False,
              "commit": "c0ffee00"} for lim, err in ((64, 3.9e-8), (128, 0.138))]
    assert "| 1 x 576 x 192 | 3.9e-08 | 0.14 |" in report.vllm_int8_probe(probe)

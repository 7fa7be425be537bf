"""benchmarks/report.py: the doc tables equal what the committed records give; the table rules on synthetic records."""

from __future__ import annotations

import json

import pytest

from benchmarks import report


@pytest.mark.parametrize("path", report.DOCS, ids=lambda p: p.name)
def test_every_generated_block_matches_the_records(path):
    assert report.stale_blocks(path) == [], f"run `python -m benchmarks.report` and commit {path.name}"


def test_every_figure_matches_the_records():
    assert report.stale_figures() == [], "run `python -m benchmarks.report` and commit the figures"


def _record(method, setting, ppl, *, quick=False, status="ok", commit="c0ffee00", **extra):
    protocol = {"quick": quick, "n_calib": 8 if quick else 128, "calib_len": 128 if quick else 512,
                "max_tokens": 2048 if quick else 32768, "threads": None, "set": []}
    return {"bench": "quant_quality", "method": method, "setting": setting, "ppl": ppl, "status": status,
            "protocol": protocol, "commit": commit, "dirty": False, "date": "2026-12-04T10:00:00Z",
            "loadavg": [2.0, 2.0, 2.0], **extra}


def _write(tmp_path, records):
    results = tmp_path / "results"
    results.mkdir()
    (results / "quant_quality.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return results


def test_table_takes_the_newest_full_protocol_record_and_bolds_the_best(tmp_path):
    results = _write(tmp_path, [
        _record("fp32", "fp32", 23.07),
        _record("gptq", "w4g64", 26.0, compress_s=300.4, peak_rss_mb=2800.0),
        _record("gptq", "w4g64", 25.78, compress_s=315.0, peak_rss_mb=2888.0, commit="beefbeef"),  # newer wins
        _record("gptq", "w4g64", 20.0, quick=True),  # smoke runs never reach the docs
        _record("llmc-gptq", "w4g64", 25.94, compress_s=388.0, peak_rss_mb=2683.0),
        _record("llmc-gptq", "w4g128", None, status="failed", error="RuntimeError: unflatten: sizes [-1, 128]"),
        _record("gptq", "w4g128", 26.98, compress_s=315.0, peak_rss_mb=2941.0),
    ])
    doc = tmp_path / "doc.md"
    doc.write_text("before\n<!-- report:quant-quality -->\nold text\n<!-- /report:quant-quality -->\nafter\n")
    text = report.render(doc.read_text(), results)
    assert text.startswith("before\n<!-- report:quant-quality -->\n") and text.endswith("<!-- /report:quant-quality -->\nafter\n")
    assert "| W4 g64 | — | — | **25.78** | — | 25.94 | — / 315 / — / 388 | — / 2888 / — / 2683 |" in text
    assert "| W4 g128 | — | — | 26.98 | — | failed | — / 315 / — / — | — / 2941 / — / — |" in text
    assert "* llm-compressor GPTQ W4 g128: RuntimeError: unflatten" in text
    assert "fp32: 23.07." in text and "20.00" not in text
    assert "commit beefbeef, c0ffee00" in text and "(5 records" in text
    assert report.stale_blocks(doc, results) == ["quant-quality"]
    doc.write_text(text)
    assert report.stale_blocks(doc, results) == []


def test_times_from_more_than_one_machine_are_said(tmp_path):
    results = _write(tmp_path, [
        _record("gptq", "w4g64", 26.28, compress_s=223.0, machine={"isa": "AVX512"}),
        _record("llmc-gptq", "w4g64", 26.03, compress_s=339.0, machine={"isa": "AVX512"}),
        _record("gptaq", "w4g64", 25.16, compress_s=870.0, machine={"isa": "AVX2"}),
        _record("gptq", "w3g64", 35.6, compress_s=300.0, machine={"isa": "AVX2"}),
        _record("llmc-gptq", "w3g64", 39.1, compress_s=456.0, machine={"isa": "AVX2"}),
    ])
    text = report.render("<!-- report:quant-quality -->\n<!-- /report:quant-quality -->\n", results)
    assert "* W4 g64: AVX2: GPTAQ; AVX512: GPTQ, llm-compressor GPTQ" in text
    assert "W3 g64:" not in text.split("so compare times only within one machine")[1]  # one machine: no note


def test_unknown_block_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="unknown report block 'nope'"):
        report.render("<!-- report:nope -->\n<!-- /report:nope -->\n", tmp_path)


def test_shared_machine_is_said(tmp_path):
    results = _write(tmp_path, [_record("gptq", "w3g64", 35.6, loadavg=[3.9, 3.4, 2.0])])
    text = report.render("<!-- report:quant-quality -->\n<!-- /report:quant-quality -->\n", results)
    assert "(1 record, commit c0ffee00, 2026-12-04; 1 of them written with a 5-minute load above 2.5 (machine shared))" in text


def test_dev_split_records_never_reach_the_docs(tmp_path):
    dev = _record("gptq", "w3g64", 30.0)
    dev["protocol"]["split"] = "dev"
    results = _write(tmp_path, [dev, _record("gptq", "w3g64", 35.6)])
    text = report.render("<!-- report:quant-quality -->\n<!-- /report:quant-quality -->\n", results)
    assert "35.60" in text and "30.00" not in text


def test_headline_compares_like_with_like_and_calls_ties(tmp_path):
    results = _write(tmp_path, [
        _record("fp32", "fp32", 23.07),
        _record("gptq-norefit", "w4g64", 25.99), _record("llmc-gptq", "w4g64", 26.08),  # 0.3%: a tie
        _record("gptq", "w4g64", 25.78),
        _record("gptq-norefit", "w3g64", 36.0), _record("llmc-gptq", "w3g64", 38.39), _record("gptaq", "w3g64", 32.04),
        _record("llmc-awq", "w3g64", 53.25),
    ])
    text = report.render("<!-- report:quant-headline -->\n<!-- /report:quant-headline -->\n", results)
    assert "| W4 g64 | 25.99 / 26.08 (tie) | 25.78 (GPTQ) / 26.08 (llm-compressor GPTQ) (1.2% lower; gap to fp32 " in text
    assert "| W3 g64 | 36.00 / 38.39 (6.2% lower;" in text and "32.04 (GPTAQ) / 38.39 (llm-compressor GPTQ)" in text
    assert "fp32 23.07" in text and "W4 per-channel" not in text


def test_float_formats_table_gives_each_method_and_our_gap_as_a_multiple_of_the_peers(tmp_path):
    from benchmarks import _common as common

    assert common.parse_setting("nvfp4") == common.Setting(4, 16, "nvfp4")
    assert common.parse_setting("mxfp4").scheme() == {"type": "float", "bits": 4, "group_size": 32, "symmetric": True,
                                                      "scale_format": "e8m0"}
    assert common.setting_of(common.parse_setting("fp8").job()) == common.Setting(8, -1, "fp8")
    results = _write(tmp_path, [
        _record("fp32", "fp32", 20.0),
        _record("rtn", "nvfp4", 26.0),
        _record("gptq", "nvfp4", 22.0, compress_s=500.0),
        _record("llmc-rtn", "nvfp4", 27.0),
        _record("llmc-gptq", "nvfp4", 24.0, compress_s=400.0),
        _record("rtn", "w4g64", 29.0),  # integer settings stay in their own table
    ])
    text = report.render("<!-- report:float-formats -->\n<!-- /report:float-formats -->\n", results)
    assert "| NVFP4 (E2M1 g16, E4M3 scales) | 26.00 | — | 22.00 | — | 27.00 | 24.00 | 0.50x | 500 / — / 400 |" in text
    (tmp_path / "b").mkdir()
    results = _write(tmp_path / "b", [_record("fp32", "fp32", 20.0), _record("rtn", "fp8", 20.1),
                                      _record("llmc-rtn", "fp8", 20.2)])
    text = report.render("<!-- report:float-formats -->\n<!-- /report:float-formats -->\n", results)
    assert "| FP8 E4M3 per-channel | 20.10 | — | — | — | 20.20 | — | — | — / — / — |" in text  # no GPTQ: no ratio
    assert "MXFP4" not in text and "29.00" not in text and "fp32: 20.00." in text


def test_float_inputs_table_takes_our_best_cell_against_the_peers_best(tmp_path):
    from benchmarks import _common as common

    setting = common.parse_setting("w4a4-nvfp4")
    assert setting == common.Setting(4, 16, "nvfp4", act=True) and setting.name == "w4a4-nvfp4"
    assert common.setting_of(setting.job()) == setting
    assert setting.activation_pass() == {"quantize_activations": {"format": "nvfp4", "bits": 4}}
    assert common.parse_setting("nvfp4").activation_pass() is None
    results = _write(tmp_path, [
        _record("fp32", "fp32", 20.0),
        _record("rtn", "w4a4-nvfp4", 40.0),
        _record("rot-gptq", "w4a4-nvfp4", 26.0, compress_s=420.0),
        _record("llmc-rtn", "w4a4-nvfp4", 41.0),
        _record("llmc-gptq", "w4a4-nvfp4", 32.0, compress_s=500.0),
        _record("gptq", "nvfp4", 22.0),  # weight-only: the other table
    ])
    text = report.render("<!-- report:float-inputs -->\n<!-- /report:float-inputs -->\n", results)
    assert ("| W4A4 NVFP4 (g16, E4M3 scales; static input global scale) | 40.00 | — | — | 26.00 | — | — | — | — | — | "
            "— | — | 41.00 | 32.00 | 0.50x | 420 / 500 |") in text
    assert "22.00" not in text and "fp32: 20.00." in text


def test_mixed_table_orders_budgets_and_uniform_grids_by_bits_per_weight(tmp_path):
    results = _write(tmp_path, [
        _record("fp32", "fp32", 23.07),
        _record("gptaq", "w3g64", 32.12, compress_s=400.0),
        _record("gptaq", "w4pc", 27.51, compress_s=390.0),
        _record("llmc-gptq", "w4pc", 29.88, compress_s=388.0),
        _record("gptaq", "mixed-3.5bpw", 28.9, compress_s=700.0, target_bpw=3.5, achieved_bpw=3.4881,
                allocation={"w3g64": 178, "w4g64": 29, "w4pc": 3}),
    ])
    text = report.render("<!-- report:mixed -->\n<!-- /report:mixed -->\n", results)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[0] for r in rows] == ["| W3 g64", "| mixed, budget 3.5 bits per weight", "| W4 per-channel"]
    assert "| 3.297 | 32.12 | — | 400 | uniform |" in rows[0]
    assert "| 3.488 | 28.90 | — | 700 | w3g64 x178, w4g64 x29, w4pc x3 |" in rows[1]
    assert "| 4.029 | 27.51 | 29.88 | 390 | uniform |" in rows[2]
    assert "fp32: 23.07." in text


def test_scale_table_lists_each_shape_and_method_newest_first_by_size(tmp_path):
    def rec(shape, params, method, wall, rss, status="ok", **extra):
        return {"bench": "scale", "shape": shape, "params": params, "method": method, "wall_s": wall,
                "peak_rss_mb": rss, "s_per_bparam": round(wall / (params / 1e9), 1), "status": status,
                "checkpoint_bytes": params * 2, "export_bytes": params // 2, "commit": "c0ffee00", "dirty": False,
                "date": "2026-12-05T10:00:00Z", "loadavg": [2.0, 2.0, 2.0], **extra}

    results = tmp_path / "results"
    results.mkdir()
    records = [rec("8b", 8_030_000_000, "ours-stream", 5000.0, 5800.0), rec("1b", 1_240_000_000, "ours", 961.0, 8366.0),
               rec("1b", 1_240_000_000, "ours-stream", 900.0, 2048.0),
               rec("1b", 1_240_000_000, "llmc-gptq", 0.0, 0.0, status="failed", error="boom"),
               rec("8b", 1_490_000_000, "ours-stream", 700.0, 4000.0, blocks=2, of_blocks=32),  # a --blocks probe
               rec("1b", 1_240_000_000, "ours-stream", 901.0, 2049.0, blocks=16, of_blocks=16,
                   machine={"isa": "AVX512", "cores": 2}),
               rec("8b", 8_030_000_000, "llmc-gptq", 600.4, 16800.0, status="stopped", stopped_after_s=600.0)]
    (results / "scale.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = report.render("<!-- report:scale -->\n<!-- /report:scale -->\n", results)
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [r.split(" | ")[:2] for r in rows] == [["| 1b (1.24B, 2.5 GB)", "ours, streamed"],
                                                  ["| 1b (1.24B, 2.5 GB)", "ours, in memory"],
                                                  ["| 1b (1.24B, 2.5 GB)", "llm-compressor"],
                                                  ["| 8b (8.03B, 16.1 GB)", "ours, streamed"],
                                                  ["| 8b (8.03B, 16.1 GB)", "llm-compressor"],
                                                  ["| 8b, first 2 of 32 blocks (1.49B, 3.0 GB)", "ours, streamed"]]
    # a record that counts its blocks at full depth is the newest full-depth one; the probe has a row of its own
    assert "| 901 | 2.00 | 727 | 0.62 GB | AVX512, 2 cores |" in rows[0] and rows[1].endswith("| — |") and "failed: boom" in rows[2] and "| 700 | 3.91 |" in rows[5]
    # a run stopped part way (benchmarks.scale --stop-after) shows its peak so far as a lower bound, no rate
    assert "| llm-compressor | stopped at 600 | at least 16.41 | | |" in rows[4]


def test_scale_figure_draws_the_newest_full_depth_run_of_each_shape_and_method(tmp_path):
    def rec(shape, params, method, wall, rss, status="ok", **extra):
        return {"bench": "scale", "shape": shape, "params": params, "method": method, "wall_s": wall,
                "peak_rss_mb": rss, "status": status, "commit": "c0ffee00", "date": "2026-12-05T10:00:00Z", **extra}

    results = tmp_path / "results"
    results.mkdir()
    assert "no full-depth records" in report.scale_figure([])
    records = [rec("1b", 1_240_000_000, "ours-stream", 900.0, 2048.0), rec("8b", 8_030_000_000, "ours-stream", 5000.0, 5800.0),
               rec("1b", 1_240_000_000, "ours-stream", 520.0, 1783.0),  # newer: replaces the 900 s point
               rec("1b", 1_240_000_000, "llmc-gptq", 1132.0, 3890.0),
               rec("8b", 8_030_000_000, "llmc-gptq", 0.0, 0.0, status="failed"),  # no point
               rec("8b", 1_490_000_000, "ours-stream", 700.0, 4000.0, blocks=2, of_blocks=32)]  # a probe: no point
    (results / "scale.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    path = report.common.ROOT / "docs" / "scale.svg"
    svg = report.figure(path, results)
    assert svg.startswith("<svg") and svg.endswith("</svg>\n")
    assert svg.count("<circle") == 2 + 2 * 3  # two legend dots + (two ours points, one peer point) in each panel
    assert svg.count("<polyline") == 2  # ours joins its two shapes in each panel; one peer point has no line
    # x axis to 10 (8.03B x 1.1), time axis to 10000 s (5000 x 1.1), RSS axis to 10 GiB (5.66 GiB x 1.1)
    assert ">10</text>" in svg and ">10000</text>" in svg and "ours, streamed" in svg and "llm-compressor" in svg
    left, right = 60, 340
    x_1b = left + (right - left) * 1.24 / 10
    y_520 = 250 - 200 * 520 / 10000
    assert f'<circle cx="{x_1b:.1f}" cy="{y_520:.1f}" r="4"' in svg and 'cy="{:.1f}"'.format(250 - 200 * 900 / 10000) not in svg
    assert report.figure(path, results) == svg  # the same records give the same bytes


def test_propagate_tables_split_dev_from_test_and_take_the_time_ratio_from_one_run(tmp_path):
    avx512 = {"isa": "AVX512", "cores": 2}
    dev = {"quick": False, "n_calib": 128, "calib_len": 512, "max_tokens": 32768, "split": "dev", "set": []}
    results = _write(tmp_path, [
        _record("gptq", "w4g64", 29.66, compress_s=318.0, machine=avx512, protocol=dev),
        _record("gptq-fpprop", "w4g64", 29.50, compress_s=181.0, machine=avx512, protocol=dev),
        _record("gptq-fpprop", "w4g64", 99.0, compress_s=1.0, machine=avx512,
                protocol={**dev, "set": ["gptq.block_size=64"]}),  # a --set run: not the default's
        _record("gptq-fpprop", "w4g64", 25.9, compress_s=180.0, machine=avx512, commit="beefbeef"),
        _record("llmc-gptq", "w4g64", 25.98, compress_s=600.0, machine=avx512, commit="beefbeef"),
        _record("gptq", "w4g64", 25.86, compress_s=300.0, machine=avx512, commit="beefbeef"),
        _record("gptq-fpprop", "w3g64", 33.0, compress_s=170.0, machine=avx512, commit="beefbeef"),
        _record("llmc-gptq", "w3g64", 39.0, compress_s=450.0, machine={"isa": "AVX2"}, commit="c0ffee00"),  # another run
    ])
    doc = "<!-- report:propagate-dev -->\n<!-- /report:propagate-dev -->\n<!-- report:propagate -->\n<!-- /report:propagate -->\n"
    text = report.render(doc, results)
    dev_part, test_part = text.split("<!-- report:propagate -->")
    assert "| W4 g64 | 29.66 | 29.50 | — | 318 / 181 / — | — | AVX512, 2 cores |" in dev_part and "99.00" not in dev_part
    assert "| W4 g64 | 25.86 | 25.90 | 25.98 | 300 / 180 / 600 | 0.30x | AVX512, 2 cores |" in test_part
    assert "| W3 g64 | — | 33.00 | 39.00 | — / 170 / 450 | — | AVX512, 2 cores |" in test_part  # not one run: no ratio


def _prune(sparsity, allocation, ppl, *, split="test", sets=(), **extra):
    protocol = {"quick": False, "n_calib": 128, "calib_len": 512, "max_tokens": 32768, "threads": None,
                "split": split, "set": list(sets), "batch_size": None, "true_sequential": False}
    return {"bench": "pruning", "method": "wanda", "sparsity": sparsity, "allocation": allocation, "ppl": ppl,
            "status": "ok", "protocol": protocol, "commit": "c0ffee00", "dirty": False,
            "date": "2026-12-06T10:00:00Z", "loadavg": [1.0, 1.0, 1.0], **extra}


def test_pruning_tables_keep_test_and_dev_split_records_apart(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    records = [
        _prune("0.7", "uniform", 905.6, achieved_sparsity=0.6997, compress_s=606.0),
        _prune("0.7", "dp-output", 323.0, achieved_sparsity=0.7013, compress_s=894.0),
        _prune("0.7", "dp-output", 999.0, sets=["prune.dp_span=0.3"]),  # a --set run never reaches the test table
        _prune("0.7", "dp-output", 250.0, split="dev", sets=["prune.dp_span=0.1"], compress_s=700.0),
        _prune("0.7", "dp-output", 240.0, split="dev", sets=["prune.dp_span=0.2"], compress_s=800.0),
        _prune("0.7", "dp-output", 100.0, split="dev"),  # no explicit span: not part of the span choice
        {**_prune("0.7", "dp-output", 1.0, split="dev", sets=["prune.dp_span=0.1"]),
         "protocol": {**_prune("0.7", "uniform", 1.0)["protocol"], "split": "dev", "quick": True,
                      "set": ["prune.dp_span=0.1"]}},  # a smoke run never counts
    ]
    (results / "pruning.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = report.render("<!-- report:pruning-allocation -->\n<!-- /report:pruning-allocation -->\n"
                         "<!-- report:pruning-dp-span -->\n<!-- /report:pruning-dp-span -->\n", results)
    test_part, dev_part = text.split("<!-- report:pruning-dp-span -->")
    assert "| 70% | 905.6 | **323.0** | -64.3% | 0.6997 / 0.7013 | 606 / 894 |" in test_part
    assert "999" not in test_part and "240.0" not in test_part
    assert "| 70% | 0.1 | 250.0 | — | 700 |" in dev_part and "| 70% | 0.2 | **240.0** | — | 800 |" in dev_part
    assert "905.6" not in dev_part and "100.0" not in dev_part and "| 1.0 |" not in dev_part
    assert "(2 records" in test_part and "(2 records" in dev_part


def _ost(method, transform, ppl, *, split="test", sets=(), steps=100, **extra):
    protocol = {"quick": False, "n_calib": 128, "calib_len": 512, "max_tokens": 32768, "threads": None,
                "split": split, "ost_steps": steps, "reload": False, **({"set": list(sets)} if sets else {})}
    rotation = {"loss_first": 0.9, "loss_last": 0.5, "clip_mean": {"qkv": 0.91, "down": 0.8}} \
        if transform.startswith("ostquant") else None
    return {"bench": "transforms", "method": method, "setting": "w4a4kv4", "transform": transform, "ppl": ppl,
            "status": "ok", "protocol": protocol, "rotation": rotation, "commit": "c0ffee00", "dirty": False,
            "date": "2026-12-06T10:00:00Z", "loadavg": [1.0, 1.0, 1.0], **extra}


def test_ostquant_tables_keep_the_test_split_apart_from_the_dev_sweep(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    records = [
        _ost("gptq", "hadamard", 52.21, compress_s=373.0, peak_rss_mb=2500.0),
        _ost("gptq", "ostquant", 36.77, compress_s=1500.0, peak_rss_mb=6600.0),
        _ost("gptq", "ostquant", 11.0, steps=8),  # another step count: not the default training
        _ost("gptq", "ostquant", 12.0, sets=["ostquant.lr_clip=0.1"]),  # a --set run never reaches the test table
        _ost("gptq", "ostquant", 40.0, split="dev", sets=["ostquant.lr_clip=0.01"], compress_s=1400.0),
        _ost("gptq", "ostquant", 38.0, split="dev", sets=["ostquant.lr_clip=0.1"], compress_s=1410.0),
        _ost("gptq", "ostquant", 39.0, split="dev", sets=["ostquant.lr_clip=0.1", "ostquant.lr=0.0004"]),
        _ost("gptq", "ostquant", 43.0, split="dev"),  # nothing set: the defaults' own point
        _ost("gptq", "hadamard", 14.0, split="dev", sets=["ostquant.lr_clip=0.1"]),  # not OSTQuant
    ]
    (results / "transforms.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = report.render("<!-- report:transforms -->\n<!-- /report:transforms -->\n"
                         "<!-- report:ostquant-dev -->\n<!-- /report:ostquant-dev -->\n", results)
    test_part, dev_part = text.split("<!-- report:ostquant-dev -->")
    assert "| W4A4KV4 | Hadamard (QuaRot: R1, R2, R3, R4, online o_proj) | — | — | 52.21 | — | — " \
           "| GPTQ 373 s, 2.4 GB |" in test_part
    assert "| 36.77 | — | 0.900 → 0.500 | GPTQ 1500 s, 6.4 GB |" in test_part
    assert not any(f"| {x} |" in test_part for x in ("11.00", "12.00", "40.00", "43.00", "14.00"))
    assert "| 0.01 | default | 40.00 | 0.900 → 0.500 | qkv 0.910, down 0.800 | 1400 |" in dev_part
    assert "| 0.1 | default | **38.00** |" in dev_part and "| 0.1 | 0.0004 | 39.00 |" in dev_part
    assert "| default | default | 43.00 |" in dev_part
    assert (dev_part.index("| default | default") < dev_part.index("| 0.01 | default") < dev_part.index("| 0.1 | default")
            < dev_part.index("| 0.1 | 0.0004"))
    assert "36.77" not in dev_part and "14.00" not in dev_part and "43.00" not in test_part
    assert "(2 records" in test_part and "(4 records" in dev_part


def test_venv_peers_get_columns_once_recorded_and_count_as_peers_in_the_headline(tmp_path):
    base = [_record("fp32", "fp32", 23.07), _record("gptq", "w4g64", 25.78, compress_s=315.0, peak_rss_mb=2888.0),
            _record("llmc-gptq", "w4g64", 25.94, compress_s=388.0, peak_rss_mb=2683.0)]
    blocks = "<!-- report:quant-quality -->\n<!-- /report:quant-quality -->\n" \
             "<!-- report:quant-headline -->\n<!-- /report:quant-headline -->\n"
    (tmp_path / "a").mkdir()
    without = report.render(blocks, _write(tmp_path / "a", base))
    assert "AutoRound" not in without  # no record, no column
    records = base + [_record("autoround", "w4g64", 25.5, compress_s=3000.0, peak_rss_mb=2400.0),
                      _record("autoround-light", "w4g64", 25.9, compress_s=900.0, peak_rss_mb=2300.0),
                      _record("gptqmodel", "w4g64", 26.1, compress_s=500.0, peak_rss_mb=2200.0)]
    (tmp_path / "b").mkdir()
    text = report.render(blocks, _write(tmp_path / "b", records))
    table, headline = text.split("<!-- report:quant-headline -->")
    assert "| GPTQModel GPTQ ppl | AutoRound ppl | AutoRound light ppl | compress s (refit off / GPTQ / GPTAQ / llmc / " \
           "GPTQModel GPTQ / AutoRound / AutoRound light) |" in table
    assert "| 25.78 | — | 25.94 | 26.10 | **25.50** | 25.90 | — / 315 / — / 388 / 500 / 3000 / 900 |" in table
    assert "25.78 (GPTQ) / 25.50 (AutoRound) (1.1% higher" in headline


def test_recipes_table_scores_each_file_by_its_own_method():
    records = [_record("fp32", "fp32", 23.07), _record("gptaq", "w4g64", 25.16),
               _record("gptaq", "w4a4-nvfp4", 99.0), _record("qa-gptaq", "w4a4-nvfp4", 28.94),
               _record("awqa-qa-gptaq", "w4a4-nvfp4", 28.1), _record("awqa-qa-gptaq-mse", "w4a4-nvfp4", 27.5),
               _record("llmc-gptq", "w4a4-nvfp4", 29.74), _record("bh-qa-gptaq", "w4a4-mxfp4", 31.24)]
    table = report.recipes(records)
    assert "| `recipes/w4g64.yaml` | w4g64 | 25.16 | — |" in table
    assert "| `recipes/w4a4-nvfp4.yaml` | w4a4-nvfp4 | 27.50 | 29.74 |" in table  # its own method's, no other
    assert "| `recipes/w4a4-mxfp4.yaml` | w4a4-mxfp4 | 31.24 | — |" in table
    assert report.recipe_method("w3g64") == "gptaq"


def test_recipes_cli_table_says_reproduced_and_from_which_machine():
    def cli(name, ppl, **extra):
        return {"bench": "recipes_cli", "recipe": f"recipes/{name}.yaml", "setting": name, "status": "ok", "ppl": ppl,
                "compress_s": 300.0, "eval_s": 100.0, "protocol": {"calibration": "CLI default", "max_tokens": 32768,
                                                                   "split": "test"},
                "commands": [f"compressor compress SMOLLM2 --recipe recipes/{name}.yaml -o OUT --quiet --overwrite",
                             "compressor eval SMOLLM2 OUT --json ROWS"], "commit": "c0ffee00", **extra}

    records = [cli("w4g64", 25.19, benchmark_ppl=25.156, benchmark_commit="2fe718be", same_machine=False,
                   benchmark_machine={"cpu": "AMD EPYC", "isa": None}, rel_diff=0.001352, reproduced=True),
               cli("w4pc", 27.5, benchmark_ppl=27.5, benchmark_commit="78f99834", same_machine=True, rel_diff=0.0,
                   reproduced=True),
               {**cli("w3g64", 1.0), "protocol": {"calibration": "CLI default", "max_tokens": 256, "split": "test",
                                                  "dataset": "text.txt"}}]  # a test's run: not shown
    table = report.recipes_cli(records)
    assert "| `recipes/w4g64.yaml` | 25.19 | 25.16 (2fe718be) | yes, 0.14% apart (other machine: AMD EPYC) |" in table
    assert "| `recipes/w4pc.yaml` | 27.50 | 27.50 (78f99834) | yes, 0.00% apart (same machine) | 300 + 100 |" in table
    assert "| `recipes/w3g64.yaml` | — | — | not run yet | — |" in table
    assert "--recipe recipes/NAME.yaml" in table


def test_learned_rounding_dev_table_lists_the_defaults_then_each_variant_tried():
    def dev(method, ppl, sets=()):
        r = _record(method, "w4g64" if method != "fp32" else "fp32", ppl, compress_s=100.0,
                    machine={"isa": "AVX512"})
        r["protocol"] = {**r["protocol"], "split": "dev", "set": list(sets)}
        return r

    records = [dev("fp32", 26.4), dev("gptq", 29.7), dev("gptaq", 28.5), dev("adaround-block", 29.9),
               dev("adaround-block", 30.3, ["adaround.iters=100"])]
    table = report.learned_rounding_dev(records)
    assert "| W4 g64 | 26.40 | 29.70 (100 s) | 28.50 (100 s) | 29.90 (100 s) | AVX512, 2 cores |" in table
    assert "| W4 g64, iters=100 | | | | 30.30 (100 s) | AVX512, 2 cores |" in table
    assert "No dev-split records" in report.learned_rounding_dev(records[:3])


def test_float_inputs_dev_table_shows_each_of_our_recipes_at_each_setting_run_on_dev():
    def dev(method, setting, ppl, sets=()):
        r = _record(method, setting, ppl, compress_s=10.0)
        r["protocol"] = {**r["protocol"], "split": "dev", "set": list(sets)}
        return r

    records = [dev("fp32", "fp32", 26.4), dev("rtn", "w4a4-mxfp4", 70.1), dev("bh-rtn", "w4a4-mxfp4", 40.2),
               dev("qa-gptaq", "w4a4-nvfp4", 32.9), dev("llmc-gptq", "w4a4-nvfp4", 30.0)]
    variant = dev("qa-gptaq", "w4a4-nvfp4", 31.5, ["gptq.damp=0.1"])  # newer than the default run: a row of its own
    table = report.float_inputs_dev([*records, variant])
    assert "| W4A4 NVFP4 (g16, E4M3 scales; static input global scale), gptq.damp=0.1 | | 31.50 | |" in table
    labels = dict(report.ACT_METHODS)  # a column for each of our methods run on dev, in the table's order
    assert "| setting | " + " | ".join(labels[m] for m in ("rtn", "qa-gptaq", "bh-rtn")) + " |\n" in table
    assert "llm-compressor" not in table
    assert "| W4A4 MXFP4 (g32, E8M0 scales) | 70.10 | — | 40.20 |" in table
    assert "| W4A4 NVFP4 (g16, E4M3 scales; static input global scale) | — | 32.90 | — |" in table
    assert "W8A8" not in table and "fp32: 26.40." in table
    assert "No dev-split records" in report.float_inputs_dev(records[:1])


def test_provenance_names_the_machines_when_records_come_from_several():
    a, b = _record("gptq", "w4g64", 25.0), _record("llmc-gptq", "w4g64", 26.0)
    a["machine"], b["machine"] = {"cpu": "AMD EPYC", "isa": "AVX2"}, {"cpu": "Intel Xeon", "isa": "AVX512"}
    assert "on 2 machines (AMD EPYC AVX2, Intel Xeon AVX512): compare times only within one" in \
        report._provenance([a, b], "quant_quality")
    b["machine"] = dict(a["machine"])
    assert "machines" not in report._provenance([a, b], "quant_quality")

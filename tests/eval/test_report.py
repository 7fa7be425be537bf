"""Table, JSON, Markdown and PNG reports; speed and kernel backend on tiny models."""

from __future__ import annotations

import json

import pytest
import torch
from tests.helpers import tiny_llama

from compressor.eval.report import format_markdown, format_table, plot_ppl_vs_bits, write_json, write_markdown
from compressor.eval.speed import decode_speed, kernel_backend

ROWS = [
    {"label": "base", "ppl": 23.0721, "kl_to_base": 0.0, "bits_per_weight": 32, "size_mb": 538.1, "backend": "dense"},
    {"label": "w4g64", "ppl": 29.5574, "kl_to_base": 0.123456, "bits_per_weight": 4.562, "size_mb": 174.0,
     "backend": "reference", "task_acc": None},
]


def test_table_and_markdown():
    table = format_table(ROWS)
    lines = table.splitlines()
    assert lines[0].startswith("| label") and len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert "29.5574" in lines[3] and "0.12346" in lines[3] and " - " in lines[3]
    md = format_markdown(ROWS, {"ctx": 512})
    assert md.startswith("# Evaluation") and "- ctx: `512`" in md and "| w4g64" in md


def test_json_and_markdown_files(tmp_path):
    data = json.loads(write_json(ROWS, tmp_path / "r" / "out.json", {"ctx": 512}).read_text())
    assert data["settings"] == {"ctx": 512} and data["rows"] == ROWS
    text = write_markdown(ROWS, tmp_path / "out.md", {"ctx": 512}).read_text()
    header = [c.strip() for c in text.splitlines()[4].strip("|").split("|")]
    assert header[:3] == ["label", "ppl", "kl_to_base"]


def test_png_plot(tmp_path):
    pytest.importorskip("matplotlib")
    path = plot_ppl_vs_bits(ROWS + [{"label": "no bits", "ppl": 1.0}], tmp_path / "p.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no model"):
        plot_ppl_vs_bits([{"label": "x"}], tmp_path / "q.png")


def test_decode_speed_and_dense_backend():
    model = tiny_llama()
    res = decode_speed(model, torch.arange(16), steps=4)
    assert res.steps == 4 and res.decode_tok_s > 0 and res.prefill_tok_s > 0 and res.peak_mem_mb is None
    assert res.decode_ms == pytest.approx(1e3 / res.decode_tok_s)
    assert kernel_backend(model) == "dense"
    with pytest.raises(ValueError, match="max_position_embeddings=128"):
        decode_speed(model, torch.arange(100), steps=40)


def test_decode_greedy_matches_full_forward():
    """The cached decode path produces the same tokens as argmax over full forwards (the cache is used)."""
    from transformers import DynamicCache

    from compressor.eval.speed import _cache_kwarg

    model = tiny_llama()
    x = torch.arange(8)[None]
    with torch.no_grad():
        cache = DynamicCache()
        key = _cache_kwarg(model)
        tok = model(input_ids=x, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)
        cached = [tok]
        for _ in range(3):
            tok = model(input_ids=tok, use_cache=True, **{key: cache}).logits[:, -1:].argmax(-1)
            cached.append(tok)
        seq = x
        full = []
        for _ in range(4):
            nxt = model(input_ids=seq, use_cache=False).logits[:, -1:].argmax(-1)
            full.append(nxt)
            seq = torch.cat([seq, nxt], 1)
    assert torch.equal(torch.cat(cached, 1), torch.cat(full, 1))

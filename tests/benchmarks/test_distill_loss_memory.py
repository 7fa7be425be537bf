"""benchmarks/distill_loss_memory.py's core measurement at a tiny size (vocab 512, 64 tokens)."""

from __future__ import annotations

import pytest
from tests.helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("distill_loss_memory")


def test_measure_naive_and_chunked_agree(bench):
    sizes = dict(vocab=512, tokens=64, hidden=32, chunk_size=24)
    naive = bench.measure("naive", **sizes)
    chunked = bench.measure("chunked", **sizes)
    for record in (naive, chunked):
        assert record["peak_delta_mb"] >= 0 and record["seconds"] >= 0
        assert record["peak_rss_mb"] >= record["baseline_rss_mb"]
    assert chunked["loss"] == pytest.approx(naive["loss"], rel=1e-5)
    assert chunked["grad_norm"] == pytest.approx(naive["grad_norm"], rel=1e-4)
    with pytest.raises(ValueError, match="variant"):
        bench.measure("fused", **sizes)

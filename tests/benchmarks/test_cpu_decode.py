"""benchmarks/cpu_decode.py helpers on a tiny model: per-step timings, weight size, the int4 repack."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import load_benchmark, tiny_llama

from compressor import Recipe, compress, load_compressed, save_compressed


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("cpu_decode")


def test_decode_timings_and_sizes(bench, tmp_path):
    model = tiny_llama(hidden=64, inter=96)
    dense_mb = bench.weight_mb(model)
    recipe = Recipe.from_dict({"passes": [{"rtn": {"scheme": {"bits": 4, "group_size": 32}}}]})
    compress(model, recipe, quiet=True)
    loaded = load_compressed(save_compressed(model, tmp_path / "w4", recipe=recipe), dtype=torch.bfloat16)
    ids = torch.randint(0, 96, (1, 5), generator=torch.Generator().manual_seed(0))
    times = bench.decode_ms(loaded, ids, steps=3, warmup=1)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert "cpu" in loaded.model.layers[0].mlp.down_proj._kernel_cache  # decode went through the int4 path
    assert 0 < bench.weight_mb(loaded) < dense_mb / 2  # packed 4-bit vs dense fp32
    assert bench.repack_s(loaded) > 0


def test_interleaved_decoding_times_every_model_each_step(bench):
    models = {"a": tiny_llama(hidden=64, inter=96), "b": tiny_llama(hidden=64, inter=96)}
    ids = torch.randint(0, 96, (1, 4), generator=torch.Generator().manual_seed(0))
    times = bench.decode_ms_interleaved(models, ids, steps=5, warmup=1, turn=3)
    assert set(times) == {"a", "b"} and all(len(t) == 5 and min(t) > 0 for t in times.values())

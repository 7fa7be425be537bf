"""Perplexity against a hand computation on a tiny model."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import tiny_llama

from compressor.eval.perplexity import perplexity, strided_windows


def test_matches_manual_computation():
    model = tiny_llama()
    ids = torch.randint(0, 96, (100,), generator=torch.Generator().manual_seed(1))
    res = perplexity(model, ids, ctx=16, max_tokens=64, batch_size=3, quiet=True)
    nll, count = 0.0, 0
    for start in range(0, 64, 16):
        w = ids[start : start + 16][None]
        logits = model(w).logits[0]
        nll += F.cross_entropy(logits[:-1], w[0, 1:], reduction="sum").item()
        count += 15
    assert res.tokens == count and res.windows == 4
    assert res.ppl == pytest.approx(math.exp(nll / count), rel=1e-6)


def test_strided_windows_score_each_token_once():
    ids = torch.arange(40)
    wins = strided_windows(ids, ctx=16, stride=8)
    scored = []
    for w, first in wins:
        scored.extend(w[first:].tolist())
    assert scored == list(range(1, 40))[: len(scored)] and len(set(scored)) == len(scored)


@pytest.mark.parametrize(
    "kwargs,match",
    [({"ctx": 1}, "too short"), ({"ctx": 16, "stride": 20}, "stride"), ({"ctx": 64}, "fewer than one window")],
)
def test_bad_windows(kwargs, match):
    with pytest.raises(ValueError, match=match):
        strided_windows(torch.arange(40), **kwargs)


def test_context_longer_than_model_allows():
    with pytest.raises(ValueError, match="max_position_embeddings"):
        perplexity(tiny_llama(), torch.arange(400) % 96, ctx=256, quiet=True)

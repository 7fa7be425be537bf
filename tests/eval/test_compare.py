"""KL to a base model and lockstep perplexity against brute force on tiny models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tests.helpers import tiny_llama

from compressor.eval.compare import score_windows, token_kl
from compressor.eval.perplexity import perplexity


def _ids(n=100, seed=1):
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed))


def test_kl_of_a_model_to_itself_is_zero():
    model, ids = tiny_llama(), _ids()
    res = score_windows(model, ids, base=model, ctx=16, max_tokens=64, quiet=True)
    assert res.kl == pytest.approx(0.0, abs=1e-7) and res.top1_agree == 1.0
    assert res.ppl == res.base_ppl


def test_kl_and_perplexity_match_brute_force():
    base, model, ids = tiny_llama(seed=0), tiny_llama(seed=1), _ids()
    res = score_windows(model, ids, base=base, ctx=16, max_tokens=64, batch_size=3, keep_tokens=True, quiet=True)
    kl, agree, count = 0.0, 0, 0
    with torch.no_grad():
        for start in range(0, 64, 16):
            w = ids[start : start + 16][None]
            p = base(w).logits[0, :-1].double().softmax(-1)  # (15, V)
            q = model(w).logits[0, :-1].double().softmax(-1)
            kl += (p * (p.log() - q.log())).sum().item()
            agree += int((p.argmax(-1) == q.argmax(-1)).sum())
            count += 15
    assert res.kl > 0 and res.kl == pytest.approx(kl / count, rel=1e-5)
    assert res.top1_agree == agree / count
    assert res.ppl.ppl == pytest.approx(perplexity(model, ids, ctx=16, max_tokens=64, quiet=True).ppl, rel=1e-6)
    assert res.base_ppl.ppl == pytest.approx(perplexity(base, ids, ctx=16, max_tokens=64, quiet=True).ppl, rel=1e-6)
    assert res.token_nll.shape == res.token_kl.shape == res.base_token_nll.shape == (count,)
    assert res.token_nll.dtype == torch.float32
    assert res.token_nll.double().sum().item() == pytest.approx(res.ppl.nll, rel=1e-5)
    assert res.token_kl.double().mean().item() == pytest.approx(res.kl, rel=1e-5)


def test_strided_windows_without_base_equal_perplexity():
    model, ids = tiny_llama(), _ids(120)
    res = score_windows(model, ids, ctx=32, stride=8, quiet=True)
    ref = perplexity(model, ids, ctx=32, stride=8, quiet=True)
    assert res.kl is None and res.ppl.tokens == ref.tokens and res.ppl.ppl == pytest.approx(ref.ppl, rel=1e-6)


def test_token_kl_closed_form():
    base = torch.tensor([[0.0, 0.0]])  # p = (1/2, 1/2)
    other = torch.tensor([[0.0, torch.log(torch.tensor(3.0))]])  # q = (1/4, 3/4)
    expected = 0.5 * torch.log(torch.tensor(2.0)) + 0.5 * torch.log(torch.tensor(2 / 3))
    assert token_kl(base, other).item() == pytest.approx(expected.item(), rel=1e-6)
    with pytest.raises(ValueError, match="share a tokenizer"):
        token_kl(torch.zeros(2, 5), torch.zeros(2, 6))


def test_context_longer_than_either_model_allows():
    with pytest.raises(ValueError, match="--ctx 128"):
        score_windows(tiny_llama(), _ids(400), base=tiny_llama(), ctx=256, quiet=True)


def test_kl_uses_log_softmax_not_raw_logits():
    # shifting every logit by a constant leaves the distribution, hence the KL, unchanged
    a = torch.randn(4, 10)
    assert token_kl(a, a + 5.0).abs().max().item() < 1e-5
    assert F.kl_div(F.log_softmax(a, -1), F.log_softmax(a, -1), log_target=True, reduction="sum").item() == 0.0

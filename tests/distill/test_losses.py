"""Distillation losses against direct formulas and brute-force references; chunked == naive."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from compressor.algorithms.distill.chunked import chunked_distill_loss, naive_distill_loss
from compressor.algorithms.distill.hidden import hidden_state_loss, make_projections
from compressor.algorithms.distill.losses import cross_entropy, distill_loss, forward_kl, jsd, reverse_kl, topk_kl
from compressor.algorithms.distill.pld import plackett_luce_loss, teacher_permutation


def _pair(shape=(3, 5, 11), seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype) * 2, torch.randn(shape, generator=g, dtype=dtype) * 2


# ---------------------------------------------------------------- KL family


def test_forward_kl_matches_kl_div():
    s, t = _pair()
    ref = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="none").sum(-1).mean()
    torch.testing.assert_close(forward_kl(s, t), ref)


def test_reverse_kl_is_forward_kl_with_roles_swapped():
    s, t = _pair()
    torch.testing.assert_close(reverse_kl(s, t), forward_kl(t, s))
    assert reverse_kl(s, s).abs() < 1e-12


def test_temperature_scaling_is_t_squared_times_kl_of_scaled_logits():
    s, t = _pair()
    T = 3.0
    torch.testing.assert_close(forward_kl(s, t, temperature=T), T**2 * forward_kl(s / T, t / T))
    torch.testing.assert_close(jsd(s, t, temperature=T, beta=0.3), T**2 * jsd(s / T, t / T, beta=0.3))


def test_jsd_symmetric_value_and_limits():
    s, t = _pair()
    p, q = F.softmax(t, -1), F.softmax(s, -1)
    m = (p + q) / 2
    ref = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    torch.testing.assert_close(jsd(s, t, beta=0.5), ref.mean())
    assert jsd(s, t) <= math.log(2)
    eps = 1e-6
    torch.testing.assert_close(jsd(s, t, beta=eps) / eps, forward_kl(s, t), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(jsd(s, t, beta=1 - eps) / eps, reverse_kl(s, t), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="forward_kl"):
        jsd(s, t, beta=0.0)


def test_topk_kl_full_vocab_equals_kl_and_renormalized_formula():
    s, t = _pair()
    V = s.shape[-1]
    torch.testing.assert_close(topk_kl(s, t, k=V), forward_kl(s, t))
    torch.testing.assert_close(topk_kl(s, t, k=V, renormalize=False), forward_kl(s, t))
    k = 4
    idx = t.topk(k, -1).indices
    torch.testing.assert_close(topk_kl(s, t, k=k), forward_kl(s.gather(-1, idx), t.gather(-1, idx)))
    p, log_q = F.softmax(t, -1), F.log_softmax(s, -1)
    ref = (p * (p.log() - log_q)).gather(-1, idx).sum(-1).mean()
    torch.testing.assert_close(topk_kl(s, t, k=k, renormalize=False), ref)
    with pytest.raises(ValueError, match="k=0"):
        topk_kl(s, t, k=0)


def test_mask_reduction_and_ignore_index():
    s, t = _pair()
    mask = torch.rand(s.shape[:-1], generator=torch.Generator().manual_seed(1)) > 0.4
    per = forward_kl(s, t, reduction="none")
    torch.testing.assert_close(forward_kl(s, t, mask=mask), per[mask].mean())
    torch.testing.assert_close(forward_kl(s, t, mask=mask, reduction="sum"), per[mask].sum())
    assert forward_kl(s, t, mask=torch.zeros_like(mask)) == 0
    labels = torch.randint(0, s.shape[-1], s.shape[:-1], generator=torch.Generator().manual_seed(2))
    labels[~mask] = -100
    ref = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(cross_entropy(s, labels), ref)
    alpha = 0.3
    mixed = distill_loss(s, t, alpha=alpha, labels=labels, temperature=2.0)
    torch.testing.assert_close(mixed, alpha * ref + (1 - alpha) * forward_kl(s, t, temperature=2.0))
    with pytest.raises(ValueError, match="pass labels"):
        distill_loss(s, t, alpha=0.5)
    with pytest.raises(ValueError, match="mask shape"):
        forward_kl(s, t, mask=mask[0])
    with pytest.raises(ValueError, match="same tokens"):
        forward_kl(s, t[..., :-1])


# ---------------------------------------------------------------- chunked == naive


def _hidden_case(T, D, Dt, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(T, D, generator=g, dtype=dtype, requires_grad=True)
    ws = (torch.randn(V, D, generator=g, dtype=dtype) / D**0.5).requires_grad_()
    ht = torch.randn(T, Dt, generator=g, dtype=dtype)
    wt = torch.randn(V, Dt, generator=g, dtype=dtype) / Dt**0.5
    return hs, ws, ht, wt


def _value_and_grads(fn, hs, ws, ht, wt, **kw):
    hs_, ws_ = hs.detach().clone().requires_grad_(), ws.detach().clone().requires_grad_()
    loss = fn(hs_, ws_, ht, wt, **kw)
    loss.backward()
    return loss.detach(), hs_.grad, ws_.grad


CASES = [
    dict(kind="forward_kl"),
    dict(kind="reverse_kl", temperature=2.0),
    dict(kind="jsd", beta=0.3, temperature=0.7),
    dict(kind="forward_kl", temperature=2.0, alpha=0.4, with_labels=True, with_mask=True),
    dict(kind="jsd", alpha=1.0, with_labels=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
@pytest.mark.parametrize("chunk_size", [1, 5, 13, 64])
def test_chunked_matches_naive_float64(case, chunk_size):
    case = dict(case)
    T, V = 13, 17
    hs, ws, ht, wt = _hidden_case(T, 6, 9, V, torch.float64)
    g = torch.Generator().manual_seed(5)
    if case.pop("with_labels", False):
        labels = torch.randint(0, V, (T,), generator=g)
        labels[::4] = -100
        case["labels"] = labels
    if case.pop("with_mask", False):
        case["mask"] = torch.rand(T, generator=g) > 0.3
    ref = _value_and_grads(naive_distill_loss, hs, ws, ht, wt, **case)
    got = _value_and_grads(chunked_distill_loss, hs, ws, ht, wt, chunk_size=chunk_size, **case)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_chunked_gradcheck_float64():
    hs, ws, ht, wt = _hidden_case(7, 4, 5, 9, torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0], dtype=torch.bool)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        fn = lambda h, w: chunked_distill_loss(h, w, ht, wt, kind=kind, temperature=1.5, chunk_size=3,  # noqa: E731
                                               mask=mask)
        assert torch.autograd.gradcheck(fn, (hs, ws))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_chunked_matches_naive_float32_moderate(kind):
    T, V = 300, 1000  # chunk sizes below divide neither
    hs, ws, ht, wt = _hidden_case(T, 64, 96, V, torch.float32, seed=3)
    ref = _value_and_grads(naive_distill_loss, hs, ws, ht, wt, kind=kind, temperature=2.0)
    for chunk_size in (64, 97):
        got = _value_and_grads(chunked_distill_loss, hs, ws, ht, wt, kind=kind, temperature=2.0,
                               chunk_size=chunk_size)
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_chunked_batched_inputs_and_frozen_head():
    hs, ws, ht, wt = _hidden_case(12, 6, 6, 10, torch.float64)
    hs3 = hs.detach().reshape(3, 4, 6).requires_grad_()
    ref = naive_distill_loss(hs.detach(), ws.detach(), ht, wt)
    loss = chunked_distill_loss(hs3, ws.detach(), ht.reshape(3, 4, 6), wt, chunk_size=5)
    torch.testing.assert_close(loss, ref)
    loss.backward()  # head weight without requires_grad: only the hidden states get a gradient
    assert hs3.grad.shape == (3, 4, 6)


def test_chunked_errors():
    hs, ws, ht, wt = _hidden_case(8, 6, 5, 10, torch.float32)
    with pytest.raises(ValueError, match="vocabulary"):
        chunked_distill_loss(hs, ws, ht, wt[:-1])
    with pytest.raises(ValueError, match="student hidden width"):
        chunked_distill_loss(hs[:, :-1], ws, ht, wt)
    with pytest.raises(ValueError, match="teacher hidden width"):
        chunked_distill_loss(hs, ws, ht[:, :-1], wt)
    with pytest.raises(ValueError, match="same"):
        chunked_distill_loss(hs, ws, ht[:-1], wt)
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_distill_loss(hs, ws, ht, wt, chunk_size=0)
    with pytest.raises(ValueError, match="not chunked"):
        chunked_distill_loss(hs, ws, ht, wt, kind="topk_kl")
    with pytest.raises(ValueError, match="mask shape"):
        chunked_distill_loss(hs, ws, ht, wt, mask=torch.ones(7, dtype=torch.bool))


# ---------------------------------------------------------------- Plackett-Luce


def _pl_brute(s, order, weights, top_k=None):
    """-sum_k w_k log P(choose order[k] | the classes not yet chosen), one loop per position."""
    total = 0.0
    for k in range(len(order) if top_k is None else top_k):
        rest = order[k:]
        total += weights[k] * -(s[order[k]] - torch.logsumexp(s[rest], 0))
    return total


def test_pl_loss_matches_brute_force():
    s, t = _pair((4, 6), seed=7)
    labels = torch.tensor([0, 3, 5, 2])
    order = teacher_permutation(t, labels)
    assert (order[:, 0] == labels).all()
    conf = F.softmax(t / 2.0, -1)
    for b in range(4):
        rest = order[b, 1:]
        assert (t[b, rest].diff() <= 0).all()  # the rest in descending teacher logit
    per = plackett_luce_loss(s, t, labels, temperature=2.0, reduction="none")
    plain = plackett_luce_loss(s, t, labels, weighted=False, top_k=3, reduction="none")
    for b in range(4):
        torch.testing.assert_close(per[b], _pl_brute(s[b], order[b], conf[b, order[b]]))
        # top-3 of the ranking; the normalizers still span every class not yet chosen
        torch.testing.assert_close(plain[b], _pl_brute(s[b], order[b], [1.0] * 3, top_k=3))
    torch.testing.assert_close(plackett_luce_loss(s, t, labels, temperature=2.0), per.mean())


def test_pl_partial_ranking_normalizer_spans_unchosen_classes():
    s, t = _pair((1, 5), seed=8)
    order = teacher_permutation(t)[0]
    got = plackett_luce_loss(s, t, top_k=2, weighted=False)
    ref = -(s[0, order[0]] - s[0].logsumexp(0)) - (s[0, order[1]] - s[0, order[1:]].logsumexp(0))
    torch.testing.assert_close(got, ref)


def test_pl_loss_is_minimal_when_student_order_equals_teacher_order():
    t = torch.tensor([[3.0, 1.0, 2.0, 0.0]], dtype=torch.float64)
    scores = torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64)  # assigned by rank
    losses = {}
    for perm in itertools.permutations(range(4)):
        s = torch.empty(1, 4, dtype=torch.float64)
        s[0, list(perm)] = scores  # class perm[i] gets the i-th largest score
        losses[perm] = plackett_luce_loss(s, t).item()
    teacher_order = tuple(teacher_permutation(t)[0].tolist())
    assert min(losses, key=losses.get) == teacher_order


def test_pl_errors():
    s, t = _pair((2, 5))
    with pytest.raises(ValueError, match="top_k"):
        plackett_luce_loss(s, t, top_k=6)
    with pytest.raises(ValueError, match="class ids"):
        plackett_luce_loss(s, t, torch.tensor([0, -100]))


# ---------------------------------------------------------------- hidden states


def test_hidden_state_loss_mse_cosine_projection_and_mask():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(2, 5, 8, generator=g, dtype=torch.float64) for _ in range(2)]
    teacher = [torch.randn(2, 5, 8, generator=g, dtype=torch.float64) for _ in range(4)]
    layer_map = {0: 1, 1: 3}
    ref = (F.mse_loss(student[0], teacher[1]) + F.mse_loss(student[1], teacher[3])) / 2
    torch.testing.assert_close(hidden_state_loss(student, teacher, layer_map), ref)
    cos = 1 - F.cosine_similarity(student[0], teacher[1], dim=-1)
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    torch.testing.assert_close(hidden_state_loss(student, teacher, {0: 1}, kind="cosine", mask=mask), cos[mask].mean())
    wide = [torch.randn(2, 5, 12, generator=g, dtype=torch.float64) for _ in range(4)]
    with pytest.raises(ValueError, match="make_projections"):
        hidden_state_loss(student, wide, layer_map)
    proj = make_projections(layer_map, 8, 12).double()
    loss = hidden_state_loss([x.requires_grad_() for x in student], wide, layer_map, projections=proj)
    loss.backward()
    assert proj["0"].weight.grad is not None and student[0].grad is not None
    with pytest.raises(ValueError, match="out of range"):
        hidden_state_loss(student, teacher, {2: 0})


def test_chunked_bfloat16_inputs_upcast_per_chunk():
    hs, ws, ht, wt = _hidden_case(40, 16, 16, 64, torch.float32, seed=4)
    hs, ws, ht, wt = (x.detach().bfloat16() for x in (hs, ws, ht, wt))
    ref = _value_and_grads(naive_distill_loss, hs, ws, ht, wt, kind="reverse_kl")
    got = _value_and_grads(chunked_distill_loss, hs, ws, ht, wt, kind="reverse_kl", chunk_size=16)
    assert got[0].dtype == torch.float32 and got[1].dtype == got[2].dtype == torch.bfloat16
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=1e-6)
    for a, b in zip(got[1:], ref[1:]):
        torch.testing.assert_close(a.float(), b.float(), rtol=2e-2, atol=1e-3)

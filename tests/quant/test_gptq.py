"""GPTQ maths on small matrices with synthetic Hessians."""

from __future__ import annotations

import pytest
import torch

from compressor.algorithms.quant.gptq import gptq_quantize, refit_scales
from compressor.algorithms.hessian import HessianAccumulator
from compressor.core.scheme import QuantScheme, compute_qparams, dequantize, fake_quant, quantize


def _problem(n=16, k=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    mix = torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(512, k, generator=g) @ (torch.eye(k) + 2 * mix)  # correlated inputs
    x[:, 5] *= 6  # a salient channel
    acc = HessianAccumulator(k)
    for chunk in x.split(100):
        acc.add(chunk)
    return w, acc.H, x


def _output_error(w, q, x):
    return ((x @ (w - q).t()) ** 2).sum().item()


@pytest.mark.parametrize("gs,sym,actorder", [(16, False, "none"), (16, True, "static"), (-1, False, "static"),
                                             (20, False, "group"), (16, False, "group"), (-1, True, "none")])
def test_beats_round_to_nearest(gs, sym, actorder):
    scheme = QuantScheme(bits=3, group_size=gs, symmetric=sym)
    for seed in range(3):
        w, H, x = _problem(seed=seed)
        res = gptq_quantize(w, H, scheme, block_size=32, actorder=actorder)
        rtn = fake_quant(w, compute_qparams(w, scheme), scheme)
        assert _output_error(w, res.weight, x) < 0.8 * _output_error(w, rtn, x)


def test_hessian_accumulator_matches_definition():
    w, H, x = _problem()
    torch.testing.assert_close(H, 2 * x.t() @ x / x.shape[0], rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="NaN"):
        HessianAccumulator(4).add(torch.tensor([[1.0, float("nan"), 0, 0]]))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("column", [0, 5, 39])
def test_hessian_accumulator_refuses_a_non_finite_input_anywhere(bad, column):
    """The check reads H's diagonal after each batch: any NaN / inf input, in any slab, in a later batch."""
    acc = HessianAccumulator(40, slab=8)  # 40 > 2 * 8: upper-triangle slabs
    acc.add(torch.randn(3, 5, 40))
    x = torch.randn(2, 5, 40)
    x[1, 3, column] = bad
    with pytest.raises(ValueError, match="NaN/inf"):
        acc.add(x)


@pytest.mark.parametrize("gs", [8, -1])
def test_identity_hessian_reduces_to_rtn(gs):
    torch.manual_seed(0)
    w = torch.randn(6, 24)
    scheme = QuantScheme(bits=4, group_size=gs)
    res = gptq_quantize(w, torch.eye(24), scheme, dampening=0.0)
    assert torch.equal(res.codes, quantize(w, compute_qparams(w, scheme), scheme))


@pytest.mark.parametrize("actorder", ["none", "static", "group"])
def test_result_is_on_its_grid_with_ragged_groups(actorder):
    w, H, _ = _problem(n=8, k=40)  # 40 = 16 + 16 + 8
    scheme = QuantScheme(bits=4, group_size=16)
    res = gptq_quantize(w, H, scheme, actorder=actorder)
    assert res.qparams.scale.shape == (8, 3)
    assert torch.equal(dequantize(res.codes, res.qparams, scheme, res.g_idx), res.weight)
    assert torch.equal(quantize(res.weight, res.qparams, scheme, res.g_idx), res.codes)
    if actorder == "group":
        assert res.g_idx is not None and sorted(torch.bincount(res.g_idx.long()).tolist()) == [8, 16, 16]
        assert not torch.equal(res.g_idx.long(), torch.arange(40) // 16)  # really permuted
    else:
        assert res.g_idx is None


def test_dead_columns_become_zero():
    w, H, _ = _problem(n=4, k=16)
    H[3, :], H[:, 3] = 0, 0
    res = gptq_quantize(w, H, QuantScheme(bits=4, group_size=8))
    assert (res.weight[:, 3] == 0).all()


def test_bf16_weights_keep_dtype():
    w, H, _ = _problem(n=4, k=16)
    res = gptq_quantize(w.bfloat16(), H, QuantScheme(bits=4, group_size=8))
    assert res.weight.dtype == torch.bfloat16 and res.qparams.scale.dtype == torch.bfloat16
    assert torch.equal(dequantize(res.codes, res.qparams, QuantScheme(bits=4, group_size=8)), res.weight)


@pytest.mark.parametrize("kwargs,match", [({"actorder": "yes"}, "actorder"), ({"dampening": 1.5}, "dampening")])
def test_bad_arguments(kwargs, match):
    w, H, _ = _problem(n=4, k=16)
    with pytest.raises(ValueError, match=match):
        gptq_quantize(w, H, QuantScheme(bits=4, group_size=8), **kwargs)
    with pytest.raises(ValueError, match="shapes"):
        gptq_quantize(w, H[:8, :8], QuantScheme(bits=4, group_size=8))


def test_hessian_of_wide_inputs_is_symmetric_and_exact():
    x = torch.randn(3, 50, 70, dtype=torch.float64).float()
    slabbed, full = HessianAccumulator(70, slab=16), HessianAccumulator(70, slab=1000)
    for part in x:
        slabbed.add(part)
        full.add(part)
    expected = 2 * x.reshape(-1, 70).double().t() @ x.reshape(-1, 70).double() / 150
    assert slabbed.slab == 16 and full.slab == 70
    torch.testing.assert_close(slabbed.H.double(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(slabbed.H, full.H, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(slabbed.H, slabbed.H.t())


def test_cross_term_accumulates_its_definition():
    g = torch.Generator().manual_seed(4)
    xq, xf = torch.randn(300, 12, generator=g), torch.randn(300, 12, generator=g)
    acc = HessianAccumulator(12)
    for a, b in zip(xq.split(70), xf.split(70)):
        acc.add(a, b)
    torch.testing.assert_close(acc.C, 2 * (xf - xq).t() @ xq / 300, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="every batch or none"):
        acc.add(xq[:5])


def test_asymmetric_calibration_tracks_the_full_precision_output():
    """GPTAQ: with inputs X~ = X + earlier layers' error, the rounding targets W X, not W X~."""
    scheme = QuantScheme(bits=3, group_size=16)
    wins = 0
    for seed in range(4):
        w, _, x = _problem(seed=seed)
        g = torch.Generator().manual_seed(10 + seed)
        xq = x + 0.3 * x.std() * torch.randn(x.shape, generator=g) @ torch.randn(x.shape[1], x.shape[1], generator=g) / 7
        acc = HessianAccumulator(x.shape[1])
        acc.add(xq, x)
        plain = gptq_quantize(w, acc.H, scheme, block_size=16, actorder="static")
        asym = gptq_quantize(w, acc.H, scheme, block_size=16, actorder="static", cross=acc.C)
        zero = gptq_quantize(w, acc.H, scheme, block_size=16, actorder="static", cross=torch.zeros_like(acc.C))
        assert torch.equal(zero.weight, plain.weight)  # no asymmetry: plain GPTQ

        def err(q):
            return ((xq @ q.t() - x @ w.t()) ** 2).sum().item()

        wins += err(asym.weight) < err(plain.weight)
    assert wins == 4


@pytest.mark.parametrize("gs,sym,actorder", [(16, False, "static"), (20, True, "none"), (-1, False, "static"),
                                             (16, False, "group")])
def test_refit_scales_is_the_least_squares_solution(gs, sym, actorder):
    """Against brute force: per row, lstsq of X w^T on the columns X (q - z)|_g, one per group."""
    scheme = QuantScheme(bits=3, group_size=gs, symmetric=sym)
    w, H, x = _problem(seed=1)
    res = gptq_quantize(w, H, scheme, block_size=16, actorder=actorder)
    new = refit_scales(w, res.codes, res.qparams, scheme, H, g_idx=res.g_idx)
    k = w.shape[1]
    cols = res.g_idx.long() if res.g_idx is not None else torch.arange(k) // scheme.group_width(k)
    a = res.codes.double()
    if res.qparams.zero_point is not None:
        a = a - res.qparams.zero_point.double()[:, cols]
    for r in range(w.shape[0]):
        basis = torch.stack([x.double() @ (a[r] * (cols == j)) for j in range(new.scale.shape[1])], 1)  # (T, G)
        want = torch.linalg.lstsq(basis, x.double() @ w[r].double()).solution
        torch.testing.assert_close(new.scale[r].double(), want, rtol=1e-4, atol=1e-6)
    assert _output_error(w, dequantize(res.codes, new, scheme, res.g_idx), x) < _output_error(w, res.weight, x)


def test_refit_never_increases_the_error_and_keeps_the_grid():
    scheme = QuantScheme(bits=2, group_size=8)
    for seed in range(3):
        w, H, x = _problem(seed=seed)
        w[3] = 0.0  # a dead row: every code sits on the zero point
        plain = gptq_quantize(w, H, scheme, block_size=16, actorder="static", dtype=torch.float16)
        refit = gptq_quantize(w, H, scheme, block_size=16, actorder="static", dtype=torch.float16, refit=True)
        assert torch.equal(refit.codes, plain.codes) and torch.equal(refit.qparams.zero_point, plain.qparams.zero_point)
        assert refit.qparams.scale.dtype == torch.float16 and (refit.qparams.scale > 0).all()
        torch.testing.assert_close(refit.weight, dequantize(refit.codes, refit.qparams, scheme).to(torch.float16))
        e_plain, e_refit = (((x @ (w - r.weight.float()).t()) ** 2).sum(0) for r in (plain, refit))  # per row
        assert (e_refit <= e_plain * (1 + 1e-5)).all() and e_refit.sum() < e_plain.sum()


def test_refit_with_asymmetric_target_tracks_the_full_precision_output():
    scheme = QuantScheme(bits=3, group_size=16)
    w, _, x = _problem(seed=2)
    g = torch.Generator().manual_seed(3)
    xq = x + 0.3 * x.std() * torch.randn(x.shape, generator=g) @ torch.randn(x.shape[1], x.shape[1], generator=g) / 7
    acc = HessianAccumulator(x.shape[1])
    acc.add(xq, x)

    def err(q):
        return ((xq @ q.t() - x @ w.t()) ** 2).sum().item()

    asym = gptq_quantize(w, acc.H, scheme, block_size=16, actorder="static", cross=acc.C, cross_weight=1.0)
    refit = gptq_quantize(w, acc.H, scheme, block_size=16, actorder="static", cross=acc.C, cross_weight=1.0, refit=True)
    assert err(refit.weight) < err(asym.weight)


@pytest.mark.parametrize("gs", [8, 16, 32, 24, -1])
@pytest.mark.parametrize("variant", ["plain", "asymmetric", "masked"])
def test_sub_blocked_sweep_matches_the_column_by_column_sweep(gs, variant, monkeypatch):
    """The sweep's sub-blocks regroup eq. 4's sums; codes and loss match the one-column-at-a-time sweep
    (float32 rounding may move a rare code)."""
    import functools

    from compressor.algorithms.quant import gptq as gptq_mod

    g = torch.Generator().manual_seed(3)
    n, k = 24, 96
    x = torch.randn(256, k, generator=g) * torch.rand(k, generator=g) * 2
    H = 2 * x.t() @ x / x.shape[0]
    w = torch.randn(n, k, generator=g)
    kw = {}
    if variant == "asymmetric":
        xf = x + 0.1 * torch.randn(256, k, generator=g)
        kw["cross"] = 2 * (xf - x).t() @ x / x.shape[0]
    if variant == "masked":
        kw["mask"] = torch.rand(n, k, generator=g) > 0.3
    scheme = QuantScheme(bits=3, group_size=gs, symmetric=False)
    fast = gptq_quantize(w, H, scheme, block_size=64, **kw)
    slow_block = functools.partial(gptq_mod._block_columns, sub=10**9)
    monkeypatch.setattr(gptq_mod, "_block_columns", slow_block)
    slow = gptq_quantize(w, H, scheme, block_size=64, **kw)
    assert (fast.codes != slow.codes).float().mean() < 0.01
    assert fast.loss == pytest.approx(slow.loss, rel=1e-3)


@pytest.mark.parametrize("k, chunk", [(1, 256), (2, 1), (7, 3), (130, 32), (300, 256)])
@pytest.mark.parametrize("reorder", [False, True])
def test_inverse_cholesky_is_the_upper_factor_of_the_damped_inverse(k, chunk, reorder):
    """The reversed-order factorisation with its in-place blocked inverse and flip gives the upper factor of
    ``(H + lambda I)^-1`` (of the permuted H when a processing order is given), computed here in float64."""
    from compressor.algorithms.hessian import inverse_cholesky

    g = torch.Generator().manual_seed(k)
    X = torch.randn(max(2, k // 2), k, generator=g) * torch.rand(k, generator=g) ** 2  # rank-deficient, uneven
    H = X.t() @ X / k
    perm = torch.randperm(k, generator=g) if reorder else None
    U = inverse_cholesky(H, 0.01, perm, chunk=chunk)
    Hp = H.double() if perm is None else H.double()[perm][:, perm]
    Hp.diagonal().add_(0.01 * torch.diag(Hp).mean())
    ref = torch.linalg.cholesky(torch.linalg.inv(Hp), upper=True)
    assert U.dtype == torch.float32 and U.shape == (k, k)
    assert torch.equal(U, torch.triu(U)) and (torch.diag(U) > 0).all()
    assert (U.double() - ref).abs().max() <= 1e-5 * ref.abs().max()


def test_inverse_cholesky_raises_the_dampening_until_positive_definite(caplog):
    from compressor.algorithms.hessian import inverse_cholesky

    H = torch.tensor([[1.0, 3.0], [3.0, 1.0]])  # indefinite: eigenvalues 4 and -2
    U = inverse_cholesky(H, 0.01)
    assert "dampening raised to 10" in caplog.text  # 0.01 x 1000: mean diagonal 1 -> H + 10 I
    ref = torch.linalg.cholesky(torch.linalg.inv(H.double() + 10 * torch.eye(2)), upper=True)
    assert torch.allclose(U.double(), ref, atol=1e-6)
    with pytest.raises(ValueError, match="not positive definite"):
        inverse_cholesky(-torch.eye(3), 0.01)


def test_refit_solves_every_row_across_its_row_chunks():
    """The (G, G) systems are solved a few hundred rows at a time: rows on both sides of each chunk border
    still get their own least-squares scales."""
    scheme = QuantScheme(bits=3, group_size=16, symmetric=False)
    w, H, x = _problem(n=600, seed=2)
    res = gptq_quantize(w, H, scheme, block_size=16)
    new = refit_scales(w, res.codes, res.qparams, scheme, H)
    cols = torch.arange(w.shape[1]) // 16
    a = res.codes.double() - res.qparams.zero_point.double()[:, cols]
    for r in (0, 255, 256, 511, 512, 599):
        basis = torch.stack([x.double() @ (a[r] * (cols == j)) for j in range(new.scale.shape[1])], 1)  # (T, G)
        want = torch.linalg.lstsq(basis, x.double() @ w[r].double()).solution
        torch.testing.assert_close(new.scale[r].double(), want, rtol=1e-4, atol=1e-6)

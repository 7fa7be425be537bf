"""QuantScheme maths against a brute-force reference."""

from __future__ import annotations

import itertools

import pytest
import torch

from compressor.core.scheme import QParams, QuantScheme, compute_qparams, dequantize, fake_quant, quantize


def _groups(k: int, gs: int):
    width = k if gs == -1 else gs
    return [(s, min(s + width, k)) for s in range(0, k, width)]


def brute_qparams(w: torch.Tensor, scheme: QuantScheme):
    """Loop over rows and groups in float64, the textbook formulas."""
    n, k = w.shape
    levels = 2**scheme.bits - 1
    scales, zps = [], []
    for i in range(n):
        srow, zrow = [], []
        for a, b in _groups(k, scheme.group_size):
            g = w[i, a:b].double()
            lo, hi = g.min().item(), g.max().item()
            if scheme.symmetric:
                srow.append(max(abs(lo), abs(hi)) / (levels / 2))
                zrow.append(0.0)
            else:
                lo, hi = min(lo, 0.0), max(hi, 0.0)
                s = (hi - lo) / levels
                srow.append(s)
                zrow.append(min(max(round(scheme.qmin - lo / s), scheme.qmin), scheme.qmax))
        scales.append(srow)
        zps.append(zrow)
    return torch.tensor(scales, dtype=torch.float64), torch.tensor(zps, dtype=torch.float64)


def brute_nearest(w: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, scheme: QuantScheme) -> torch.Tensor:
    """Nearest representable grid point of every weight, by enumerating all codes."""
    n, k = w.shape
    out = torch.empty_like(w, dtype=torch.float64)
    codes = torch.arange(scheme.qmin, scheme.qmax + 1, dtype=torch.float64)
    for i in range(n):
        for gi, (a, b) in enumerate(_groups(k, scheme.group_size)):
            grid = (codes - zp[i, gi]) * scale[i, gi]  # (levels,)
            d = (w[i, a:b].double()[:, None] - grid[None, :]).abs()
            out[i, a:b] = grid[d.argmin(dim=1)]
    return out


CASES = list(itertools.product([2, 3, 4, 8], [8, 24, -1], [True, False]))


@pytest.mark.parametrize("bits,gs,sym", CASES)
def test_minmax_matches_brute_force(bits, gs, sym):
    torch.manual_seed(bits * 100 + gs)
    w = torch.randn(5, 40, dtype=torch.float64) * 0.1  # 40 = 24 + 16: ragged last group at gs=24
    w[0, :8] += 0.5  # a group entirely positive: the range must be widened to include 0
    scheme = QuantScheme(bits=bits, group_size=gs, symmetric=sym)
    qp = compute_qparams(w, scheme)
    scale, zp = brute_qparams(w, scheme)
    torch.testing.assert_close(qp.scale, scale, rtol=1e-12, atol=0)
    if not sym:
        assert torch.equal(qp.zero_point, zp)
    fq = fake_quant(w, qp, scheme)
    ref = brute_nearest(w, qp.scale, qp.zero_point if not sym else torch.zeros_like(qp.scale), scheme)
    # same distance to the grid (an exact tie, e.g. at the symmetric absmax, may pick either neighbour)
    torch.testing.assert_close((fq - w).abs(), (ref - w).abs(), rtol=0, atol=1e-12)
    assert ((fq - ref).abs() > 1e-12).float().mean() < 0.02


@pytest.mark.parametrize("sym", [True, False])
def test_codes_in_range_and_dequantize_inverts(sym):
    torch.manual_seed(0)
    w = torch.randn(7, 50)
    scheme = QuantScheme(bits=3, group_size=16, symmetric=sym)
    qp = compute_qparams(w, scheme)
    q = quantize(w, qp, scheme)
    assert q.dtype == torch.int8 and q.min() >= scheme.qmin and q.max() <= scheme.qmax
    w_hat = dequantize(q, qp, scheme)
    assert torch.equal(quantize(w_hat, qp, scheme), q)  # on-grid weights re-quantize to the same codes


@pytest.mark.parametrize("sym", [True, False])
def test_mse_observer_never_worse_than_minmax(sym):
    torch.manual_seed(1)
    w = torch.randn(16, 64)
    w[:, 3] *= 8  # outliers make clipping worthwhile
    base = QuantScheme(bits=3, group_size=32, symmetric=sym)
    mse = QuantScheme(bits=3, group_size=32, symmetric=sym, observer="mse", mse_grid=40)
    e_minmax = (fake_quant(w, compute_qparams(w, base), base) - w).abs().pow(2.4).view(16, 2, 32).sum(-1)
    e_mse = (fake_quant(w, compute_qparams(w, mse), mse) - w).abs().pow(2.4).view(16, 2, 32).sum(-1)
    assert (e_mse <= e_minmax * (1 + 1e-5)).all()
    assert e_mse.sum() < 0.97 * e_minmax.sum()


def test_float_zero_point_reproduces_an_affine_grid_exactly():
    # GGUF Q4_1-style data: x = min + d * q with a float min that is not a multiple of d
    torch.manual_seed(2)
    # powers-of-two steps keep the synthetic grid exact in fp32 (the real SmolLM2 case is in test_smollm2.py)
    d = 2.0 ** -torch.randint(3, 8, (6, 3, 1)).float()
    lo = -torch.randint(1, 2**12, (6, 3, 1)).float() * 2.0**-14
    q = torch.randint(0, 16, (6, 3, 32)).float()
    q[..., 0], q[..., 1] = 0, 15
    w = (d * q + lo).reshape(6, 96)
    exact = QuantScheme(bits=4, group_size=32, zero_point="float")
    assert torch.equal(fake_quant(w, compute_qparams(w, exact), exact), w)
    integer = QuantScheme(bits=4, group_size=32)
    assert (fake_quant(w, compute_qparams(w, integer), integer) - w).abs().max() > 0


def test_all_zero_group_is_safe():
    w = torch.zeros(2, 16)
    for sym in (True, False):
        scheme = QuantScheme(bits=4, group_size=8, symmetric=sym)
        qp = compute_qparams(w, scheme)
        assert (qp.scale > 0).all()
        assert torch.equal(fake_quant(w, qp, scheme), w)


def test_g_idx_permuted_groups_match_reordered_matrix():
    torch.manual_seed(3)
    w = torch.randn(4, 24)
    perm = torch.randperm(24)
    scheme = QuantScheme(bits=4, group_size=8)
    qp = compute_qparams(w[:, perm], scheme)  # groups over the permuted columns
    g_idx = torch.empty(24, dtype=torch.long)
    g_idx[perm] = torch.arange(24) // 8
    assert torch.equal(fake_quant(w, qp, scheme, g_idx)[:, perm], fake_quant(w[:, perm], qp, scheme))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"bits": 1}, "bits=1"),
        ({"bits": 9}, "bits=9"),
        ({"group_size": 0}, "group_size=0"),
        ({"group_size": -2}, "group_size=-2"),
        ({"observer": "percentile"}, "observer"),
        ({"zero_point": "half"}, "zero_point"),
    ],
)
def test_bad_schemes_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        QuantScheme(**kwargs)


def test_group_larger_than_width_and_nan_are_rejected():
    with pytest.raises(ValueError, match="exceeds in_features=16"):
        compute_qparams(torch.randn(2, 16), QuantScheme(group_size=32))
    w = torch.randn(2, 16)
    w[1, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        compute_qparams(w, QuantScheme(group_size=8))


def test_bits_per_weight():
    # 4 bits + (16-bit scale + 4-bit zero point) / 64
    assert QuantScheme(bits=4, group_size=64).bits_per_weight(576) == pytest.approx(4 + 9 * 20 / 576)
    assert QuantScheme(bits=4, group_size=-1, symmetric=True).bits_per_weight(576) == pytest.approx(4 + 16 / 576)


def test_qparams_dtype_follows_weight():
    w = torch.randn(3, 16, dtype=torch.bfloat16)
    qp = compute_qparams(w, QuantScheme(group_size=8))
    assert qp.scale.dtype == torch.bfloat16 and isinstance(qp, QParams)

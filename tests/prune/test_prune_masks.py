"""Scores and masks: exact counts per row / layer / N:M group, the N:M convention, Wanda's statistics."""

from __future__ import annotations

import pytest
import torch

from compressor.algorithms.prune.masks import is_nm, nm_mask, parse_structure, prune_count, select_mask
from compressor.algorithms.prune.scores import InputNormAccumulator, input_norms_from_hessian, magnitude_scores, wanda_scores
from compressor.algorithms.hessian import HessianAccumulator


def _scores(n=7, k=40, seed=0):
    return torch.rand(n, k, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sparsity,k", [(0.5, 40), (0.3, 40), (0.29, 100), (0.0, 40), (0.7, 10), (0.99, 100)])
def test_row_scope_prunes_exactly_floor_per_row(sparsity, k):
    s = _scores(k=k)
    mask = select_mask(s, sparsity, "row")
    assert mask.dtype == torch.bool and mask.shape == s.shape
    assert ((~mask).sum(1) == prune_count(k, sparsity)).all()
    # the pruned ones are the lowest of their row
    for row, m in zip(s, mask):
        if (~m).any():
            assert row[~m].max() <= row[m].min()


def test_prune_count_reads_the_decimal():
    assert prune_count(100, 0.29) == 29 and prune_count(10, 0.7) == 7 and prune_count(7, 0.5) == 3
    assert prune_count(2**31, 0.5) == 2**30


def test_layer_scope_prunes_the_lowest_of_the_matrix():
    s = _scores()
    mask = select_mask(s, 0.6, "layer")
    assert (~mask).sum() == prune_count(s.numel(), 0.6)
    assert s[~mask].max() <= s[mask].min()
    assert (~mask).sum(1).unique().numel() > 1  # rows differ: really one comparison group


@pytest.mark.parametrize("structure,kept", [("2:4", 2), ("4:8", 4), ("1:4", 1), ("3:4", 3)])
def test_nm_keeps_exactly_n_of_every_m(structure, kept):
    n, m = parse_structure(structure)
    assert n == kept  # the convention: N is the number KEPT
    s = _scores(k=64)
    mask = select_mask(s, structure)
    assert is_nm(mask, n, m)
    assert (~mask).float().mean().item() == pytest.approx(1 - n / m)
    groups, gm = s.reshape(7, -1, m), mask.reshape(7, -1, m)
    top = groups.topk(n, dim=2).indices
    assert torch.equal(gm, torch.zeros_like(gm).scatter_(2, top, True))  # the kept ones are each group's largest


def test_nm_on_ties_is_still_exact():
    mask = nm_mask(torch.ones(3, 16), 2, 4)
    assert is_nm(mask, 2, 4)


@pytest.mark.parametrize("bad", ["5:4", "4:4", "0:4", "2-4", "2:4:8"])
def test_bad_structures_name_the_fix(bad):
    with pytest.raises(ValueError, match="2:4"):
        parse_structure(bad)


def test_width_not_multiple_of_m_is_refused():
    with pytest.raises(ValueError, match="multiple of M=8"):
        select_mask(_scores(k=20), "4:8")


@pytest.mark.parametrize("bad", [1.5, 1.0, -0.1])
def test_bad_sparsity(bad):
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        select_mask(_scores(), bad)


def test_non_finite_inputs_raise():
    w = torch.randn(4, 8)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        magnitude_scores(w)
    with pytest.raises(ValueError, match="NaN"):
        wanda_scores(w, torch.ones(8))
    s = _scores()
    s[0, 0] = float("inf")
    with pytest.raises(ValueError, match="NaN/inf"):
        select_mask(s, 0.5)


def test_wanda_equals_magnitude_when_input_norms_are_equal():
    w = torch.randn(6, 32, generator=torch.Generator().manual_seed(1))
    for structure in (0.5, "2:4"):
        assert torch.equal(select_mask(wanda_scores(w, torch.full((32,), 3.7)), structure, "row"),
                           select_mask(magnitude_scores(w), structure, "row"))


def test_wanda_weighs_columns_by_input_norm():
    w = torch.ones(2, 4)
    mask = select_mask(wanda_scores(w, torch.tensor([1.0, 4.0, 2.0, 3.0])), 0.5, "row")
    assert mask.tolist() == [[False, True, False, True]] * 2


def test_norm_accumulator_matches_the_hessian_diagonal():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 24, generator=g) * torch.linspace(0.1, 5, 24)
    norms, hess = InputNormAccumulator(24), HessianAccumulator(24)
    for chunk in x.split(70):
        norms.add(chunk)
        hess.add(chunk)
    torch.testing.assert_close(norms.sq, torch.diagonal(hess.H), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(input_norms_from_hessian(hess.H), x.norm(dim=0) * (2 / 300) ** 0.5, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="NaN"):
        norms.add(torch.full((2, 24), float("nan")))

"""Hadamard constructions (Sylvester x Paley I/II), the fast transform and the online module."""

from __future__ import annotations

import pytest
import torch

from compressor.core.hadamard import (
    fwht,
    hadamard_factors,
    hadamard_matrix,
    hadamard_transform,
    normalized_hadamard,
    random_hadamard,
    supported_bases,
)
from compressor.runtime.online import OnlineHadamard

# 28 = Paley I over GF(27), 52 = Paley II over GF(25): the extension-field paths
SIZES = [1, 2, 4, 8, 12, 16, 20, 28, 32, 36, 40, 44, 48, 52, 60, 64, 80, 96, 128, 256, 576, 1024, 1536, 2048]


@pytest.mark.parametrize("n", SIZES)
def test_hadamard_rows_are_orthogonal(n):
    h = hadamard_matrix(n, dtype=torch.float32)  # ±1 sums up to 2048 are exact in float32
    assert torch.equal(h.abs(), torch.ones(n, n))
    assert torch.equal(h @ h.T, n * torch.eye(n))


def test_every_listed_base_is_hadamard():
    bases = supported_bases()
    assert {12, 20, 28, 36, 44, 52, 60} <= set(bases)
    for m in bases:
        h = hadamard_matrix(m, dtype=torch.float32)
        assert torch.equal(h @ h.T, m * torch.eye(m)), m


def test_smollm2_widths_factor():
    assert hadamard_factors(576) == (16, 36)
    assert hadamard_factors(1536) == (128, 12)
    assert hadamard_factors(2048) == (2048, 1)


@pytest.mark.parametrize("n", [3, 9, 92, 6 * 7])
def test_unsupported_size_names_the_supported_ones(n):
    with pytest.raises(ValueError, match=r"no Hadamard matrix construction for size \d+: supported sizes are 2\^a \* m"):
        hadamard_matrix(n)


@pytest.mark.parametrize("bad", [0, -4, 2.0, True])
def test_bad_size(bad):
    with pytest.raises(ValueError, match="positive integer"):
        hadamard_factors(bad)


def test_random_hadamard_is_orthogonal_and_seeded():
    a, b, c = random_hadamard(48, seed=3), random_hadamard(48, seed=3), random_hadamard(48, seed=4)
    torch.testing.assert_close(a @ a.T, torch.eye(48, dtype=torch.float64), rtol=0, atol=1e-12)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.allclose(a.abs(), normalized_hadamard(48).abs())


def test_integer_dtype_rejected():
    with pytest.raises(ValueError, match="floating dtype"):
        hadamard_matrix(8, dtype=torch.int32)


@pytest.mark.parametrize("n", [1, 2, 8, 64, 128, 256, 1024, 2048, 4096])
def test_fwht_matches_dense(n):
    x = torch.randn(3, 2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(fwht(x), x @ hadamard_matrix(n), rtol=0, atol=1e-10)


@pytest.mark.parametrize("n", [2**15, 2**16])  # three Sylvester factors: too big for a dense reference
def test_fwht_matches_the_butterfly(n):
    x = torch.randn(2, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    y, h = x.clone(), 1
    while h < n:  # the textbook butterfly: pairs (i, i + h) inside blocks of 2h
        y = y.view(-1, n // (2 * h), 2, h)
        y = torch.stack((y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]), dim=2)
        h *= 2
    torch.testing.assert_close(fwht(x), y.reshape(x.shape), rtol=0, atol=1e-9)
    assert fwht(x.float()).dtype == torch.float32


def test_fwht_rejects_non_power_of_two():
    with pytest.raises(ValueError, match="hadamard_transform"):
        fwht(torch.zeros(2, 12))


@pytest.mark.parametrize("n", [12, 48, 80, 96, 576, 1536])
def test_hadamard_transform_matches_dense(n):
    x = torch.randn(2, 3, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    torch.testing.assert_close(hadamard_transform(x), x @ normalized_hadamard(n).T, rtol=0, atol=1e-12)
    torch.testing.assert_close(hadamard_transform(x, normalize=False), x @ hadamard_matrix(n).T, rtol=0, atol=1e-10)


def test_online_module():
    mod = OnlineHadamard(96)
    q = mod.matrix()
    torch.testing.assert_close(q @ q.T, torch.eye(96, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(4, 96)
    torch.testing.assert_close(mod(x), (x.double() @ q).float(), rtol=0, atol=1e-5)
    assert mod(x.bfloat16()).dtype == torch.bfloat16
    assert mod.state_dict() == {}  # nothing to save: the matrix is a construction
    with pytest.raises(ValueError, match="last dim 95"):
        mod(torch.zeros(1, 95))

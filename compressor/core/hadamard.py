"""Hadamard matrices and the fast Walsh-Hadamard transform (pure tensor functions).

A Hadamard matrix H (n, n) has entries ±1 and H Hᵀ = n I, so H / √n is
orthogonal. Sizes here are ``n = 2^a * m``::

    H_n = kron(H_{2^a}, H_m)

with ``H_{2^a}`` Sylvester's (symmetric, applied in O(n log n) by the
butterfly) and ``H_m`` from Paley's constructions over a finite field GF(q):

* Paley I:  q ≡ 3 (mod 4) a prime power, m = q + 1;
* Paley II: q ≡ 1 (mod 4) a prime power, m = 2 (q + 1).

Hadamard rotations spread activation outliers over all channels
(QuaRot, arXiv 2404.00456, §3; SpinQuant, arXiv 2405.16406, §3.1). SmolLM2's
widths factor as 576 = 2^4 * 36 (Paley II, q = 17) and 1536 = 2^7 * 12 (Paley I,
q = 11).
"""

from __future__ import annotations

import functools
import math

import torch

__all__ = [
    "hadamard_factors",
    "paley_matrix",
    "supported_bases",
    "hadamard_matrix",
    "normalized_hadamard",
    "random_hadamard",
    "random_signs",
    "fwht",
    "hadamard_transform",
]

_MAX_BASE = 256  # largest dense Paley factor m; the rest of n must be a power of two


# ---------------------------------------------------------------- finite fields


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with q = p^k for a prime p, or None."""
    if q < 2:
        return None
    p = next(d for d in range(2, q + 1) if q % d == 0)  # smallest divisor is prime
    k, r = 0, q
    while r % p == 0:
        r //= p
        k += 1
    return (p, k) if r == 1 else None


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """Remainder of a by the monic f over GF(p); coefficients low → high."""
    a = [c % p for c in a]
    k = len(f) - 1
    for i in range(len(a) - 1, k - 1, -1):
        c = a[i]
        if c:
            for j in range(k + 1):
                a[i - k + j] = (a[i - k + j] - c * f[j]) % p
    return (a + [0] * k)[:k]


def _monic_polys(p: int, d: int):
    for code in range(p**d):
        yield [(code // p**i) % p for i in range(d)] + [1]


def _irreducible(p: int, k: int) -> list[int]:
    """A monic irreducible polynomial of degree k over GF(p) (no monic factor of degree ≤ k/2)."""
    for f in _monic_polys(p, k):
        if all(any(_poly_mod(f, g, p)) for d in range(1, k // 2 + 1) for g in _monic_polys(p, d)):
            return f
    raise ValueError(f"no irreducible polynomial of degree {k} over GF({p})")  # unreachable: one always exists


def _field(q: int) -> tuple[list[tuple[int, ...]], set[tuple[int, ...]]]:
    """Elements of GF(q) (coefficient tuples) and the set of nonzero squares."""
    p, k = _prime_power(q)
    elems = [tuple((c // p**i) % p for i in range(k)) for c in range(q)]
    if k == 1:
        squares = {((x * x) % p,) for x in range(1, p)}
    else:
        f = _irreducible(p, k)
        squares = set()
        for e in elems[1:]:
            prod = [0] * (2 * k - 1)
            for i, a in enumerate(e):
                for j, b in enumerate(e):
                    prod[i + j] += a * b
            squares.add(tuple(_poly_mod(prod, f, p)))
    return elems, squares


def _jacobsthal(q: int) -> list[list[int]]:
    """Q[i][j] = χ(a_i − a_j), χ the quadratic character of GF(q) (q odd)."""
    p = _prime_power(q)[0]
    elems, squares = _field(q)
    zero = elems[0]

    def chi(d: tuple[int, ...]) -> int:
        return 0 if d == zero else (1 if d in squares else -1)

    return [[chi(tuple((x - y) % p for x, y in zip(a, b))) for b in elems] for a in elems]


# ---------------------------------------------------------------- constructions


def _paley_kind(m: int) -> str | None:
    """Which Paley construction gives a Hadamard matrix of order m (or None)."""
    if m % 4:
        return None
    pk = _prime_power(m - 1)
    if pk and pk[0] != 2 and (m - 1) % 4 == 3:
        return "I"
    q = m // 2 - 1
    pk = _prime_power(q)
    if pk and pk[0] != 2 and q % 4 == 1:
        return "II"
    return None


@functools.lru_cache(maxsize=None)
def paley_matrix(m: int) -> torch.Tensor:
    """Unnormalized Paley Hadamard matrix of order m, int8 (m, m). Cached: callers copy."""
    kind = _paley_kind(m)
    if kind == "I":  # H = I + [[0, 1ᵀ], [−1, Q]], Q antisymmetric (q ≡ 3 mod 4)
        q = m - 1
        jac = torch.tensor(_jacobsthal(q), dtype=torch.int64)
        s = torch.zeros(m, m, dtype=torch.int64)
        s[0, 1:], s[1:, 0], s[1:, 1:] = 1, -1, jac
        h = torch.eye(m, dtype=torch.int64) + s
    elif kind == "II":  # C = [[0, 1ᵀ], [1, Q]] symmetric; 0 → [[1, −1], [−1, −1]], ±1 → ±[[1, 1], [1, −1]]
        q = m // 2 - 1
        c = torch.zeros(q + 1, q + 1, dtype=torch.int64)
        c[0, 1:], c[1:, 0], c[1:, 1:] = 1, 1, torch.tensor(_jacobsthal(q), dtype=torch.int64)
        h = torch.kron(c, torch.tensor([[1, 1], [1, -1]])) + torch.kron((c == 0).long(), torch.tensor([[1, -1], [-1, -1]]))
    else:
        raise ValueError(f"no Paley construction for order {m}")
    return h.to(torch.int8)


def supported_bases(limit: int = _MAX_BASE) -> list[int]:
    """The odd-part factors m ≤ ``limit`` (besides 1) that sizes ``2^a * m`` may use.

    Power-of-two multiples of a listed base are covered by the power-of-two part
    and are not repeated (40 = 2 * 20, 80 = 4 * 20).
    """
    return [m for m in range(4, min(limit, _MAX_BASE) + 1, 4) if _paley_kind(m) and hadamard_factors(m) == (1, m)]


@functools.lru_cache(maxsize=None)
def hadamard_factors(n: int) -> tuple[int, int]:
    """Split n = p * m with p = 2^a as large as possible and H_m constructible.

    Returns:
        ``(p, m)``; m = 1 for powers of two.

    Raises:
        ValueError: n has no such factorization; the message lists the bases.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"Hadamard size must be a positive integer, got {n!r}")
    p = n & -n  # largest power of two dividing n
    while p >= 1:
        m = n // p
        if m == 1 or (m <= _MAX_BASE and _paley_kind(m)):
            return p, m
        p //= 2
    raise ValueError(
        f"no Hadamard matrix construction for size {n}: supported sizes are 2^a * m with m in "
        f"{[1] + supported_bases()} (e.g. 576 = 16 * 36, 1536 = 128 * 12); pick a rotation of another kind "
        "(r1='random') or a model with such widths"
    )


def _check_dtype(dtype: torch.dtype) -> None:
    if not dtype.is_floating_point:
        raise ValueError(f"dtype must be a floating dtype (float32 or float64), got {dtype}")


def hadamard_matrix(n: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Unnormalized Hadamard matrix H (n, n) with H Hᵀ = n I, H = kron(H_{2^a}, H_m).

    Args:
        n: size, ``2^a * m`` (see :func:`hadamard_factors`).
        dtype: floating dtype of the result.

    Returns:
        (n, n) tensor of ±1 in ``dtype``.
    """
    _check_dtype(dtype)
    p, m = hadamard_factors(n)
    h = torch.ones(1, 1, dtype=dtype)
    h2 = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=dtype)
    for _ in range(p.bit_length() - 1):  # Sylvester: H_{2p} = kron(H_2, H_p)
        h = torch.kron(h2, h)
    return torch.kron(h, paley_matrix(m).to(dtype)) if m > 1 else h


def normalized_hadamard(n: int, *, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthogonal H / √n, (n, n) in ``dtype``."""
    return hadamard_matrix(n, dtype=dtype) / math.sqrt(n)


def random_hadamard(n: int, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Randomized Hadamard H diag(s) / √n with seeded random signs s ∈ {±1}^n (QuaRot, arXiv 2404.00456, §3).

    Returns:
        (n, n) orthogonal matrix in ``dtype``; the same seed gives the same matrix.
    """
    return normalized_hadamard(n, dtype=dtype) * random_signs(n, seed=seed, dtype=dtype)[None, :]


def random_signs(n: int, *, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The seeded signs s ∈ {±1}^n, (n,) in ``dtype``, of :func:`random_hadamard`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).to(dtype) * 2 - 1


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform along the last dim: x @ H_n (Sylvester, symmetric).

    Sylvester's H_n is the Kronecker product of smaller Sylvester matrices, H_n = H_{n_1} ⊗ ... ⊗ H_{n_k}, so
    x @ H_n is k small dense products, one per axis of x viewed as (..., n_1, ..., n_k), with n_i ≤ 128
    (:func:`_sylvester_factors`): about 2 (n_1 + ... + n_k) multiply-adds per element, e.g. 192 at n = 2048,
    through matmul, which runs 5-10x faster on a CPU than the log2(n) add / subtract passes of the butterfly
    (and than the dense (n, n) product).

    Args:
        x: (..., n) floating tensor, n a power of two.

    Returns:
        (..., n) tensor of the same dtype.
    """
    n = x.shape[-1]
    if n < 1 or n & (n - 1):
        raise ValueError(f"fwht needs a power-of-two last dim, got {n}; use hadamard_transform for 2^a * m sizes")
    shape = x.shape
    y = x.reshape(-1, n)
    after = n  # the size of the axes after the current one
    for size in _sylvester_factors(n):
        after //= size
        h = _sylvester(size, y.dtype, y.device)  # (size, size), symmetric
        # (B, size, after): the current axis, with every axis before it folded into B
        y = y.reshape(-1, size) @ h if after == 1 else torch.matmul(h, y.reshape(-1, size, after))
    return y.reshape(shape)


_MAX_SYLVESTER_FACTOR_LOG2 = 7  # dense factors of at most 128: more multiply-adds per element than they save passes


def _sylvester_factors(n: int) -> list[int]:
    """Powers of two of near-equal size, each at most 128, whose product is n (``[]`` for n = 1)."""
    a = n.bit_length() - 1
    if a == 0:
        return []
    k = -(-a // _MAX_SYLVESTER_FACTOR_LOG2)
    base, extra = divmod(a, k)
    return [1 << (base + (1 if i < extra else 0)) for i in range(k)]


_SYLVESTER: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}


def _sylvester(n: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Sylvester's H_n (:func:`hadamard_matrix` of a power of two ≤ 128) in ``dtype`` on ``device``, cached."""
    key = (n, dtype, device)
    if key not in _SYLVESTER:
        _SYLVESTER[key] = hadamard_matrix(n, dtype=torch.float64).to(dtype=dtype, device=device)
    return _SYLVESTER[key]


def hadamard_transform(x: torch.Tensor, *, base: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
    """x @ H_nᵀ (/ √n when ``normalize``) along the last dim, H_n = kron(H_{2^a}, H_m).

    The power-of-two factor runs as a butterfly (:func:`fwht`), the m factor as
    a dense (m, m) matmul: O(n log n + n m) per row instead of O(n²).

    Args:
        x: (..., n) floating tensor.
        base: the unnormalized H_m (m, m) in x's dtype and device, to skip
            rebuilding it on every call; built from n when None.
        normalize: divide by √n (orthogonal transform).

    Returns:
        (..., n) tensor, same dtype as x.
    """
    n = x.shape[-1]
    p, m = hadamard_factors(n)
    if m > 1:
        if base is None:
            base = paley_matrix(m).to(device=x.device, dtype=x.dtype)
        if base.shape != (m, m):
            raise ValueError(f"base must be the ({m}, {m}) Hadamard factor of size {n}, got {tuple(base.shape)}")
        y = x.reshape(*x.shape[:-1], p, m) @ base.T  # (..., p, m)
        y = fwht(y.transpose(-1, -2)).transpose(-1, -2)  # butterfly over the p axis
        y = y.reshape(x.shape)
    else:
        y = fwht(x)
    return y / math.sqrt(n) if normalize else y

"""Orthonormal Hadamard matrices of the orders that transformer widths take (2^k times a small factor).

Constructions: Sylvester for powers of two, Paley I (order q+1, q ≡ 3 mod 4 a prime power) and
Paley II (order 2(q+1), q ≡ 1 mod 4 a prime power), and Kronecker products of these. The result
for a given order is deterministic: a saved artifact records only the size of an online
transform and rebuilds the same matrix from it.
"""

from __future__ import annotations

from functools import cache

import numpy as np
import torch

from qavtp.errors import QavtpError


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _prime_power(q: int) -> tuple[int, int] | None:
    """``(p, k)`` with ``q = p**k`` for a prime ``p``, or None."""
    if q < 2:
        return None
    p = 2
    while p * p <= q:
        if q % p == 0:
            break
        p += 1
    else:
        return q, 1
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _field_ok(q: int) -> bool:
    # Prime powers p^k with k > 3 would need a general irreducibility test; the orders that
    # model widths need are covered by primes and small powers (9, 25, 27, 49, ...).
    pk = _prime_power(q)
    return pk is not None and pk[1] <= 3


def _quadratic_character(q: int) -> tuple[np.ndarray, np.ndarray]:
    """For GF(q): the table ``chi[a]`` (0, +1, -1) and the difference table ``diff[a, b] = a - b``.

    Elements are integers 0..q-1 read as base-p digit vectors (polynomial coefficients).
    """
    p, k = _prime_power(q)  # type: ignore[misc]
    digits = np.array([[(a // p**i) % p for i in range(k)] for a in range(q)], dtype=np.int64)
    weights = p ** np.arange(k, dtype=np.int64)
    diff = ((digits[:, None, :] - digits[None, :, :]) % p) @ weights
    if k == 1:
        squares = {(a * a) % p for a in range(1, p)}
    else:
        # GF(p^k) = GF(p)[x] / f with f monic of degree k and no root in GF(p): for k <= 3 having
        # no root is equivalent to being irreducible.
        f = None
        for tail in range(p**k):
            coeffs = [(tail // p**i) % p for i in range(k)] + [1]
            if all(sum(c * x**i for i, c in enumerate(coeffs)) % p for x in range(p)):
                f = coeffs
                break
        assert f is not None

        def mul(a: np.ndarray, b: np.ndarray) -> np.ndarray:
            prod = np.zeros(2 * k - 1, dtype=np.int64)
            for i in range(k):
                prod[i : i + k] += a[i] * b
            for d in range(2 * k - 2, k - 1, -1):  # reduce by x^k = -(f_0 + ... + f_{k-1} x^{k-1})
                c = prod[d]
                prod[d - k : d] -= c * np.array(f[:k])
                prod[d] = 0
            return prod[:k] % p

        squares = {int(mul(digits[a], digits[a]) @ weights) for a in range(1, q)}
    chi = np.array([0] + [1 if a in squares else -1 for a in range(1, q)], dtype=np.int64)
    return chi, diff


def _jacobsthal(q: int) -> np.ndarray:
    chi, diff = _quadratic_character(q)
    return chi[diff]


def _paley_kind(n: int) -> str | None:
    """Which Paley construction gives order ``n`` ("I", "II") without building it, or None."""
    if n > 2 and (n - 1) % 4 == 3 and _field_ok(n - 1):
        return "I"
    if n > 2 and n % 2 == 0 and (n // 2 - 1) % 4 == 1 and _field_ok(n // 2 - 1):
        return "II"
    return None


def _paley(n: int) -> np.ndarray:
    """A ±1 Hadamard matrix of order ``n`` by Paley I or II (``_paley_kind(n)`` must not be None)."""
    if _paley_kind(n) == "I":
        jac = _jacobsthal(n - 1)
        s = np.zeros((n, n), dtype=np.int64)
        s[0, 1:] = 1
        s[1:, 0] = -1
        s[1:, 1:] = jac
        return s + np.eye(n, dtype=np.int64)
    q = n // 2 - 1
    jac = _jacobsthal(q)
    c = np.zeros((q + 1, q + 1), dtype=np.int64)
    c[0, 1:] = 1
    c[1:, 0] = 1
    c[1:, 1:] = jac
    return np.kron(c, np.array([[1, 1], [1, -1]])) + np.kron(
        np.eye(q + 1, dtype=np.int64), np.array([[1, -1], [-1, -1]])
    )


@cache
def _plan(n: int) -> tuple[int, ...] | None:
    """Orders of the factors whose Kronecker product has order ``n``: Paley blocks, then one Sylvester.

    The smallest Paley block is taken first, which keeps the finite-field tables small (576 becomes
    12 x 12 x 4 and 1536 becomes 12 x 128).
    """
    if n == 1:
        return ()
    if _is_power_of_two(n):
        return (n,)
    for b in range(3, n + 1):
        if n % b == 0 and not _is_power_of_two(b) and _paley_kind(b) is not None:
            rest = _plan(n // b)
            if rest is not None:
                return (b,) + rest
    return None


def _sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1), dtype=np.int64)
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Orthonormal Hadamard matrix ``[n, n]`` (entries ±1/sqrt(n), ``H @ H.T == I``)."""
    if not isinstance(n, int) or n < 1:
        raise QavtpError(f"Hadamard order must be a positive integer, got {n!r}")
    if n > 2 and n % 4:
        raise QavtpError(f"no Hadamard matrix of order {n} exists (orders are 1, 2 or multiples of 4)")
    plan = _plan(n)
    if plan is None:
        raise QavtpError(
            f"no Hadamard construction for order {n} here (Sylvester, Paley I/II and Kronecker products of them)"
        )
    h = np.ones((1, 1), dtype=np.int64)
    for b in plan:
        h = np.kron(h, _sylvester(b) if _is_power_of_two(b) else _paley(b))
    return torch.from_numpy(h).to(torch.float64).div_(n**0.5).to(dtype)


@cache
def hadamard_factors(n: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 ``(A, B)`` with ``kron(A, B) == hadamard_matrix(n)``: the Paley blocks in A, the power of two in B
    (a pure power of two is split in two halves, as Sylvester matrices are Kronecker powers).

    ``x @ H`` then costs ``n (a + b)`` instead of ``n^2`` multiply-adds (:func:`apply_hadamard_factored`): for
    LLaMA-7B's down_proj input (11008 = 344 x 32) 2.6M instead of 121M per token.
    """
    hadamard_matrix(n)  # validates n
    plan = list(_plan(n) or ())
    mats = [_sylvester(b) if _is_power_of_two(b) else _paley(b) for b in plan]
    if len(mats) == 1 and _is_power_of_two(n):
        k = n.bit_length() - 1
        mats = [_sylvester(2 ** (k // 2)), _sylvester(2 ** (k - k // 2))]
    if not mats:
        mats = [np.ones((1, 1), dtype=np.int64)]
    a = np.ones((1, 1), dtype=np.int64)
    for m in mats[:-1]:
        a = np.kron(a, m)
    b = mats[-1]
    return a / np.sqrt(a.shape[0]), b / np.sqrt(b.shape[0])


def apply_hadamard_factored(x: torch.Tensor, n: int) -> torch.Tensor:
    """``x @ hadamard_matrix(n)`` on the last dimension through its two Kronecker factors.

    The order of operations is the ONNX export's: ``X = x`` as ``[..., a, b]``, ``((X B)^T A)^T``.
    """
    if x.shape[-1] != n:
        raise QavtpError(f"Hadamard of order {n} cannot act on a last dimension of {x.shape[-1]}")
    a_np, b_np = hadamard_factors(n)
    dt = torch.promote_types(x.dtype, torch.float32)
    A = torch.from_numpy(a_np).to(device=x.device, dtype=dt)
    B = torch.from_numpy(b_np).to(device=x.device, dtype=dt)
    X = x.to(dt).reshape(*x.shape[:-1], A.shape[0], B.shape[0])
    Y = ((X @ B).transpose(-1, -2) @ A).transpose(-1, -2)
    return Y.reshape(x.shape).to(x.dtype)


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A randomized Hadamard ``H @ diag(s)`` with random signs ``s``, the same for the same seed.

    QuaRot puts the signs on the input side (``diag(s) @ H``). Here they flip output channels, which changes no
    magnitude: for a symmetric quantizer every seed is the plain ``H``. ``bench/rotation_error.py`` measures that
    ``H`` as good as the best of four QuaRot-form seeds on the reference model (4-bit per-token symmetric error 1.59 %
    against 1.57-1.73 %; asymmetric in groups of 16, 0.46 % against 0.47-0.48 %), so the form stays."""
    gen = torch.Generator().manual_seed(int(seed))
    signs = torch.randint(0, 2, (n,), generator=gen).to(torch.float64) * 2 - 1
    return (hadamard_matrix(n) * signs[None, :]).to(dtype)


def apply_hadamard(x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``x @ h`` on the last dimension, computed in at least float32 and returned in ``x``'s dtype."""
    if x.shape[-1] != h.shape[0]:
        raise QavtpError(f"Hadamard of order {h.shape[0]} cannot act on a last dimension of {x.shape[-1]}")
    # 1/sqrt(n) is not exact in bf16/fp16: multiplying there would add an error the offline fold lacks.
    dt = torch.promote_types(x.dtype, torch.float32)
    return (x.to(dt) @ h.to(device=x.device, dtype=dt)).to(x.dtype)

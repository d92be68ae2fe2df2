"""Orthonormal Hadamard matrices: Sylvester's (sizes 2^k), Paley's constructions (sizes q + 1 for a prime q ≡ 3 mod 4,
2(q + 1) for a prime q ≡ 1 mod 4), and Kronecker products of the two."""

from __future__ import annotations

from functools import lru_cache

import torch


def _prime(q: int) -> bool:
    return q > 1 and all(q % p for p in range(2, int(q**0.5) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[a, b] = χ(b − a) with χ the quadratic character modulo the prime q."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = [0] + [1 if x in squares else -1 for x in range(1, q)]
    return torch.tensor([[chi[(b - a) % q] for b in range(q)] for a in range(q)], dtype=torch.float64)


def _paley(n: int) -> torch.Tensor | None:
    """A ±1 Hadamard matrix of size n from Paley's constructions, or None."""
    q = n - 1
    if _prime(q) and q % 4 == 3:  # Paley I
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:], s[1:, 0] = 1, -1
        s[1:, 1:] = _jacobsthal(q)
        return s + torch.eye(n, dtype=torch.float64)
    q = n // 2 - 1
    if n % 2 == 0 and _prime(q) and q % 4 == 1:  # Paley II
        c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
        c[0, 1:], c[1:, 0] = 1, 1
        c[1:, 1:] = _jacobsthal(q)
        block_one = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
        block_zero = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        return torch.cat([torch.cat([block_zero if c[i, j] == 0 else c[i, j] * block_one for j in range(q + 1)], 1)
                          for i in range(q + 1)], 0)
    return None


@lru_cache(maxsize=None)
def hadamard(n: int) -> torch.Tensor:
    """An orthonormal Hadamard matrix of size ``n`` (float64), or ValueError where none of the constructions gives one."""
    power = 1
    while n % (2 * power) == 0:
        power *= 2
    rest = n // power
    base = torch.ones(1, 1, dtype=torch.float64) if rest == 1 else _paley(rest)
    while base is None and power > 1:  # move factors of two into the Paley part (12 = 2·6: Paley II of 5)
        power //= 2
        rest *= 2
        base = _paley(rest)
    if base is None:
        raise ValueError(f"no Hadamard matrix of size {n} from Sylvester's and Paley's constructions")
    sylvester = torch.ones(1, 1, dtype=torch.float64)
    while sylvester.shape[0] < power:
        sylvester = torch.cat([torch.cat([sylvester, sylvester], 1), torch.cat([sylvester, -sylvester], 1)], 0)
    h = torch.kron(sylvester, base)
    return h / n**0.5

"""Paired tests for refusal outcomes: the exact McNemar test and Holm's adjustment. Pure Python.

Two variants answer the same prompts, so each prompt gives a pair of outcomes (refused or not).
Only the discordant pairs carry information about a difference: ``b`` prompts the first variant
refused and the second did not, ``c`` the other way round. Under the null hypothesis each
discordant pair goes either way with probability 1/2, so the exact two-sided p-value is the
binomial tail ``2 · P(X ≤ min(b, c))`` for ``X ~ Binomial(b + c, 1/2)``, capped at 1; with no
discordant pair there is no evidence either way and p = 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from fractions import Fraction
from math import comb


def discordant(first: Sequence[bool], second: Sequence[bool]) -> tuple[int, int]:
    """(b, c): prompts refused by ``first`` only, and by ``second`` only (same prompts, same order)."""
    if len(first) != len(second):
        raise ValueError(f"paired outcomes of different lengths: {len(first)} and {len(second)}")
    b = sum(1 for x, y in zip(first, second, strict=True) if x and not y)
    c = sum(1 for x, y in zip(first, second, strict=True) if y and not x)
    return b, c


def mcnemar_exact(b: int, c: int) -> float:
    """The exact two-sided McNemar p-value for ``b`` and ``c`` discordant pairs (1.0 when there are none).

    Computed with exact fractions, so a large ``b + c`` neither underflows nor loses the tail."""
    if b < 0 or c < 0:
        raise ValueError(f"negative counts: {b}, {c}")
    n = b + c
    if n == 0:
        return 1.0
    tail = Fraction(sum(comb(n, k) for k in range(min(b, c) + 1)), 2**n)
    return float(min(Fraction(1), 2 * tail))


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` (one family), in their own order.

    Sorted ascending, the i-th smallest (from 0) becomes ``(m − i) · p``, made non-decreasing along
    the order and capped at 1; it controls the family-wise error rate with no assumption about how
    the tests depend on one another."""
    m = len(pvalues)
    order = sorted(range(m), key=lambda i: pvalues[i])
    adjusted = [0.0] * m
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted

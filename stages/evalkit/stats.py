"""Intervals and paired tests for accuracies: pure functions of counts and 0/1 vectors.

- `wilson`: the 95% Wilson score interval of k correct out of n (it stays inside [0, 1] and is
  sensible at k = 0 or k = n, where the normal approximation collapses to a point).
- `paired_bootstrap`: the difference of two accuracies on the same items, with a percentile
  interval from resampling items (both runs' answers to an item stay together).
- `mcnemar_exact`: the two-sided exact McNemar test, a binomial test on the discordant items.
"""

from __future__ import annotations

import math

import numpy as np

Z95 = 1.959963984540054  # the standard normal's 97.5% quantile


def wilson(correct: int, total: int, z: float = Z95) -> tuple[float, float] | None:
    """The Wilson score interval `(lo, hi)` of `correct / total`; None when `total` is 0."""
    if total == 0:
        return None
    p, z2 = correct / total, z * z
    denom = 1 + z2 / total
    centre = (p + z2 / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z2 / (4 * total * total)) / denom
    # the bounds at k = 0 and k = n are exactly 0 and 1; rounding would leave them 1e-16 off
    return (0.0 if correct == 0 else centre - half), (1.0 if correct == total else centre + half)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: `only_a` items right in run A
    only, `only_b` right in run B only. Under no difference each discordant item is a fair coin:
    p = min(1, 2 * P[Binomial(only_a + only_b, 1/2) <= min(only_a, only_b)])."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2 ** n)


def paired_bootstrap(a, b, resamples: int = 10_000, seed: int = 0, level: float = 0.95,
                     chunk: int = 1_000) -> tuple[float, tuple[float, float] | None]:
    """`(mean(a) - mean(b), (lo, hi))`: the accuracy difference of two runs on the same items
    (`a`, `b`: 0/1 per item, same order) and its percentile interval over `resamples` resamples
    of the items with replacement, from `numpy.random.default_rng(seed)` (deterministic).
    The interval is None for no items."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired_bootstrap: a {a.shape} and b {b.shape} must be equal-length vectors")
    n = a.shape[0]
    if n == 0:
        return 0.0, None
    diff = a - b
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, chunk):  # [chunk, n] index blocks keep memory bounded
        size = min(chunk, resamples - start)
        means[start:start + size] = diff[rng.integers(0, n, size=(size, n))].mean(axis=1)
    tail = (1 - level) / 2
    lo, hi = np.quantile(means, [tail, 1 - tail])
    return float(diff.mean()), (float(lo), float(hi))


def proportion(correct: int, total: int) -> dict:
    """`{"correct", "total", "accuracy", "ci95"}`: an accuracy with its item count and its Wilson
    interval (`accuracy` and `ci95` None for no items)."""
    ci = wilson(correct, total)
    return {"correct": correct, "total": total, "accuracy": correct / total if total else None,
            "ci95": list(ci) if ci else None}


def paired(a, b, resamples: int = 10_000, seed: int = 0) -> dict:
    """Run A against run B on the same items (`a`, `b`: right or wrong per item, same order):
    `{"n", "difference", "ci95", "only_a", "only_b", "mcnemar_p"}`, the accuracy difference A - B
    with its paired-bootstrap interval, the discordant counts and McNemar's exact p-value."""
    a, b = [bool(x) for x in a], [bool(x) for x in b]
    only_a = sum(x and not y for x, y in zip(a, b))
    only_b = sum(y and not x for x, y in zip(a, b))
    diff, ci = paired_bootstrap(a, b, resamples, seed)
    return {"n": len(a), "difference": diff, "ci95": list(ci) if ci else None, "only_a": only_a,
            "only_b": only_b, "mcnemar_p": mcnemar_exact(only_a, only_b)}

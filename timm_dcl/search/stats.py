"""Paired differences between the report's graphs, with Student-t confidence intervals.

Seed k of every graph sees the same images in the same order and starts node 0 from the same
weights (the trainer guarantees it), so two graphs' runs pair by seed: the difference of a pair
is free of what the seed alone decides, and its spread over seeds is what the interval rests on.
The t quantile is computed here (the closed form of the t distribution for integer degrees of
freedom, Abramowitz & Stegun 26.7.3–4) so that the report needs no SciPy.
"""
from __future__ import annotations

import math
import statistics
from typing import Optional, Sequence

__all__ = ["t_quantile", "paired_difference", "verdict"]


def _t_central(t: float, df: int) -> float:
    """P(|T| ≤ t) for Student's t with ``df`` (an integer ≥ 1) degrees of freedom."""
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2 == 1:
        term, total = c, 0.0
        for k in range(1, (df - 1) // 2 + 1):  # cos θ + (2/3) cos³ θ + (2·4)/(3·5) cos⁵ θ + …
            total += term
            term *= c * c * (2 * k) / (2 * k + 1)
        return (2 / math.pi) * (theta + s * total) if df > 1 else 2 * theta / math.pi
    term, total = 1.0, 0.0
    for k in range(1, df // 2 + 1):  # 1 + (1/2) cos² θ + (1·3)/(2·4) cos⁴ θ + …
        total += term
        term *= c * c * (2 * k - 1) / (2 * k)
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile (0.5 < p < 1) of Student's t with ``df`` degrees of freedom."""
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be an integer ≥ 1, got {df!r}")
    if not 0.5 < p < 1:
        raise ValueError(f"p must be in (0.5, 1), got {p!r}")
    target = 2 * p - 1  # P(|T| ≤ t)
    lo, hi = 0.0, 1.0
    while _t_central(hi, df) < target:
        hi *= 2
    for _ in range(200):  # bisection to double precision
        mid = (lo + hi) / 2
        if _t_central(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return (lo + hi) / 2


def paired_difference(a: Sequence[Optional[float]], b: Sequence[Optional[float]], *,
                      level: float = 0.95) -> dict:
    """Mean of ``a[k] − b[k]`` over the seeds k both have (None: a diverged or missing run) and its
    two-sided ``level`` Student-t interval; ``ci`` is None when fewer than two pairs exist."""
    diffs = [x - y for x, y in zip(a, b) if x is not None and y is not None]
    n = len(diffs)
    if n == 0:
        return {"diff": None, "ci": None, "n": 0}
    mean = statistics.fmean(diffs)
    if n < 2:
        return {"diff": mean, "ci": None, "n": n}
    half = t_quantile(0.5 + level / 2, n - 1) * statistics.stdev(diffs) / math.sqrt(n)
    return {"diff": mean, "ci": [mean - half, mean + half], "n": n}


def verdict(entry: dict) -> Optional[str]:
    """``better`` / ``worse`` when the interval excludes 0, ``tie`` when it contains it; None
    without an interval."""
    if entry.get("ci") is None:
        return None
    lo, hi = entry["ci"]
    return "better" if lo > 0 else "worse" if hi < 0 else "tie"

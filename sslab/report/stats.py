"""Statistics over seeds: mean, spread and confidence intervals, and paired differences between methods."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def t_quantile(q: float, df: int) -> float:
    """Quantile of Student's t distribution with `df` degrees of freedom (q in (0.5, 1)), by bisection."""
    tail = 2.0 * (1.0 - q)
    low, high = 0.0, 1.0
    while t_two_sided_p(high, df) > tail:
        high *= 2.0
    for _ in range(200):
        mid = 0.5 * (low + high)
        low, high = (mid, high) if t_two_sided_p(mid, df) > tail else (low, mid)
    return 0.5 * (low + high)


def t_two_sided_p(t: float, df: int) -> float:
    """P(|T| >= |t|) for Student's t: the regularised incomplete beta I_{df/(df+t^2)}(df/2, 1/2)."""
    if math.isinf(t):
        return 0.0
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes, betacf)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only on this side
        return 1.0 - _betainc(b, a, 1.0 - x)
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    result = d
    for m in range(1, 300):
        for numerator in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            result *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return math.exp(log_front) * result / a


def describe(values: Sequence[float]) -> tuple[float, float, int, float]:
    """(mean, sample std, count, half-width of the 95% t confidence interval); NaN where undefined."""
    array = np.asarray([v for v in values if v is not None and not math.isnan(v)], dtype=float)
    n = int(array.size)
    if n == 0:
        return math.nan, math.nan, 0, math.nan
    mean = float(array.mean())
    if n == 1:
        return mean, math.nan, 1, math.nan
    std = float(array.std(ddof=1))
    return mean, std, n, t_quantile(0.975, n - 1) * std / math.sqrt(n)


def paired_difference(
    a: Sequence[float], b: Sequence[float]
) -> tuple[float, float, float, float, float, int]:
    """(mean, ci_low, ci_high, t, two-sided p, n) of the paired differences a - b (NaN where undefined)."""
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    mean, std, n, half = describe(diffs)
    if n < 2:
        return mean, math.nan, math.nan, math.nan, math.nan, n
    if std == 0:  # identical differences on every seed: t is 0 or infinite
        return mean, mean, mean, 0.0 if mean == 0 else math.copysign(math.inf, mean), float(mean == 0), n
    t = mean / (std / math.sqrt(n))
    return mean, mean - half, mean + half, t, t_two_sided_p(t, n - 1), n

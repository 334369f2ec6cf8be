"""Paired-difference statistics for the benchmark studies, standard library only.

Student's t comes from the regularized incomplete beta function, so an interval is exact at any number of seeds
(no table, no normal fallback). ``bench_study``, ``bench_methods``, ``bench_grpo`` and ``bench_smollm2`` all read
their intervals and p-values from here.
"""

from __future__ import annotations

import math
import statistics


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the incomplete beta function (Lentz's method)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1)
    d = 1 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for num in (
            m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
            -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1)),
        ):
            d = 1 + num * d
            d = 1 / (d if abs(d) > tiny else tiny)
            c = 1 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1) < 1e-14:
            break
    return h


def t_sf(t: float, df: int) -> float:
    """P(T > t) for Student's t with ``df`` degrees of freedom."""
    if t == 0:
        return 0.5
    x, y = df / (df + t * t), t * t / (df + t * t)  # y = 1 - x, kept exact for a tiny t
    a, b = df / 2, 0.5
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log(y))
    ibeta = front * _betacf(a, b, x) / a if x < (a + 1) / (a + b + 2) else 1 - front * _betacf(b, a, y) / b
    return ibeta / 2 if t > 0 else 1 - ibeta / 2


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t (bisection on :func:`t_sf`)."""
    lo, hi = -50.0, 50.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if 1 - t_sf(mid, df) < p else (lo, mid)
    return (lo + hi) / 2


def paired(diffs: list[float]) -> dict | None:
    """Mean, sd, 95% t-interval and two-sided p of paired differences (None under two pairs)."""
    n = len(diffs)
    if n < 2:
        return None
    mean, sd = statistics.mean(diffs), statistics.stdev(diffs)
    half = t_quantile(0.975, n - 1) * sd / math.sqrt(n)
    # every pair the same difference: certain, whatever n
    p = float(mean == 0) if sd == 0 else 2 * t_sf(abs(mean) / (sd / math.sqrt(n)), n - 1)
    return {
        "n": n,
        "mean": mean,
        "sd": sd,
        "low": mean - half,
        "high": mean + half,
        "half_width": half,
        "p": p,
    }


def holm(pvalues: dict[str, float]) -> dict[str, float]:
    """Holm's step-down adjustment of a family of p-values."""
    order = sorted(pvalues, key=pvalues.get)
    out, running = {}, 0.0
    for i, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - i) * pvalues[name]))
        out[name] = running
    return out


def interval95(diffs: list[float]) -> tuple[float, float, float] | None:
    """Mean of paired differences and its two-sided 95% t-interval (None under two pairs)."""
    r = paired(diffs)
    return None if r is None else (r["mean"], r["low"], r["high"])

"""Mean, standard deviation and paired-seed confidence intervals (no SciPy needed)."""
from __future__ import annotations

import math
import statistics

# two-sided 95% quantiles of Student's t, by degrees of freedom (standard table values)
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086, 25: 2.060, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t95(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (table, next lower df)."""
    if df < 1:
        return float("nan")
    return _T95[max(k for k in _T95 if k <= df)] if df <= 120 else 1.960


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of the values that are not NaN
    (a figure a run could not record, e.g. one that predates it)."""
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_difference(a: dict[int, float], b: dict[int, float]) -> tuple[float, float, int]:
    """Mean of a[s] - b[s] over the seeds both have, and the half-width of its 95% t interval."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds]
    if not diffs:
        return float("nan"), float("nan"), 0
    mean, sd = mean_std(diffs)
    half = t95(len(diffs) - 1) * sd / math.sqrt(len(diffs)) if len(diffs) > 1 else float("nan")
    return mean, half, len(diffs)


def fmt_pct(mean: float, sd: float) -> str:
    return "-" if math.isnan(mean) else f"{100 * mean:.1f} ± {100 * sd:.1f}"

"""The statistics of an ablation table, all from scipy: a t-interval for a mean, Welch's t-test for a delta."""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats


def _finite(values: Iterable[float]) -> np.ndarray:
    array = np.asarray(list(values), dtype=float)
    return array[np.isfinite(array)]


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation (ddof=1), count and a t-interval for the mean of one group."""

    n: int
    mean: float
    std: float
    ci_low: float
    ci_high: float


@dataclass(frozen=True)
class Comparison:
    """A group against the baseline: difference of means, its Welch interval, and Welch's two-sided p-value."""

    delta: float
    ci_low: float
    ci_high: float
    p_value: float


def summarize(values: Iterable[float], confidence: float = 0.95) -> Summary:
    """Summary of ``values`` (NaN and inf ignored); std and interval are NaN below two values."""
    x = _finite(values)
    n = len(x)
    if n == 0:
        return Summary(0, math.nan, math.nan, math.nan, math.nan)
    mean = float(x.mean())
    if n < 2:
        return Summary(1, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    if std == 0.0:  # scipy would divide by a zero standard error; the interval is the point itself
        return Summary(n, mean, 0.0, mean, mean)
    low, high = stats.t.interval(confidence, n - 1, loc=mean, scale=stats.sem(x))
    return Summary(n, mean, std, float(low), float(high))


def compare(values: Iterable[float], baseline: Iterable[float], confidence: float = 0.95) -> Comparison:
    """Welch's t-test of ``values`` against ``baseline`` (unequal variances); NaN where it is undefined
    (fewer than two values on a side, or no spread on either side)."""
    x, y = _finite(values), _finite(baseline)
    delta = float(x.mean() - y.mean()) if len(x) and len(y) else math.nan
    if len(x) < 2 or len(y) < 2 or (x.std() == 0 and y.std() == 0):
        return Comparison(delta, math.nan, math.nan, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = stats.ttest_ind(x, y, equal_var=False)
        interval = result.confidence_interval(confidence)
    return Comparison(delta, float(interval.low), float(interval.high), float(result.pvalue))

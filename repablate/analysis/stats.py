"""The statistics of an ablation table, from scipy and statsmodels: a t-interval for a mean; against the baseline,
Welch's t-test, a paired t-test on the seeds both rows ran, Hedges' g, the minimum detectable effect; and the
Holm-Bonferroni adjustment of a table's p-values.

Runs with the same seed share their data order (and the initialization of shared parts), so a row and the
baseline are compared seed by seed where they share seeds: the seed's own effect cancels in the per-seed
difference. A statistic the data leave undefined (too few values, or no spread) is NaN, never an error; NaN and
inf values are left out.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Hashable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import special, stats
from statsmodels.stats.multitest import multipletests
from statsmodels.stats.power import TTestIndPower, TTestPower

# The minimum detectable effect is for a two-sided test at this level with this power (the usual 0.05 and 80%).
MDE_ALPHA = 0.05
MDE_POWER = 0.8


def _finite(values: Iterable[float]) -> np.ndarray:
    array = np.asarray(list(values), dtype=float)
    return array[np.isfinite(array)]


def _finite_pairs(values: Iterable[float], baseline: Iterable[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(list(values), dtype=float), np.asarray(list(baseline), dtype=float)
    if x.shape != y.shape:
        raise ValueError(f"paired values need one baseline value each, got {len(x)} and {len(y)}")
    keep = np.isfinite(x) & np.isfinite(y)
    return x[keep], y[keep]


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


@dataclass(frozen=True)
class PairedComparison:
    """A group against the baseline seed by seed: the number of pairs, the mean of the per-pair differences, its
    t-interval and the paired t-test's two-sided p-value."""

    n_pairs: int
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


def pair_by_seed(
    values: Sequence[float], seeds: Sequence[Hashable], baseline: Sequence[float], baseline_seeds: Sequence[Hashable]
) -> tuple[np.ndarray, np.ndarray, list]:
    """The values of the seeds both groups ran, aligned: ``(x, y, seeds)`` sorted by seed.

    A seed's value is the mean of its finite values in that group (a group holding a seed twice, say two sweeps
    pooled, counts it once); seeds that are missing (NaN) or have no finite value on either side are left out."""

    def by_seed(v: Sequence[float], s: Sequence[Hashable]) -> pd.Series:
        frame = pd.DataFrame({"value": pd.to_numeric(pd.Series(list(v)), errors="coerce"), "seed": list(s)})
        frame = frame[np.isfinite(frame["value"]) & frame["seed"].notna()]
        return frame.groupby("seed")["value"].mean()

    x, y = by_seed(values, seeds), by_seed(baseline, baseline_seeds)
    shared = sorted(set(x.index) & set(y.index))
    return x[shared].to_numpy(float), y[shared].to_numpy(float), shared


def compare_paired(values: Iterable[float], baseline: Iterable[float], confidence: float = 0.95) -> PairedComparison:
    """The paired t-test of ``values`` against ``baseline``, pair by pair (``values[i]`` and ``baseline[i]`` share
    a seed; pairs with a non-finite value are left out), with scipy's ``ttest_rel``.

    delta is the mean of the differences d_i = x_i - y_i, its interval delta ± t(1 - a/2, n - 1) · s_d / √n.
    Everything but ``n_pairs`` is NaN below two pairs; with two or more pairs whose differences have no spread
    (s_d = 0) the p-value is NaN and the interval the point itself, as :func:`summarize` does."""
    x, y = _finite_pairs(values, baseline)
    n = len(x)
    if n < 2:
        return PairedComparison(n, math.nan, math.nan, math.nan, math.nan)
    differences = x - y
    delta = float(differences.mean())
    if differences.std() == 0:
        return PairedComparison(n, delta, delta, delta, math.nan)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nearly constant differences: scipy warns, the t stands
        result = stats.ttest_rel(x, y)
        interval = result.confidence_interval(confidence)
    return PairedComparison(n, delta, float(interval.low), float(interval.high), float(result.pvalue))


def hedges_correction(df: float) -> float:
    """Hedges' small-sample correction J(df) = Γ(df/2) / (√(df/2) · Γ((df - 1)/2)), which makes d·J an unbiased
    estimate of the population effect (Hedges 1981, "Distribution theory for Glass's estimator of effect size and
    related estimators", J. Educational Statistics 6(2)); about 1 - 3/(4·df - 1). NaN below df = 2 (J(1) = 0)."""
    if not df >= 2:
        return math.nan
    return float(math.exp(special.gammaln(df / 2) - special.gammaln((df - 1) / 2)) / math.sqrt(df / 2))


def hedges_g(values: Iterable[float], baseline: Iterable[float], paired: bool = False) -> float:
    """Hedges' g of ``values`` against ``baseline`` (positive: ``values`` larger), as set out by Lakens (2013),
    "Calculating and reporting effect sizes to facilitate cumulative science: a practical primer for t-tests and
    ANOVAs", Frontiers in Psychology 4:863.

    Unpaired, g_s (Lakens eqs. 1 and 4): d_s = (mean x - mean y) / s_pooled with
    s_pooled = √(((n_x - 1) s_x² + (n_y - 1) s_y²) / (n_x + n_y - 2)), and g_s = d_s · J(n_x + n_y - 2).

    Paired (``values[i]`` and ``baseline[i]`` share a seed), g_av (Lakens eq. 10): d_av = mean(x - y) /
    ((s_x + s_y) / 2), and g_av = d_av · J(n - 1) over the n pairs. Chosen over d_z = mean(x - y) / s_d: d_z
    measures how consistent the per-seed difference is, not how large it is; it grows without bound when the
    seed's effect cancels in the difference (it is t/√n, so the paired p-value says the same), whereas d_av is on
    the scale of the seed-to-seed spread, like g_s, so paired and unpaired rows of one table read alike. The
    paired test's power rests on s_d: :func:`minimum_detectable_effect` uses it.

    J is :func:`hedges_correction`. NaN when the standardizer is zero or J is undefined (fewer than 3 pairs;
    unpaired, fewer than 4 values in all)."""
    if paired:
        x, y = _finite_pairs(values, baseline)
        n = len(x)
        if n < 2:
            return math.nan
        scale = (x.std(ddof=1) + y.std(ddof=1)) / 2
        df = n - 1
        difference = (x - y).mean()
    else:
        x, y = _finite(values), _finite(baseline)
        df = len(x) + len(y) - 2
        if len(x) < 1 or len(y) < 1 or df < 2:
            return math.nan
        squares = ((x - x.mean()) ** 2).sum() + ((y - y.mean()) ** 2).sum()
        scale = math.sqrt(squares / df)
        difference = x.mean() - y.mean()
    if scale == 0:
        return math.nan
    return float(difference / scale * hedges_correction(df))


def minimum_detectable_effect(
    values: Iterable[float],
    baseline: Iterable[float],
    paired: bool = False,
    alpha: float = MDE_ALPHA,
    power: float = MDE_POWER,
) -> float:
    """The smallest true difference a two-sided t-test at level ``alpha`` would detect with probability ``power``,
    given this spread and these sample sizes, in the metric's units.

    Paired (``values[i]`` and ``baseline[i]`` share a seed): statsmodels' ``TTestPower`` solves for the
    standardized effect δ at n pairs (the one-sample t-test on the differences, noncentrality δ√n), times the SD
    of the differences s_d. Unpaired: ``TTestIndPower`` at n_x and n_y (Student's t, noncentrality
    δ / √(1/n_x + 1/n_y)), times the pooled SD (see :func:`hedges_g`). NaN below two values per side (two pairs),
    or where that SD is zero (the test itself is then undefined)."""
    if paired:
        x, y = _finite_pairs(values, baseline)
        n = len(x)
        sd = float((x - y).std(ddof=1)) if n >= 2 else math.nan
    else:
        x, y = _finite(values), _finite(baseline)
        n = len(x)
        df = len(x) + len(y) - 2
        if len(x) >= 2 and len(y) >= 2:
            sd = math.sqrt((((x - x.mean()) ** 2).sum() + ((y - y.mean()) ** 2).sum()) / df)
        else:
            sd = math.nan
    if not sd > 0:  # NaN or zero
        return math.nan
    if paired:
        effect = TTestPower().solve_power(effect_size=None, nobs=n, alpha=alpha, power=power)
    else:
        effect = TTestIndPower().solve_power(
            effect_size=None, nobs1=len(x), ratio=len(y) / len(x), alpha=alpha, power=power
        )
    return float(effect) * sd


def holm(p_values: Iterable[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (statsmodels' ``multipletests(method="holm")``), in the input's order.

    The family is the finite p-values given: NaN stays NaN and does not count. For m p-values sorted
    p_(1) <= ... <= p_(m): p_adj(i) = min(1, max over j <= i of (m - j + 1) · p_(j))."""
    p = np.asarray(list(p_values), dtype=float)
    adjusted = np.full(p.shape, math.nan)
    finite = np.isfinite(p)
    if finite.any():
        adjusted[finite] = multipletests(p[finite], method="holm")[1]
    return adjusted

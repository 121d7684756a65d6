"""The comparisons of an ablation table against its baseline: the paired t-test on shared seeds, Holm-Bonferroni,
Hedges' g and the minimum detectable effect, each checked against scipy/statsmodels and a hand computation.

Tolerances: values computed two ways in float64 agree to rel 1e-9 (1e-12 where the same library call is
repeated); hand formulas typed to 4-5 digits, to their last digit. Property-test data lie on a grid of 1/64
(exact in binary), so a difference of two values, or a value shifted by a grid constant, is exact; statistics of
shifted data then agree to rel 1e-7 (means and variances are rounded once more, at most 1e4 ulp apart for
|values| <= 20). Power at the minimum detectable effect is 0.8 to abs 1e-4 (statsmodels' root finder).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from scipy import stats as sps
from statsmodels.stats.power import TTestIndPower, TTestPower

from repablate.analysis import (
    ablation_table,
    compare,
    compare_paired,
    export_table,
    format_deltas,
    hedges_correction,
    hedges_g,
    holm,
    minimum_detectable_effect,
    pair_by_seed,
    to_latex,
    to_markdown,
)
from repablate.analysis import tables as tables_module

ROOT = Path(__file__).resolve().parents[1]
ACC = "deploy_form/test/acc"
LAT = "deploy_form/latency_ms"

# Five seeds move accuracy by ±0.03, the same way for both rows; the variant is better by 0.010 on average and in
# every seed (the per-seed differences below). Welch sees the seed's spread, the paired test only the differences'.
SEED_EFFECT = (-0.03, -0.03, 0.03, 0.03, 0.03)
DIFFERENCE = (0.004, 0.010, 0.010, 0.013, 0.013)


def runs_frame(rows: dict[str, dict[int, float | list[float]]], metric: str = ACC) -> pd.DataFrame:
    """Completed runs: {row label: {seed: value, or several values for a seed run more than once}}."""
    records = [
        {"status": "completed", "variant": variant, "seed": seed, metric: value}
        for variant, by_seed in rows.items()
        for seed, values in by_seed.items()
        for value in (values if isinstance(values, list) else [values])
    ]
    return pd.DataFrame(records)


def seed_example() -> pd.DataFrame:
    baseline = {seed: 0.8 + effect for seed, effect in enumerate(SEED_EFFECT)}
    variant = {seed: baseline[seed] + DIFFERENCE[seed] for seed in (3, 0, 4, 1, 2)}  # not in seed order
    return runs_frame({"plain": baseline, "repconv": variant})


# --- the example: seed noise ±0.03, a variant +0.010 in every seed --------------------------------------------


def test_pairing_by_seed_finds_what_welch_misses():
    table = ablation_table(seed_example(), metrics=[ACC], baseline="plain")
    row = table.loc["repconv", ACC]
    # Paired by hand: differences (4, 10, 10, 13, 13)e-3, mean 0.010, s_d^2 = 54e-6 / 4 = 13.5e-6, so
    # t = 0.010 / sqrt(13.5e-6 / 5) = 1 / sqrt(0.027) = 6.0858 on 4 degrees of freedom.
    t = 1 / math.sqrt(0.027)
    assert row["n_pairs"] == 5
    assert row["delta_paired"] == pytest.approx(0.010, rel=1e-9)
    assert row["p_paired"] == pytest.approx(2 * sps.t.sf(t, 4), rel=1e-9)
    assert row["p_paired"] == pytest.approx(0.004, abs=0.0005)  # 0.00369
    half = sps.t.ppf(0.975, 4) * math.sqrt(13.5e-6 / 5)
    assert (row["delta_paired_ci_low"], row["delta_paired_ci_high"]) == pytest.approx((0.01 - half, 0.01 + half))
    # Welch by hand: variances 0.00108 (plain) and 0.0012735 (repconv), t = 0.010 / sqrt(0.0023535 / 5) = 0.4609.
    welch_t = 0.010 / math.sqrt((0.00108 + 0.0012735) / 5)
    welch_df = ((0.00108 + 0.0012735) / 5) ** 2 / (((0.00108 / 5) ** 2 + (0.0012735 / 5) ** 2) / 4)
    assert row["p_value"] == pytest.approx(2 * sps.t.sf(welch_t, welch_df), rel=1e-9)
    assert row["p_value"] == pytest.approx(0.66, abs=0.005)  # 0.6572
    # With one row, Holm leaves the paired p as it is; the table says it used the paired test.
    assert row["p_holm"] == pytest.approx(row["p_paired"], rel=1e-12)
    assert table.attrs["tests"] == {ACC: {"repconv": "paired"}}


def test_the_example_would_fail_if_runs_were_paired_by_position(monkeypatch):
    """The variant's runs are listed in seed order 3, 0, 4, 1, 2: pairing them by position is a different test."""

    def by_position(values, seeds, baseline, baseline_seeds):
        return np.asarray(values, float), np.asarray(baseline, float), list(range(len(values)))

    monkeypatch.setattr(tables_module, "pair_by_seed", by_position)
    row = ablation_table(seed_example(), metrics=[ACC], baseline="plain").loc["repconv", ACC]
    assert not row["p_paired"] == pytest.approx(0.004, abs=0.0005)


@pytest.fixture(scope="module")
def example_cli(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    sweep = tmp_path_factory.mktemp("seeds")
    for number, record in enumerate(seed_example().to_dict("records")):
        (sweep / str(number)).mkdir()
        (sweep / str(number) / "results.json").write_text(json.dumps(record))
    done = subprocess.run(
        [sys.executable, "-m", "repablate.analysis", str(sweep), "--baseline", "plain", "--metrics", ACC]
        + ["--out", str(sweep / "out"), "--no-figures"],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done, sweep / "out"


def test_the_command_prints_and_writes_the_paired_statistics(example_cli):
    done, out = example_cli
    assert done.returncode == 0, done.stderr
    csv = pd.read_csv(out / "table.csv", index_col=0)
    expected = ablation_table(seed_example(), metrics=[ACC], baseline="plain")
    for stat in ("p_value", "n_pairs", "delta_paired", "delta_paired_ci_low", "delta_paired_ci_high", "p_paired"):
        assert csv.loc["repconv", f"{ACC} {stat}"] == pytest.approx(expected.loc["repconv", (ACC, stat)], rel=1e-12)
    for stat in ("p_holm", "effect_size", "mde"):  # CSV keeps every digit
        assert csv.loc["repconv", f"{ACC} {stat}"] == pytest.approx(expected.loc["repconv", (ACC, stat)], rel=1e-12)
    assert csv.loc["repconv", f"{ACC} p_paired"] == pytest.approx(0.00369, abs=5e-6)
    markdown = (out / "table.md").read_text()
    line = next(line for line in markdown.splitlines() if line.startswith("| repconv ") and ACC in line)
    assert "| paired, 5 seeds |" in line and "| 0.003685 |" in line and "| +0.01 [" in line
    assert "Holm-Bonferroni adjusted across the table's rows, per metric" in markdown
    assert "paired t-test on the seeds the row shares with the baseline" in markdown
    assert line in done.stdout  # printed as written


# --- pairing -------------------------------------------------------------------------------------------------


def test_only_seeds_both_rows_ran_are_paired():
    runs = runs_frame(
        {
            "plain": {0: 1.0, 1: 2.0, 2: 4.0, 3: 7.0, 4: 5.0},
            # seed 2 twice (two sweeps pooled: averaged to 5.5), seed 3 has no finite value, seeds 5 and 6 unshared
            "repconv": {1: 3.0, 2: [5.0, 6.0], 3: math.nan, 4: 8.0, 5: 0.0, 6: 9.0},
        }
    )
    repconv = [3.0, 5.0, 6.0, math.nan, 8.0, 0.0, 9.0]
    plain = [1.0, 2.0, 4.0, 7.0, 5.0, 100.0]  # the last one's seed is unknown: never paired
    x, y, seeds = pair_by_seed(repconv, [1, 2, 2, 3, 4, 5, 6], plain, [0, 1, 2, 3, 4, math.nan])
    assert seeds == [1, 2, 4] and x.tolist() == [3.0, 5.5, 8.0] and y.tolist() == [2.0, 4.0, 5.0]
    row = ablation_table(runs, metrics=[ACC], baseline="plain").loc["repconv", ACC]
    assert row["n_pairs"] == 3
    assert row["delta_paired"] == pytest.approx((1.0 + 1.5 + 3.0) / 3, rel=1e-12)  # != delta of the means
    assert row["p_paired"] == pytest.approx(sps.ttest_rel([3.0, 5.5, 8.0], [2.0, 4.0, 5.0]).pvalue, rel=1e-12)
    welch = compare([3.0, 5.0, 6.0, 8.0, 0.0, 9.0], [1.0, 2.0, 4.0, 7.0, 5.0])
    assert (row["delta"], row["p_value"]) == pytest.approx((welch.delta, welch.p_value), rel=1e-12)


@pytest.mark.parametrize("shared", [0, 1])
def test_fewer_than_two_shared_seeds_fall_back_to_welch_and_say_so(shared):
    first = 3 - shared  # repconv runs seeds first..first+2; plain 0, 1, 2
    runs = runs_frame({"plain": {0: 1.0, 1: 2.0, 2: 4.0}, "repconv": {first + k: 3.0 + k for k in range(3)}})
    table = ablation_table(runs, metrics=[ACC], baseline="plain")
    row = table.loc["repconv", ACC]
    assert row["n_pairs"] == shared
    assert all(math.isnan(row[s]) for s in ("delta_paired", "delta_paired_ci_low", "delta_paired_ci_high"))
    assert math.isnan(row["p_paired"])
    assert table.attrs["tests"][ACC]["repconv"] == "welch"
    assert row["p_holm"] == pytest.approx(row["p_value"], rel=1e-12)  # Holm of the Welch p, one row: itself
    assert row["effect_size"] == pytest.approx(hedges_g(runs[ACC][3:], runs[ACC][:3]), rel=1e-12)
    assert row["mde"] == pytest.approx(minimum_detectable_effect(runs[ACC][3:], runs[ACC][:3]), rel=1e-12)
    seeds = "1 shared seed" if shared == 1 else "0 shared seeds"
    assert f"| Welch ({seeds}) |" in to_markdown(table)


def test_undefined_paired_statistics_are_nan():
    assert compare_paired([1.0], [2.0]).n_pairs == 1 and math.isnan(compare_paired([1.0], [2.0]).delta)
    flat = compare_paired([2.0, 3.0, 5.0], [1.0, 2.0, 4.0])  # every difference 1: no spread
    assert (flat.n_pairs, flat.delta, flat.ci_low, flat.ci_high) == (3, 1.0, 1.0, 1.0) and math.isnan(flat.p_value)
    dropped = compare_paired([1.0, math.nan, 4.0, 2.0], [0.0, 1.0, math.inf, 1.5])
    assert dropped.n_pairs == 2 and dropped.delta == pytest.approx(0.75)
    assert math.isnan(minimum_detectable_effect([2.0, 3.0, 5.0], [1.0, 2.0, 4.0], paired=True))
    assert math.isnan(hedges_g([1.0, 2.0], [1.0, 2.0], paired=True))  # two pairs: J(1) = 0, left undefined
    with pytest.raises(ValueError, match="one baseline value each"):
        compare_paired([1.0, 2.0], [1.0])


# --- Holm-Bonferroni -----------------------------------------------------------------------------------------


def test_holm_on_a_hand_computed_sequence():
    # Sorted 0.01, 0.03, 0.04, 0.5 times 4, 3, 2, 1 = 0.04, 0.09, 0.08, 0.5; running maximum 0.04, 0.09, 0.09, 0.5.
    assert holm([0.01, 0.04, 0.03, 0.5]).tolist() == pytest.approx([0.04, 0.09, 0.09, 0.5], rel=1e-12)
    # Bonferroni (0.04, 0.16, 0.12, 1) or no running maximum (0.08 for 0.04) would fail the line above.
    assert holm([0.6, 0.7]).tolist() == [1.0, 1.0]  # capped at 1
    nan = holm([0.02, math.nan, 0.01])  # NaN is no hypothesis: a family of two
    assert nan[0] == pytest.approx(0.02) and math.isnan(nan[1]) and nan[2] == pytest.approx(0.02)
    assert holm([]).size == 0


def holm_by_hand(p: dict[str, float]) -> dict[str, float]:
    """Sorted ascending, the i-th smallest of m times (m - i + 1), made non-decreasing, capped at 1."""
    adjusted, running = {}, 0.0
    for rank, label in enumerate(sorted(p, key=p.get)):
        running = max(running, min(1.0, (len(p) - rank) * p[label]))
        adjusted[label] = running
    return adjusted


def test_holm_in_the_table_adjusts_each_rows_own_test_per_metric():
    base = {seed: 0.8 + effect for seed, effect in enumerate(SEED_EFFECT)}
    runs = runs_frame(
        {
            "plain": base,
            "paired_big": {s: v + DIFFERENCE[s] for s, v in base.items()},
            "paired_small": {s: v + DIFFERENCE[s] - 0.0095 for s, v in base.items()},
            "welch": {10 + s: v + 0.05 for s, v in base.items()},  # other seeds: Welch only
        }
    )
    # A second metric on a grid of 1/64: paired_small is exactly 0.5 slower in every seed, so its per-seed
    # differences have no spread and its test for this metric is Welch's; Holm's families are per metric.
    latency = {"plain": 0.0, "paired_big": 0.25, "paired_small": 0.5, "welch": 0.375}
    runs[LAT] = [
        2 + s / 4 + latency[v] + (v == "paired_big") * s / 64 for v, s in zip(runs.variant, runs.seed, strict=True)
    ]
    table = ablation_table(runs, metrics=[ACC, LAT], baseline="plain")
    tests = {ACC: {"paired_big": "paired", "paired_small": "paired", "welch": "welch"}}
    tests[LAT] = {"paired_big": "paired", "paired_small": "welch", "welch": "welch"}
    assert table.attrs["tests"] == tests
    for metric, by_row in tests.items():
        p = {row: table.loc[row, (metric, "p_paired" if t == "paired" else "p_value")] for row, t in by_row.items()}
        assert all(0 < value < 1 for value in p.values())
        for row, adjusted in holm_by_hand(p).items():
            assert table.loc[row, (metric, "p_holm")] == pytest.approx(adjusted, rel=1e-12), (metric, row)
        assert math.isnan(table.loc["plain", (metric, "p_holm")])  # the baseline is no hypothesis
    assert "(3 p-values per metric)" in to_markdown(table)
    assert "| Welch (per-seed differences without spread) |" in to_markdown(table)


def test_the_suite_catches_bonferroni_for_holm(monkeypatch):
    monkeypatch.setattr(tables_module, "holm", lambda p: np.minimum(1.0, np.asarray(p) * len(p)))
    with pytest.raises(AssertionError):
        test_holm_in_the_table_adjusts_each_rows_own_test_per_metric()


# --- Hedges' g -----------------------------------------------------------------------------------------------


def test_hedges_correction_closed_forms():
    # J(2) = Γ(1) / Γ(1/2) = 1/√π; J(4) = Γ(2) / (√2 Γ(3/2)) = √(2/π); J(8) = Γ(4) / (2 Γ(7/2)) = 1.6/√π.
    assert hedges_correction(2) == pytest.approx(1 / math.sqrt(math.pi), rel=1e-12)
    assert hedges_correction(4) == pytest.approx(math.sqrt(2 / math.pi), rel=1e-12)
    assert hedges_correction(8) == pytest.approx(1.6 / math.sqrt(math.pi), rel=1e-12)
    for df in (4, 8, 30, 200):  # the usual approximation 1 - 3 / (4 df - 1) (Lakens 2013, eq. 4)
        assert hedges_correction(df) == pytest.approx(1 - 3 / (4 * df - 1), abs=0.25 / df**2)
    assert math.isnan(hedges_correction(1))


def test_hedges_g_by_hand():
    # Unpaired: means 4 and 2, variances 4 and 1, pooled SD √((2·4 + 2·1) / 4) = √2.5, df 4: g = 2/√2.5 · √(2/π).
    assert hedges_g([2.0, 4.0, 6.0], [1.0, 2.0, 3.0]) == pytest.approx(2 / math.sqrt(2.5) * math.sqrt(2 / math.pi))
    # Paired: differences 2, 3, 4 (mean 3), SDs √13 and √7: d_av = 3 / ((√13 + √7) / 2), df 2: J = 1/√π.
    g_av = 6 / (math.sqrt(13) + math.sqrt(7)) / math.sqrt(math.pi)
    assert hedges_g([3.0, 5.0, 10.0], [1.0, 2.0, 6.0], paired=True) == pytest.approx(g_av, rel=1e-12)
    d_z = 3 / 1.0  # the differences' SD is 1: d_z, with or without J, is another number
    assert not g_av == pytest.approx(d_z / math.sqrt(math.pi), rel=0.1) and not g_av == pytest.approx(d_z, rel=0.1)


def test_the_table_reports_g_av_for_paired_rows_and_g_s_for_welch_rows():
    runs = runs_frame({"plain": {0: 1.0, 1: 2.0, 2: 6.0}, "repconv": {0: 3.0, 1: 5.0, 2: 10.0}, "other": {7: 1.0}})
    runs = pd.concat([runs, runs_frame({"other": {8: 4.0, 9: 9.0}})], ignore_index=True)
    table = ablation_table(runs, metrics=[ACC], baseline="plain")
    g_av = 6 / (math.sqrt(13) + math.sqrt(7)) / math.sqrt(math.pi)  # as above, values swapped per row
    assert table.loc["repconv", (ACC, "effect_size")] == pytest.approx(g_av, rel=1e-12)
    # other (1, 4, 9) vs plain (1, 2, 6), no shared seed: means 14/3 and 3, variances 49/3 and 7, df 4
    assert table.loc["other", (ACC, "effect_size")] == pytest.approx(
        (14 / 3 - 3) / math.sqrt((2 * 49 / 3 + 2 * 7) / 4) * math.sqrt(2 / math.pi), rel=1e-12
    )


# --- minimum detectable effect -------------------------------------------------------------------------------


def power_by_hand(effect: float, df: int, noncentrality_per_effect: float, alpha: float = 0.05) -> float:
    """Two-sided t-test power from scipy's noncentral t: P(|T| > t_crit) with T ~ nct(df, effect·k)."""
    critical = sps.t.ppf(1 - alpha / 2, df)
    nc = effect * noncentrality_per_effect
    return float(sps.nct.sf(critical, df, nc) + sps.nct.cdf(-critical, df, nc))


def test_mde_of_the_example_is_in_accuracy_units():
    table = ablation_table(seed_example(), metrics=[ACC], baseline="plain")
    sd = math.sqrt(13.5e-6)  # SD of the per-seed differences, by hand as above
    mde = table.loc["repconv", (ACC, "mde")]
    assert power_by_hand(mde / sd, 4, math.sqrt(5)) == pytest.approx(0.8, abs=1e-4)
    assert mde == pytest.approx(TTestPower().solve_power(None, nobs=5, alpha=0.05, power=0.8) * sd, rel=1e-9)
    assert mde < 0.010  # the paired design could see this difference; unpaired it could not:
    welch = minimum_detectable_effect(*[seed_example()[ACC][v] for v in ([5, 6, 7, 8, 9], [0, 1, 2, 3, 4])])
    assert welch > 0.05


@settings(max_examples=40, deadline=None)
@given(
    pairs=st.lists(st.tuples(st.integers(-640, 640), st.integers(-640, 640)), min_size=2, max_size=10),
    extra=st.lists(st.integers(-640, 640), max_size=5),
)
def test_power_at_the_mde_is_80_percent(pairs, extra):
    x = np.array([a for a, _ in pairs], float) / 64
    y = np.array([b for _, b in pairs], float) / 64
    assume(np.std(x - y) > 0)
    mde = minimum_detectable_effect(x, y, paired=True)
    n, sd = len(x), float(np.std(x - y, ddof=1))
    if n >= 3:  # scipy's noncentral t returns NaN far in the tail at one degree of freedom
        assert power_by_hand(mde / sd, n - 1, math.sqrt(n)) == pytest.approx(0.8, abs=1e-4)
    assert TTestPower().power(mde / sd, nobs=n, alpha=0.05) == pytest.approx(0.8, abs=1e-4)
    x2 = np.concatenate([x, np.array(extra, float) / 64])  # unpaired, unequal sizes
    pooled = math.sqrt((np.var(x2, ddof=1) * (len(x2) - 1) + np.var(y, ddof=1) * (n - 1)) / (len(x2) + n - 2))
    assume(pooled > 0)
    mde = minimum_detectable_effect(x2, y)
    k = 1 / math.sqrt(1 / len(x2) + 1 / n)
    assert power_by_hand(mde / pooled, len(x2) + n - 2, k) == pytest.approx(0.8, abs=1e-4)
    assert TTestIndPower().power(mde / pooled, len(x2), 0.05, ratio=n / len(x2)) == pytest.approx(0.8, abs=1e-4)
    assert minimum_detectable_effect(x2 * 10, y * 10) == pytest.approx(10 * mde, rel=1e-9)  # in the data's units


# --- properties ----------------------------------------------------------------------------------------------

grid = st.integers(-640, 640).map(lambda k: k / 64)  # |values| <= 10, exact in binary


@settings(max_examples=80, deadline=None)
@given(pairs=st.lists(st.tuples(grid, grid), min_size=2, max_size=12), confidence=st.sampled_from([0.8, 0.95, 0.99]))
def test_paired_statistics_match_scipy(pairs, confidence):
    x, y = np.array(pairs).T
    paired = compare_paired(x, y, confidence)
    assert paired.n_pairs == len(x)
    assert paired.delta == pytest.approx(np.mean(x - y), rel=1e-9, abs=1e-12)
    assert paired.delta == pytest.approx(np.mean(x) - np.mean(y), rel=1e-9, abs=1e-12)  # all seeds shared
    if np.std(x - y) > 0:
        reference = sps.ttest_rel(x, y)
        assert paired.p_value == pytest.approx(reference.pvalue, rel=1e-12, abs=1e-15)
        assert 0.0 <= paired.p_value <= 1.0
        assert paired.ci_low <= paired.delta <= paired.ci_high
        ci = reference.confidence_interval(confidence)
        assert (paired.ci_low, paired.ci_high) == pytest.approx((ci.low, ci.high), rel=1e-12, abs=1e-15)
    welch = compare(x, y, confidence).p_value
    assert math.isnan(welch) or 0.0 <= welch <= 1.0


@settings(max_examples=25, deadline=None)  # statsmodels' Holm runs gc.collect(): 0.1-0.4 s a call in pytest
@given(st.lists(st.one_of(st.floats(0, 1), st.just(math.nan)), max_size=15))
def test_holm_is_at_least_the_raw_p_and_keeps_its_order(p):
    adjusted = holm(p)
    raw = np.asarray(p, float)
    finite = np.isfinite(raw)
    assert np.array_equal(np.isnan(adjusted), ~finite)
    assert np.all(adjusted[finite] >= raw[finite]) and np.all(adjusted[finite] <= 1.0)
    order = np.argsort(raw[finite], kind="stable")
    assert np.all(np.diff(adjusted[finite][order]) >= 0)  # monotone in the ordering of the raw p


COMPARED = ("delta", "delta_ci_low", "delta_ci_high", "p_value", "n_pairs", "delta_paired", "delta_paired_ci_low")
COMPARED += ("delta_paired_ci_high", "p_paired", "p_holm", "effect_size", "mde")


@settings(max_examples=15, deadline=None)  # two tables an example, each a Holm per metric (see above)
@given(
    base=st.lists(grid, min_size=3, max_size=6),
    rows=st.lists(st.lists(grid, min_size=3, max_size=6), min_size=1, max_size=3),
    shift=st.integers(-640, 640).map(lambda k: k / 64),
)
def test_shifting_every_run_by_a_constant_changes_no_comparison(base, rows, shift):
    table_rows = {"base": dict(enumerate(base))} | {f"v{i}": dict(enumerate(r)) for i, r in enumerate(rows)}
    runs = runs_frame(table_rows)
    table = ablation_table(runs, metrics=[ACC], baseline="base")
    shifted = ablation_table(runs.assign(**{ACC: runs[ACC] + shift}), metrics=[ACC], baseline="base")
    for stat in COMPARED:
        pd.testing.assert_series_equal(
            shifted[(ACC, stat)], table[(ACC, stat)], check_exact=False, rtol=1e-7, atol=1e-12
        )
    assert shifted.attrs["tests"] == table.attrs["tests"]
    p = table.xs("p_holm", axis=1, level="stat")[ACC].drop("base")
    raw = [
        table.loc[r, (ACC, "p_paired" if t == "paired" else "p_value")] for r, t in table.attrs["tests"][ACC].items()
    ]
    assert np.all((p.to_numpy() >= np.asarray(raw)) | np.isnan(raw))
    assert np.all((0 <= p) & (p <= 1) | p.isna())


# --- exports -------------------------------------------------------------------------------------------------


def test_exports_carry_every_new_column_and_the_note(tmp_path):
    table = ablation_table(seed_example(), metrics=[ACC], baseline="plain")
    paths = export_table(table, tmp_path)
    csv = pd.read_csv(paths["csv"], index_col=0)
    new = ("n_pairs", "delta_paired", "delta_paired_ci_low", "delta_paired_ci_high", "p_paired", "p_holm")
    assert {f"{ACC} {s}" for s in new + ("effect_size", "mde", "p_value")} <= set(csv.columns)
    assert csv.loc["plain", [f"{ACC} {s}" for s in new]].isna().all()  # the baseline is not compared to itself
    deltas = format_deltas(table)
    assert list(deltas.index) == [("repconv", ACC)]
    assert deltas.loc[("repconv", ACC), "test"] == "paired, 5 seeds"
    latex = to_latex(table)
    assert r"80\% power" in latex and "paired, 5 seeds" in latex and r"g\_av" in latex

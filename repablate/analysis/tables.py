"""Ablation tables: rows by variant (or any config keys), columns by metric, with the statistics a reviewer
asks for, and their export to markdown, LaTeX and CSV."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from repablate.analysis.collect import completed, failures, resolve_column, status_counts
from repablate.analysis.pooling import check_pooling, row_label
from repablate.analysis.stats import (
    MDE_ALPHA,
    MDE_POWER,
    compare,
    compare_paired,
    hedges_g,
    holm,
    minimum_detectable_effect,
    pair_by_seed,
    summarize,
)
from repablate.results import write_atomically

# Metrics shown when none are named, in this order, where the runs have them (classification, then detection).
DEFAULT_METRICS = (
    "deploy_form/test/acc",
    "deploy_form/val/acc",
    "deploy_form/test/map50",
    "deploy_form/test/map",
    "deploy_form/val/map50",
    "deploy_form/val/map",
    "equivalence/max_abs",
    "train_form/latency_ms",
    "deploy_form/latency_ms",
    "deploy_form/params",
    "deploy_form/flops",
)
SUMMARY_STATS = ("n", "mean", "std", "ci_low", "ci_high")
COMPARISON_STATS = ("delta", "delta_ci_low", "delta_ci_high", "p_value")
PAIRED_STATS = ("n_pairs", "delta_paired", "delta_paired_ci_low", "delta_paired_ci_high", "p_paired")
EFFECT_STATS = ("p_holm", "effect_size", "mde")
SEED = "seed"  # runs of one seed share data order and initialization: rows are compared seed by seed on it


def default_metrics(runs: pd.DataFrame) -> list[str]:
    """The :data:`DEFAULT_METRICS` that at least one completed run reports."""
    done = completed(runs)
    return [m for m in DEFAULT_METRICS if m in done and pd.to_numeric(done[m], errors="coerce").notna().any()]


def ablation_table(
    runs: pd.DataFrame,
    metrics: Sequence[str] | None = None,
    by: Sequence[str] = ("variant",),
    baseline: str | None = None,
    confidence: float = 0.95,
    pool: Sequence[str] | bool = (),
) -> pd.DataFrame:
    """Statistics of each metric per group of completed runs.

    ``by`` and ``metrics`` name columns, or config keys as on the command line (``optimizer.lr``).
    Rows: one per value of ``by``, labelled by the values joined with commas. Columns: a MultiIndex
    (metric, statistic) with n, mean, std, ci_low, ci_high (t-interval of the mean at ``confidence``) and, when
    ``baseline`` names a row (its ``by`` values joined by commas, as text), every row against it:

    - delta, delta_ci_low, delta_ci_high, p_value: difference of means, its Welch interval, Welch's t-test;
    - n_pairs, delta_paired, delta_paired_ci_low, delta_paired_ci_high, p_paired: the paired t-test on the seeds
      (``seed`` column) both rows ran (:func:`~repablate.analysis.stats.pair_by_seed`): how many, the mean of the
      per-seed differences, its t-interval and p; NaN below two shared seeds;
    - p_holm, effect_size, mde: of the row's test, paired where p_paired is defined, else Welch: its p adjusted
      by Holm-Bonferroni across the table's rows (per metric, the rows with a p), Hedges' g (g_av paired, g_s
      Welch: :func:`~repablate.analysis.stats.hedges_g`) and the minimum detectable effect at 80% power, alpha
      0.05, in the metric's units (:func:`~repablate.analysis.stats.minimum_detectable_effect`).

    ``table.attrs["tests"][metric][row]`` says which test that is: "paired", "welch", or None where neither is
    defined. The baseline row comes first; its comparison columns are against itself (delta 0) or NaN.

    A row averages replicates only: runs whose configurations differ in anything but the seed (and bookkeeping,
    see :mod:`repablate.analysis.pooling`) raise :class:`~repablate.analysis.pooling.PoolingError` naming the
    keys, unless ``pool`` names them (``True``: any). ``table.attrs["pooled"]`` holds the keys pooled that way.
    """
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be strictly between 0 and 1, got {confidence!r}")
    by = list(by)
    if not by:
        raise ValueError("by must name at least one column to group runs by, e.g. ['variant']")
    by = [resolve_column(runs, c) for c in by]
    metrics = [resolve_column(runs, m) for m in metrics] if metrics is not None else default_metrics(runs)
    if not metrics:
        raise ValueError(f"no metric to tabulate: the runs report none of {list(DEFAULT_METRICS)}; name metric columns")
    pooled = check_pooling(runs, by, pool)
    done = completed(runs)
    values = done[metrics].apply(pd.to_numeric, errors="coerce")
    grouped = values.groupby([done[c] for c in by], dropna=False, sort=True)
    groups = {row_label(key): rows.index for key, rows in grouped}
    if baseline is not None and baseline not in groups:
        raise ValueError(f"baseline {baseline!r} is not a group of {by}; the groups are: {', '.join(groups)}")
    order = [baseline] * (baseline is not None) + [g for g in groups if g != baseline]
    seeds = done[SEED] if SEED in done else pd.Series(math.nan, index=done.index)
    rows, tests = {}, {metric: {} for metric in metrics}
    for label in order:
        row = {}
        for metric in metrics:
            column = values.loc[groups[label], metric]
            summary = summarize(column, confidence)
            row.update({(metric, stat): getattr(summary, stat) for stat in SUMMARY_STATS})
            if baseline is None:
                continue
            base = values.loc[groups[baseline], metric]
            comparison = compare(column, base, confidence)
            row.update(zip([(metric, s) for s in COMPARISON_STATS], vars(comparison).values(), strict=True))
            if label == baseline:
                row.update({(metric, stat): math.nan for stat in PAIRED_STATS + EFFECT_STATS})
                continue
            x, y, _ = pair_by_seed(column, seeds[groups[label]], base, seeds[groups[baseline]])
            paired = compare_paired(x, y, confidence)
            row.update(zip([(metric, s) for s in PAIRED_STATS], vars(paired).values(), strict=True))
            if math.isfinite(paired.p_value):
                tests[metric][label] = "paired"
                row[metric, "effect_size"] = hedges_g(x, y, paired=True)
                row[metric, "mde"] = minimum_detectable_effect(x, y, paired=True)
            else:
                tests[metric][label] = "welch" if math.isfinite(comparison.p_value) else None
                row[metric, "effect_size"] = hedges_g(column, base)
                row[metric, "mde"] = minimum_detectable_effect(column, base)
        rows[label] = row
    table = pd.DataFrame.from_dict(rows, orient="index")
    table.columns = pd.MultiIndex.from_tuples(table.columns, names=["metric", "stat"])
    if baseline is not None:  # Holm across the rows, per metric, of each row's own test's p
        compared = [label for label in order if label != baseline]
        for metric in metrics:
            p = [
                table.loc[label, (metric, "p_paired" if tests[metric][label] == "paired" else "p_value")]
                for label in compared
            ]
            table.loc[compared, (metric, "p_holm")] = holm(p)
        table = table[[(m, s) for m in metrics for s in SUMMARY_STATS + COMPARISON_STATS + PAIRED_STATS + EFFECT_STATS]]
    table.index.name = ",".join(c.removeprefix("config/") for c in by)
    table.attrs.update(
        baseline=baseline,
        confidence=confidence,
        by=by,
        pooled=pooled,
        tests=tests if baseline is not None else {},
        mde={"alpha": MDE_ALPHA, "power": MDE_POWER},
    )
    return table


def _num(x: float, sign: bool = False) -> str:
    """Four significant figures; k and M for counts such as parameters and FLOPs; an en dash for "undefined"."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    plus = "+" if sign else ""
    for threshold, scale, suffix in ((1e9, 1e9, "G"), (1e6, 1e6, "M"), (1e4, 1e3, "k")):
        if abs(x) >= threshold:
            return f"{x / scale:{plus}.4g}{suffix}"
    return f"{x:{plus}.4g}"


def _metrics(table: pd.DataFrame) -> list[str]:
    return list(table.columns.get_level_values("metric").unique())


def format_table(table: pd.DataFrame) -> pd.DataFrame:
    """The table as text for people: a column "n" (completed runs per row), then one column per metric with
    "mean ± std [confidence interval of the mean]"; a metric with fewer values than n says so ("n=2")."""
    n_runs = table.xs("n", axis=1, level="stat").max(axis=1).astype(int)
    out = pd.DataFrame({"n": n_runs.astype(str)}, index=table.index)
    for metric in _metrics(table):
        t = table[metric]
        out[metric] = [
            f"{_num(m)} ± {_num(s)} [{_num(lo)}, {_num(hi)}]" + (f" (n={int(k)})" if k != n else "")
            for m, s, lo, hi, k, n in zip(t["mean"], t["std"], t["ci_low"], t["ci_high"], t["n"], n_runs, strict=True)
        ]
    return out


def _test_text(test: str | None, n_pairs: float) -> str:
    """Which test a row's p comes from and, when not the paired one, why."""
    pairs = int(n_pairs) if n_pairs == n_pairs else 0  # n_pairs == n_pairs: not NaN
    if test == "paired":
        return f"paired, {pairs} seeds"
    if test is None:
        return "none (no spread, or too few runs)"
    why = "per-seed differences without spread" if pairs >= 2 else f"{pairs} shared seed{'s' * (pairs != 1)}"
    return f"Welch ({why})"


def format_deltas(table: pd.DataFrame) -> pd.DataFrame | None:
    """Each row against the baseline as text, one line per (row, metric): the difference and its interval from the
    row's test (paired: the mean of the per-seed differences; Welch: the difference of means), which test, its p,
    the Holm-adjusted p, Hedges' g and the minimum detectable effect. None when the table has no baseline."""
    baseline = table.attrs.get("baseline")
    if baseline is None:
        return None
    level = f"{table.attrs.get('confidence', 0.95):.0%}"
    power = f"{table.attrs.get('mde', {}).get('power', MDE_POWER):.0%}"
    tests = table.attrs.get("tests", {})
    lines = {}
    for label in table.index:
        if label == baseline:
            continue
        for metric in _metrics(table):
            t = table.loc[label, metric]
            test = tests.get(metric, {}).get(label)
            paired = test == "paired"
            d, lo, hi, p = (
                t[stat]
                for stat in (
                    ("delta_paired", "delta_paired_ci_low", "delta_paired_ci_high", "p_paired")
                    if paired
                    else ("delta", "delta_ci_low", "delta_ci_high", "p_value")
                )
            )
            lines[label, metric] = {
                f"Δ [{level} interval]": f"{_num(d, True)} [{_num(lo, True)}, {_num(hi, True)}]",
                "test": _test_text(test, t["n_pairs"]),
                "p": _num(p),
                "p (Holm)": _num(t["p_holm"]),
                "Hedges' g": _num(t["effect_size"], True),
                f"MDE ({power} power)": _num(t["mde"]),
            }
    columns = [f"Δ [{level} interval]", "test", "p", "p (Holm)", "Hedges' g", f"MDE ({power} power)"]
    out = pd.DataFrame.from_dict(lines, orient="index", columns=columns)
    out.index = pd.MultiIndex.from_tuples(list(lines), names=[table.index.name or "row", "metric"])
    return out


def comparison_note(table: pd.DataFrame) -> str:
    """What each figure of :func:`format_deltas` is, in words: which test each p comes from, across which rows
    Holm adjusts, which Hedges' g and which minimum detectable effect ("" when the table has no baseline)."""
    if table.attrs.get("baseline") is None:
        return ""
    mde = table.attrs.get("mde", {})
    alpha, power = mde.get("alpha", MDE_ALPHA), mde.get("power", MDE_POWER)
    family = sorted({sum(t is not None for t in rows.values()) for rows in table.attrs.get("tests", {}).values()})
    return (
        "*p*: a paired t-test on the seeds the row shares with the baseline (how many: *test*; Δ is then the mean "
        "of the per-seed differences), else Welch's t-test on all runs of both rows (Δ: the difference of means). "
        "*p (Holm)*: that p, Holm-Bonferroni adjusted across the table's rows, per metric "
        f"({' or '.join(map(str, family)) or '0'} p-values per metric). "
        "*Hedges' g*: the bias-corrected standardized difference: g_av (over the mean of the two rows' SDs) where "
        "the test is paired, g_s (over the pooled SD) for Welch. "
        f"*MDE*: the smallest true difference a two-sided t-test at alpha {alpha:g} would detect with {power:.0%} "
        "power at this spread and n (paired: SD of the per-seed differences; Welch: pooled SD), in the metric's "
        "units."
    )


def _headings(table: pd.DataFrame) -> tuple[str, str]:
    level = f"{table.attrs.get('confidence', 0.95):.0%}"
    return (
        f"Mean ± std [{level} confidence interval of the mean], completed runs",
        f"Difference from {table.attrs.get('baseline')} [{level} interval of the difference], p, Holm-adjusted p, "
        "Hedges' g, minimum detectable effect (MDE)",
    )


def flat_columns(table: pd.DataFrame) -> pd.DataFrame:
    """The numeric table with its (metric, stat) columns joined as "<metric> <stat>", for CSV."""
    flat = table.copy()
    flat.columns = [f"{metric} {stat}" for metric, stat in table.columns]
    return flat


def _failure_lines(runs: pd.DataFrame) -> pd.DataFrame:
    failed = failures(runs).copy()
    # The last line of a traceback is the exception itself: enough for a table, the full text is in runs.csv.
    failed["error"] = [
        str(e).strip().splitlines()[-1][:300] if isinstance(e, str) and e.strip() else "" for e in failed["error"]
    ]
    if "diverged_at_step" in failed:  # where a diverged run stopped leads its line
        steps = pd.to_numeric(failed.pop("diverged_at_step"), errors="coerce")
        failed["error"] = [
            f"at step {int(step)}" + (f": {error}" if error else "")
            if status == "diverged" and step == step
            else error  # step == step: not NaN
            for status, step, error in zip(failed["status"], steps, failed["error"], strict=True)
        ]
    if "overrides" in failed:  # only what sets a job apart: overrides shared by every job are noise here
        listed = [set(o.split()) for o in runs["overrides"].fillna("").astype(str) if o]  # "": none recorded
        common = set.intersection(*listed) if listed else set()
        failed["overrides"] = [" ".join(o for o in str(row).split() if o not in common) for row in failed["overrides"]]
    return failed


def code_versions(runs: pd.DataFrame) -> list[str]:
    """The distinct ``git_commit`` values of the completed runs ("-dirty": uncommitted changes)."""
    done = completed(runs)
    return sorted(done["git_commit"].dropna().astype(str).unique()) if "git_commit" in done else []


def left_out_summary(runs: pd.DataFrame) -> str:
    """The runs left out of the statistics, counted by status: "2 failed, 1 diverged" ("" when none)."""
    return ", ".join(f"{n} {status}" for status, n in status_counts(runs).items() if status != "completed")


def failures_markdown(runs: pd.DataFrame) -> str:
    """The runs left out of the statistics, one short table per status (failed, diverged, interrupted, missing,
    invalid), each line with its error's last line ("" when every run completed)."""
    lines = _failure_lines(runs)
    if lines.empty:
        return ""
    text = f"**Failed or missing jobs ({len(lines)})**: {left_out_summary(runs)}; none enters the statistics\n"
    for status, rows in lines.groupby("status", sort=False):
        text += f"\n*{status} ({len(rows)})*\n\n{rows.drop(columns='status').to_markdown(index=False)}\n"
    return text


def to_markdown(table: pd.DataFrame, runs: pd.DataFrame | None = None) -> str:
    """Markdown: the formatted table, the differences from the baseline (if any) with the note saying which test
    each p comes from (:func:`comparison_note`), what was pooled on purpose,
    then, when ``runs`` is given, a warning if the runs come from several code versions and the runs left out of
    the statistics by status (:func:`failures_markdown`)."""
    means, deltas = _headings(table)
    text = f"**{means}**\n\n{format_table(table).to_markdown()}\n"
    if (formatted := format_deltas(table)) is not None and not formatted.empty:
        deltas_md = formatted.reset_index().to_markdown(index=False, disable_numparse=True)  # keep "+" signs
        text += f"\n**{deltas}**\n\n{deltas_md}\n\n{comparison_note(table)}\n"
    if pooled := table.attrs.get("pooled"):
        keys = "; ".join(f"{key} ({', '.join(values)})" for key, values in pooled.items())
        text += f"\n**Note: rows average runs of different configurations**, pooled on purpose: {keys}\n"
    if runs is not None and len(versions := code_versions(runs)) > 1:
        text += f"\n**Warning: the runs come from {len(versions)} code versions** (git_commit): {', '.join(versions)}\n"
    if runs is not None and (left_out := failures_markdown(runs)):
        text += f"\n{left_out}"
    return text


def to_latex(table: pd.DataFrame) -> str:
    """LaTeX: the formatted table and, with a baseline, the differences as tabulars (text escaped), then the note
    saying which test each p comes from (:func:`comparison_note`)."""
    parts = [format_table(table).to_latex(escape=True)]
    if (formatted := format_deltas(table)) is not None and not formatted.empty:
        parts.append(formatted.reset_index().to_latex(escape=True, index=False))
        note = comparison_note(table).replace("*", "")
        parts.append("".join(f"\\{c}" if c in "%_&#$" else c for c in note))
    latex = "\n".join(parts)
    return latex.replace("±", r"$\pm$").replace("Δ", r"$\Delta$").replace("–", "--")


def export_table(
    table: pd.DataFrame, out_dir: str | Path, runs: pd.DataFrame | None = None, stem: str = "table"
) -> dict[str, Path]:
    """Write ``<stem>.md``, ``<stem>.tex`` and ``<stem>.csv`` (numeric) into ``out_dir``, atomically, and with
    ``runs``, ``runs.csv`` (every run, errors in full) and ``failures.csv``. Returns the paths by kind."""
    out_dir = Path(out_dir)
    paths = {
        "markdown": write_atomically(out_dir / f"{stem}.md", to_markdown(table, runs)),
        "latex": write_atomically(out_dir / f"{stem}.tex", to_latex(table)),
        "csv": write_atomically(out_dir / f"{stem}.csv", flat_columns(table).to_csv()),
    }
    if runs is not None:
        paths["runs"] = write_atomically(out_dir / "runs.csv", runs.to_csv(index=False))
        paths["failures"] = write_atomically(out_dir / "failures.csv", failures(runs).to_csv(index=False))
    return paths

"""repablate.analysis on synthetic sweeps: collection, statistics against scipy, tables, exports, figures, CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats as sps

from repablate.analysis import (
    ablation_table,
    accuracy_vs_latency,
    branch_gradient_shares,
    collect_runs,
    collect_wandb,
    compare,
    export_table,
    failures,
    forms_comparison,
    group_labels,
    load_branch_gradients,
    save_figure,
    status_counts,
    summarize,
    tidy,
    to_latex,
    to_markdown,
    write_report,
)
from repablate.analysis.synthetic import write_synthetic_sweep
from repablate.results import write_atomically as write_text_atomic

ROOT = Path(__file__).resolve().parents[1]
ACC = "deploy_form/test/acc"


def run_cli(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg"}
    return subprocess.run(
        [sys.executable, "-m", "repablate.analysis", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def sweep(tmp_path_factory) -> Path:
    return write_synthetic_sweep(
        tmp_path_factory.mktemp("sweep"),
        variants=("plain", "repconv_n", "repconv"),
        seeds=(0, 1, 2),
        failed=1,
        missing=1,
    )


def results_files(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.rglob("results.json"))]


# --- statistics against scipy and textbook numbers -------------------------------------------------------------


def test_summary_on_known_numbers():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    # mean 2.5, s = sqrt(5/3), t(0.975, df=3) = 3.182446 (tables); half width = t * s / sqrt(4)
    half = 3.182446305284263 * math.sqrt(5 / 3) / 2
    assert (s.n, s.mean) == (4, 2.5)
    assert s.std == pytest.approx(math.sqrt(5 / 3), rel=1e-12)
    assert (s.ci_low, s.ci_high) == pytest.approx((2.5 - half, 2.5 + half), rel=1e-9)


def test_welch_on_known_numbers():
    a, b = [1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 5.0, 6.0]
    c = compare(b, a)
    ref = sps.ttest_ind(b, a, equal_var=False)
    # Welch-Satterthwaite by hand: var 5/3 and 10/3 over n=4 each -> t = 1.5 / sqrt(1.25), df = 5.4
    t = 1.5 / math.sqrt(1.25)
    assert c.delta == pytest.approx(1.5)
    assert c.p_value == pytest.approx(2 * sps.t.sf(t, 5.4), rel=1e-9)
    assert c.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    half = sps.t.ppf(0.975, 5.4) * math.sqrt(1.25)  # the Welch interval by hand
    assert (c.ci_low, c.ci_high) == pytest.approx((1.5 - half, 1.5 + half), rel=1e-9)


finite = st.floats(-1e3, 1e3, allow_nan=False)


@settings(max_examples=60, deadline=None)
@given(
    st.lists(finite, min_size=2, max_size=12),
    st.lists(finite, min_size=2, max_size=12),
    st.sampled_from([0.8, 0.9, 0.95, 0.99]),
)
def test_statistics_match_scipy(x, y, confidence):
    """Against scipy directly, relative tolerance 1e-9 (absolute 1e-9 near zero)."""
    s = summarize(x, confidence)
    assert s.n == len(x) and s.mean == pytest.approx(np.mean(x), rel=1e-9, abs=1e-9)
    if np.std(x) > 1e-6:
        low, high = sps.t.interval(confidence, len(x) - 1, loc=np.mean(x), scale=sps.sem(x))
        assert (s.ci_low, s.ci_high) == pytest.approx((low, high), rel=1e-9, abs=1e-9)
        assert s.ci_low <= s.mean <= s.ci_high
    c = compare(x, y, confidence)
    assert c.delta == pytest.approx(np.mean(x) - np.mean(y), rel=1e-9, abs=1e-9)
    if np.std(x) > 1e-6 and np.std(y) > 1e-6:
        ref = sps.ttest_ind(x, y, equal_var=False)
        assert c.p_value == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-12)
        swapped = compare(y, x, confidence)  # the test is symmetric; the interval flips sign
        assert swapped.p_value == pytest.approx(c.p_value, rel=1e-9, abs=1e-12)
        assert swapped.ci_low == pytest.approx(-c.ci_high, rel=1e-9, abs=1e-9)


def test_statistics_undefined_cases_are_nan():
    assert summarize([]).n == 0 and math.isnan(summarize([]).mean)
    one = summarize([3.0, float("nan")])
    assert one.n == 1 and one.mean == 3.0 and math.isnan(one.std) and math.isnan(one.ci_low)
    flat = summarize([2.0, 2.0, 2.0])
    assert (flat.std, flat.ci_low, flat.ci_high) == (0.0, 2.0, 2.0)
    assert math.isnan(compare([1.0], [1.0, 2.0]).p_value)


# --- collection --------------------------------------------------------------------------------------------------


def test_collect_reports_failed_and_missing_jobs(sweep):
    runs = collect_runs(sweep)
    assert len(runs) == 3 * 3 + 2
    failed = failures(runs).set_index("status")
    assert set(failed.index) == {"failed", "missing"}
    assert "synthetic failure" in failed.loc["failed", "error"]
    assert "no results.json" in failed.loc["missing", "error"]
    assert failed.loc["missing", "variant"] == "plain"  # read back from the job's Hydra overrides


def test_collect_is_tolerant(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "results.json").write_text(
        json.dumps(
            {"status": "completed", "variant": "x", "seed": 0, "new/key": 1.5, "grad/warnings": ["w1"], "error": None}
        )
    )
    (tmp_path / "b" / ".hydra").mkdir(parents=True)
    (tmp_path / "b" / "results.json").write_text("{not json")
    runs = collect_runs(tmp_path).set_index("status")
    assert runs.loc["completed", "new/key"] == 1.5  # unknown keys pass through
    assert runs.loc["completed", "grad/warnings"] == '["w1"]'  # lists become text, so any column groups
    assert "unreadable results.json" in runs.loc["missing", "error"]
    with pytest.raises(ValueError, match="deploy_form/test/acc"):  # a missing metric is named, not guessed
        ablation_table(runs.reset_index(), metrics=[ACC])


def test_collect_rejects_empty_or_absent_dirs(tmp_path):
    with pytest.raises(FileNotFoundError, match="no runs"):
        collect_runs(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_runs(tmp_path / "nope")


def write_job(run_dir: Path, results: dict | str | None, overrides: list[str] | None = None) -> Path:
    """A hand-built job directory: results.json (a record, raw text, or None for a killed job that wrote none)
    and, given ``overrides``, Hydra's .hydra/overrides.yaml."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if overrides is not None:
        (run_dir / ".hydra").mkdir(exist_ok=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    if results is not None:
        (run_dir / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))
    return run_dir


def test_results_without_status_or_variant_are_invalid_not_dropped(tmp_path):
    write_job(tmp_path / "0", {"status": "completed", "variant": "plain", "seed": 0, ACC: 0.9})
    write_job(tmp_path / "1", {"variant": "plain", "seed": 1, ACC: 0.1})
    write_job(tmp_path / "2", {"status": "completed", "seed": 2, ACC: 0.5}, ["+variant=repconv", "seed=2"])
    write_job(tmp_path / "3", {"status": "running", "variant": "plain", "seed": 3, ACC: 0.5})
    runs = collect_runs(tmp_path)
    by_dir = runs.set_index("run_dir")
    errors = {Path(d).name: e for d, e in by_dir["error"].items()}
    assert by_dir["status"].tolist() == ["completed", "invalid", "invalid", "invalid"]
    assert errors["1"] == "invalid results.json: no 'status' field"
    assert errors["2"] == "invalid results.json: a completed run with no 'variant' field"
    assert errors["3"].startswith("invalid results.json: unknown status 'running' (expected one of completed, failed")
    assert by_dir.loc[str(tmp_path / "2"), "variant"] == "repconv"  # which job it was, from its overrides
    table = ablation_table(runs, metrics=[ACC])
    assert list(table.index) == ["plain"]  # no row named "nan"
    assert table.loc["plain", (ACC, "mean")] == 0.9  # and nothing of the invalid runs averaged in
    assert status_counts(runs) == {"completed": 1, "invalid": 3}
    markdown = to_markdown(table, runs)
    assert "**Failed or missing jobs (3)**" in markdown and "*invalid (3)*" in markdown
    assert all(error in markdown for error in errors.values() if error == error)


def test_diverged_and_interrupted_runs_are_listed_never_averaged(tmp_path):
    write_job(tmp_path / "0", {"status": "completed", "variant": "plain", "seed": 0, ACC: 0.9})
    write_job(tmp_path / "1", {"status": "completed", "variant": "plain", "seed": 1, ACC: 0.8})
    write_job(
        tmp_path / "2",
        {
            "status": "diverged",
            "variant": "plain",
            "seed": 2,
            ACC: 0.1,
            "diverged_at_step": 37,
            "error": "FloatingPointError: non-finite loss",
        },
    )
    write_job(tmp_path / "3", {"status": "interrupted", "variant": "plain", "seed": 3, ACC: 0.2, "error": "SIGTERM"})
    runs = collect_runs(tmp_path)
    table = ablation_table(runs, metrics=[ACC])
    assert table.loc["plain", (ACC, "n")] == 2 and table.loc["plain", (ACC, "mean")] == pytest.approx(0.85)
    left_out = failures(runs).set_index("status")
    assert list(left_out.index) == ["diverged", "interrupted"] and left_out.loc["diverged", "diverged_at_step"] == 37
    assert status_counts(runs) == {"completed": 2, "diverged": 1, "interrupted": 1}
    markdown = to_markdown(table, runs)
    assert "**Failed or missing jobs (2)**: 1 diverged, 1 interrupted" in markdown
    assert "*diverged (1)*" in markdown and "at step 37: FloatingPointError: non-finite loss" in markdown
    assert "*interrupted (1)*" in markdown and "SIGTERM" in markdown
    done = run_cli(str(tmp_path), "--metrics", ACC, "--out", str(tmp_path / "out"), "--no-figures")
    assert done.returncode == 0, done.stderr
    assert "2 completed, 2 failed or missing (1 diverged, 1 interrupted)" in done.stdout
    assert "at step 37" in done.stdout and "*interrupted (1)*" in done.stdout
    assert pd.read_csv(tmp_path / "out" / "failures.csv")["status"].tolist() == ["diverged", "interrupted"]


def write_sweep_jobs(sweep_dir: Path, jobs: list[list[str]]) -> None:
    sweep_dir.mkdir(parents=True, exist_ok=True)
    listing = {"jobs": [{"num": number, "overrides": overrides} for number, overrides in enumerate(jobs)]}
    (sweep_dir / "sweep_jobs.json").write_text(json.dumps(listing))


SWEEP_JOBS = [[f"+variant={v}", f"seed={s}", "trainer.max_epochs=1"] for v in ("plain", "repconv") for s in (0, 1)]


def test_jobs_a_killed_sweep_never_started_are_missing_rows(tmp_path):
    sweep = tmp_path / "sweep"
    write_sweep_jobs(sweep, SWEEP_JOBS)
    write_job(sweep / "0_plain_s0", {"status": "completed", "variant": "plain", "seed": 0, ACC: 0.9}, SWEEP_JOBS[0])
    write_job(sweep / "1_plain_s1", None, SWEEP_JOBS[1])  # started, killed before it wrote results.json
    runs = collect_runs(sweep)
    assert len(runs) == 4 and (runs["status"] == "missing").sum() == 3
    never = runs[runs["error"] == "never started: the sweep stopped before this job"]
    assert never[["variant", "seed", "job"]].values.tolist() == [["repconv", 0, 2], ["repconv", 1, 3]]
    assert set(never["run_dir"]) == {str(sweep)}  # the sweep that should have run them
    assert never["overrides"].tolist() == [" ".join(SWEEP_JOBS[2]), " ".join(SWEEP_JOBS[3])]
    killed = runs[runs["run_dir"] == str(sweep / "1_plain_s1")]
    assert killed["error"].str.startswith("no results.json").all()  # matched to its job, not listed twice
    markdown = to_markdown(ablation_table(runs, metrics=[ACC]), runs)
    assert "**Failed or missing jobs (3)**: 3 missing" in markdown and "never started" in markdown


def test_never_started_jobs_are_matched_within_their_own_sweep(tmp_path):
    """multirun/<name> pools several sweeps of the same jobs: each sweep's listing answers for its own jobs."""
    for name, ran in (("a", 4), ("b", 1)):
        write_sweep_jobs(tmp_path / name, SWEEP_JOBS)
        for number, overrides in enumerate(SWEEP_JOBS[:ran]):
            variant, seed = overrides[0].split("=")[1], int(overrides[1].split("=")[1])
            record = {"status": "completed", "variant": variant, "seed": seed, ACC: 0.5}
            write_job(tmp_path / name / f"{number}", record, overrides)
    runs = collect_runs(tmp_path)
    missing = runs[runs["status"] == "missing"]
    assert len(runs) == 8 and set(missing["run_dir"]) == {str(tmp_path / "b")} and len(missing) == 3


def test_an_unreadable_sweep_jobs_listing_is_reported(tmp_path):
    (tmp_path / "sweep_jobs.json").write_text('{"jobs": [{"num": 0')
    write_job(tmp_path / "0", {"status": "completed", "variant": "plain", "seed": 0, ACC: 0.9})
    runs = collect_runs(tmp_path).set_index("status")
    assert runs.loc["invalid", "error"].startswith("unreadable sweep_jobs.json")
    assert runs.loc["invalid", "run_dir"] == str(tmp_path)


def test_tidy_has_one_row_per_run_and_metric(sweep):
    runs = collect_runs(sweep)
    long = tidy(runs, [ACC, "deploy_form/latency_ms", "not/a/metric"])
    assert len(long) == 9 * 2 and set(long["metric"]) == {ACC, "deploy_form/latency_ms"}
    by_run = {r["run_dir"]: r[ACC] for r in results_files(sweep) if r["status"] == "completed"}
    for _, row in long[long["metric"] == ACC].iterrows():
        assert row["value"] == by_run[str(Path(row["run_dir"]))]


def test_wandb_runs_give_the_same_columns(sweep):
    local = collect_runs(sweep)
    done = local[local["status"] == "completed"]
    fake_runs = []
    for record in results_files(sweep):
        summary = {k: v for k, v in record.items() if not k.startswith("config/")}
        config = {
            "optimizer": {"lr": record["config/optimizer.lr"]},
            "trainer": {"max_epochs": 3},
            "seed": record["seed"],
        }
        state = "finished" if record["status"] == "completed" else "failed"
        fake_runs.append(
            SimpleNamespace(summary=summary, config=config, state=state, path=["me", "proj", str(len(fake_runs))])
        )
    api = SimpleNamespace(runs=lambda path, filters=None: fake_runs if path == "me/proj" else [])
    remote = collect_wandb("me/proj", group="article", api=api)
    assert set(done.columns) - {"overrides"} <= set(remote.columns)
    table_local = ablation_table(local, metrics=[ACC], baseline="plain")
    table_remote = ablation_table(remote, metrics=[ACC], baseline="plain")
    pd.testing.assert_frame_equal(table_local, table_remote)
    with pytest.raises(LookupError, match="other/proj"):
        collect_wandb("other/proj", api=api)


# --- tables ------------------------------------------------------------------------------------------------------


def test_table_values_equal_the_run_files(sweep):
    table = ablation_table(collect_runs(sweep), metrics=[ACC, "deploy_form/latency_ms"], baseline="plain")
    records = [r for r in results_files(sweep) if r["status"] == "completed"]
    assert list(table.index) == ["plain", "repconv", "repconv_n"]  # baseline first
    for variant in table.index:
        for metric in (ACC, "deploy_form/latency_ms"):
            values = [r[metric] for r in records if r["variant"] == variant]
            base = [r[metric] for r in records if r["variant"] == "plain"]
            row = table.loc[variant, metric]
            assert row["n"] == len(values) == 3
            assert row["mean"] == pytest.approx(np.mean(values), rel=1e-12)
            assert row["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-12)
            assert row["delta"] == pytest.approx(np.mean(values) - np.mean(base), abs=1e-12)
            if variant != "plain":
                assert row["p_value"] == pytest.approx(sps.ttest_ind(values, base, equal_var=False).pvalue, rel=1e-9)
                seed_order = [
                    [r[metric] for r in sorted(records, key=lambda r: r["seed"]) if r["variant"] == v]
                    for v in (variant, "plain")
                ]  # the sweep runs seeds 0, 1, 2 for every variant
                assert row["n_pairs"] == 3
                assert row["p_paired"] == pytest.approx(sps.ttest_rel(*seed_order).pvalue, rel=1e-9)


def test_table_groups_by_any_config_keys(sweep):
    runs = collect_runs(sweep)
    table = ablation_table(runs, metrics=[ACC], by=["variant", "seed"], baseline="plain,0")
    assert table.index[0] == "plain,0" and len(table) == 9 and (table[(ACC, "n")] == 1).all()
    with pytest.raises(ValueError, match="variant = plain"):  # one row per lr would average the variants
        ablation_table(runs, metrics=[ACC], by=["optimizer.lr"])
    by_lr = ablation_table(runs, metrics=[ACC], by=["optimizer.lr"], pool=["variant"])
    assert by_lr[(ACC, "n")].tolist() == [9]


def test_table_rejects_bad_arguments(sweep):
    runs = collect_runs(sweep)
    with pytest.raises(ValueError, match=r"baseline 'resnet'.*plain, repconv, repconv_n"):
        ablation_table(runs, baseline="resnet")
    with pytest.raises(ValueError, match="confidence must be strictly between 0 and 1, got 95"):
        ablation_table(runs, confidence=95)
    with pytest.raises(ValueError, match=r"unknown column .optimiser."):
        ablation_table(runs, by=["optimiser"])


def test_exports_show_the_numbers_and_the_failures(sweep, tmp_path):
    runs = collect_runs(sweep)
    table = ablation_table(runs, metrics=[ACC], baseline="plain")
    paths = export_table(table, tmp_path, runs=runs)
    markdown = paths["markdown"].read_text()
    assert markdown == to_markdown(table, runs)
    mean, std = table.loc["repconv", (ACC, "mean")], table.loc["repconv", (ACC, "std")]
    assert f"{mean:.4g} ± {std:.4g}" in markdown
    assert "Failed or missing jobs (2)" in markdown and "ValueError: synthetic failure" in markdown
    assert r"$\pm$" in to_latex(table) and "deploy\\_form/test/acc" in paths["latex"].read_text()
    numeric = pd.read_csv(paths["csv"], index_col=0)
    assert numeric.loc["repconv", f"{ACC} mean"] == pytest.approx(mean, rel=1e-12)
    assert len(pd.read_csv(paths["failures"])) == 2 and len(pd.read_csv(paths["runs"])) == 11


def test_markdown_warns_when_runs_come_from_several_code_versions(sweep):
    runs = collect_runs(sweep)
    table = ablation_table(runs, metrics=[ACC])
    assert "code versions" not in to_markdown(table, runs.assign(git_commit="abc"))
    mixed = runs.assign(git_commit=["abc", "def-dirty"] * 5 + ["abc"])
    assert "the runs come from 2 code versions** (git_commit): abc, def-dirty" in to_markdown(table, mixed)


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    target = write_text_atomic(tmp_path / "t.md", "old")

    class Boom(Exception):
        pass

    def explode(_):
        raise Boom

    from repablate.results import write_atomically as write_atomic

    with pytest.raises(Boom):
        write_atomic(target, explode)
    assert target.read_text() == "old"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".t.")]  # no temporary file left behind


# --- figures -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix, magic", [("png", b"\x89PNG"), ("pdf", b"%PDF"), ("svg", b"<?xml")])
def test_every_figure_renders_to_a_file(sweep, tmp_path, suffix, magic):
    runs = collect_runs(sweep)
    gradients = load_branch_gradients(runs)
    assert set(gradients["branch"]) == {"dense", "1x1", "identity"} and gradients["variant"].notna().all()
    for name, figure in {
        "acc": accuracy_vs_latency(runs),
        "forms": forms_comparison(runs),
        "grads": branch_gradient_shares(gradients),
    }.items():
        path = save_figure(figure, tmp_path / f"{name}.{suffix}")
        assert path.read_bytes().startswith(magic), name
    axes = accuracy_vs_latency(runs).axes[0]
    assert axes.get_ylabel() == ACC and len(axes.get_legend().get_texts()) == 3


def test_a_branch_has_one_colour_in_every_panel(tmp_path):
    # repconv_no1x1 has no 1x1 branch: its identity line must keep repconv's identity colour.
    sweep = write_synthetic_sweep(tmp_path, variants=("repconv", "repconv_no1x1"), seeds=(0,))
    figure = branch_gradient_shares(load_branch_gradients(collect_runs(sweep)))
    colours: dict[str, set] = {}
    for ax in figure.axes:
        legend = ax.get_legend()
        for text, handle in zip(legend.get_texts(), legend.legend_handles, strict=True):
            colours.setdefault(text.get_text(), set()).add(tuple(handle.get_color()))
    assert set(colours) == {"dense", "1x1", "identity"}
    assert all(len(c) == 1 for c in colours.values()) and len({next(iter(c)) for c in colours.values()}) == 3


def test_figures_colour_runs_by_their_table_row(sweep, tmp_path):
    runs = collect_runs(sweep)
    labels = group_labels(runs, ["variant", "optimizer.lr"])
    table = ablation_table(runs, metrics=[ACC], by=["variant", "optimizer.lr"])
    assert (
        set(labels[runs["status"] == "completed"])
        == set(table.index)
        == {"plain,0.01", "repconv,0.01", "repconv_n,0.01"}
    )
    figure = accuracy_vs_latency(runs.assign(row=labels), by="row")
    assert sorted(t.get_text() for t in figure.axes[0].get_legend().get_texts()) == sorted(table.index)
    report = write_report(runs, tmp_path, by=["variant", "optimizer.lr"])
    assert not report.skipped and report.files["branch_gradients"].is_file()


def test_report_skips_figures_whose_data_is_absent(tmp_path):
    (tmp_path / "0").mkdir()
    (tmp_path / "0" / "results.json").write_text(
        json.dumps({"status": "completed", "variant": "plain", "seed": 0, ACC: 0.5})
    )
    report = write_report(collect_runs(tmp_path), tmp_path / "out")
    assert report.table.loc["plain", (ACC, "n")] == 1
    assert set(report.skipped) == {"accuracy_vs_latency", "forms_flops_latency", "branch_gradients"}


# --- command line and layering -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_writes_tables_and_figures(sweep, tmp_path):
    out = tmp_path / "out"
    done = run_cli(str(sweep), "--baseline", "plain", "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert "9 completed, 2 failed or missing (1 failed, 1 missing)" in done.stdout
    assert "synthetic failure" in done.stdout
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert files == {
        "table.md",
        "table.tex",
        "table.csv",
        "runs.csv",
        "failures.csv",
        "figures/accuracy_vs_latency.png",
        "figures/forms_flops_latency.png",
        "figures/branch_gradients.png",
    }


@pytest.mark.slow
def test_cli_logs_tables_and_figures_to_an_offline_wandb_run(sweep, tmp_path):
    out = tmp_path / "out"
    done = run_cli(str(sweep), "--baseline", "plain", "--out", str(out), "--wandb")
    assert done.returncode == 0, done.stderr
    assert "logged to wandb (offline)" in done.stdout
    media = [p.relative_to(out).as_posix() for p in out.glob("wandb/offline-run-*/files/media/*/*")]
    assert len([m for m in media if "/table/ablation_table" in m and m.endswith(".table.json")]) == 1
    assert len([m for m in media if "/images/" in m and m.endswith(".png")]) == 3


@pytest.mark.slow
def test_cli_bad_input_names_the_value(sweep, tmp_path):
    bad = run_cli(str(sweep), "--baseline", "resnet", "--out", str(tmp_path))
    assert bad.returncode == 2 and "baseline 'resnet'" in bad.stderr and "plain" in bad.stderr
    none = run_cli()
    assert none.returncode == 2 and "either SWEEP_DIR or --from-wandb" in none.stderr
    absent = run_cli(str(tmp_path / "nope"))
    assert absent.returncode == 2 and "nope" in absent.stderr


def test_analysis_never_imports_training_code():
    code = (
        "import sys, repablate.analysis, repablate.analysis.__main__; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning') "
        "or m.startswith(('repablate.train', 'repablate.models', 'repablate.data', 'repablate.bench'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"

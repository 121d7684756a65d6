"""Tune, then compare: the tuning sweep composes as an Optuna search whose trials report their validation accuracy,
and ``python -m repablate.train.tuned`` runs each variant's seed sweep at its own best settings, refusing tuning
sweeps that would make an unfair comparison. End to end with a tiny budget: two variants, two trials each, then
two seeds each, then the analysis table with each row's tuned learning rate."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import JobReturn, JobStatus
from omegaconf import OmegaConf

from repablate.train import tuned
from repablate.train.tuned import TuningError, TuningObjective, check_comparable, read_tuning, seed_sweep_commands
from tests.test_sweeps import compose_with_hydra, subprocess_env

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SEARCH_SPACE = {"optimizer.lr": "tag(log, interval(0.001, 1.0))", "scheduler.warmup_epochs": "choice(0.0, 0.5, 1.0)"}

# One epoch of 3 batches on the digits, measurements cut short: seconds per trial.
TINY = [
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=3",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "logger=csv",
    "callbacks.progress_bar.refresh_rate=0",
    "+callbacks.deploy_check.bench.warmup=2",
    "+callbacks.deploy_check.bench.min_run_time=0.02",
]


@pytest.fixture(autouse=True)
def no_hydra_state_leaks():
    yield
    HydraConfig.instance().cfg = None


# --- the tuning sweep ------------------------------------------------------------------------------------------------


def test_tune_sweep_is_a_seeded_optuna_search_on_validation_accuracy():
    cfg = compose_with_hydra("+sweep=tune", "+variant=repconv")
    sweeper = cfg.hydra.sweeper
    assert sweeper._target_.endswith("OptunaSweeper")
    assert sweeper.direction == "maximize" and sweeper.n_trials == 12
    assert sweeper.sampler._target_ == "optuna.samplers.TPESampler" and sweeper.sampler.seed is not None
    assert {key: sweeper.params[key] for key in SEARCH_SPACE} == SEARCH_SPACE
    assert int(sweeper.params.seed) not in range(5)  # the tuning seed is none of the comparison's seeds 0-4
    assert cfg.objective == "val/acc"
    assert cfg.hydra.callbacks.objective._target_ == "repablate.train.tuned.TuningObjective"
    assert "run_directories" in cfg.hydra.callbacks  # the guard is kept
    assert str(cfg.hydra.sweep.dir).startswith("multirun/tune/repconv/")
    assert list(cfg.analysis.by) == list(SEARCH_SPACE) and cfg.analysis.baseline is None  # a row per trial


def test_tune_sweep_runs_without_wandb_when_asked():
    cfg = compose_with_hydra("+sweep=tune", "+variant=plain", "logger=csv")
    assert list(cfg.logger) == ["csv"]


def test_deep_shapes_is_the_depth_sweeps_deepest_cell():
    """The tuning setting and the depth sweep's depth-4 cell must not drift apart."""
    params = OmegaConf.load(CONF / "sweep" / "depth.yaml").hydra.sweeper.params
    cfg = compose_with_hydra("+experiment=deep_shapes", "+variant=plain")
    fixed = {key: str(value) for key, value in params.items() if key not in ("seed", "+variant")}
    assert fixed.pop("data") == cfg.hydra.runtime.choices.data == "shapes"
    assert "4" in fixed.pop("model.depth_multiplier").split(",") and cfg.model.depth_multiplier == 4
    for key, value in fixed.items():
        assert float(OmegaConf.select(cfg, key)) == float(value), key


# --- the objective the sweeper sees ----------------------------------------------------------------------------------


def _job(tmp_path: Path, status: JobStatus, value: object, record: dict | None) -> tuple:
    if record is not None:
        (tmp_path / "results.json").write_text(json.dumps(record))
    config = OmegaConf.create({"objective": "val/acc", "hydra": {"runtime": {"output_dir": str(tmp_path)}}})
    job = JobReturn(status=status)
    job.return_value = value
    return config, job


def test_objective_is_the_validation_accuracy_in_results(tmp_path):
    config, job = _job(tmp_path, JobStatus.COMPLETED, None, {"status": "completed", "val/acc": 0.75})
    TuningObjective().on_job_end(config, job)
    assert job.status == JobStatus.COMPLETED and job.return_value == 0.75


def test_a_value_the_task_returns_is_kept(tmp_path):
    config, job = _job(tmp_path, JobStatus.COMPLETED, 0.5, {"status": "completed", "val/acc": 0.75})
    TuningObjective().on_job_end(config, job)
    assert job.return_value == 0.5


def test_a_diverged_trial_scores_the_diverged_value(tmp_path):
    record = {"status": "diverged", "diverged_at_step": 7}
    config, job = _job(tmp_path, JobStatus.FAILED, RuntimeError("diverged"), record)
    TuningObjective(diverged_value=0.0).on_job_end(config, job)
    assert job.status == JobStatus.COMPLETED and job.return_value == 0.0


def test_other_failures_stay_failures(tmp_path):
    config, job = _job(tmp_path, JobStatus.FAILED, ValueError("bad"), {"status": "failed"})
    TuningObjective().on_job_end(config, job)
    assert job.status == JobStatus.FAILED
    config, job = _job(tmp_path / "none", JobStatus.FAILED, ValueError("killed"), None)  # no results.json
    TuningObjective().on_job_end(config, job)
    assert job.status == JobStatus.FAILED


def test_a_missing_objective_fails_the_trial_naming_it(tmp_path):
    config, job = _job(tmp_path, JobStatus.COMPLETED, None, {"status": "completed"})
    TuningObjective().on_job_end(config, job)
    assert job.status == JobStatus.FAILED
    with pytest.raises(KeyError, match="val/acc"):
        job.return_value  # noqa: B018 -- raises the job's error, as the sweeper sees it


# --- the follow-up command, on tuning sweeps written by hand ---------------------------------------------------------


def fake_tuning(directory: Path, variant: str, lr: float, overrides=("+experiment=deep_shapes",), **sweeper) -> Path:
    """A finished tuning sweep as Hydra's Optuna sweeper and TuningObjective leave it."""
    directory.mkdir(parents=True)
    task = ["+sweep=tune", f"+variant={variant}", *overrides, "+launcher=joblib", "hydra.launcher.n_jobs=2"]
    settings = {"sampler": {"seed": 0}, "n_trials": 12, "direction": "maximize", "params": dict(SEARCH_SPACE)}
    settings.update(sweeper)
    multirun = {"variant": variant, "objective": "val/acc", "hydra": {"overrides": {"task": task}, "sweeper": settings}}
    OmegaConf.save(OmegaConf.create(multirun), directory / tuned.SWEEP_CONFIG)
    best = {"name": "optuna", "best_params": {"optimizer.lr": lr, "scheduler.warmup_epochs": 0.5}, "best_value": 0.9}
    OmegaConf.save(OmegaConf.create(best), directory / tuned.OPTUNA_RESULTS)
    return directory


def test_commands_carry_the_tuning_overrides_and_each_variants_best_values(tmp_path):
    tunings = [read_tuning(fake_tuning(tmp_path / v, v, lr)) for v, lr in (("plain", 0.0123456), ("repconv", 0.2))]
    check_comparable(tunings)
    extra = ["logger=csv", "+experiment=other"]  # replaces the tuning sweep's +experiment
    commands = seed_sweep_commands(tunings, tmp_path / "out", "0,1,2", extra, baseline="plain")
    plain = commands["plain"]
    assert plain[-2:] == extra and "+experiment=deep_shapes" not in plain
    plain = seed_sweep_commands(tunings, tmp_path / "out", "0,1,2", ["logger=csv"], baseline="plain")["plain"]
    assert plain[1:4] == ["-m", "repablate", "-m"]
    assert "+experiment=deep_shapes" in plain and "+variant=plain" in plain and "seed=0,1,2" in plain
    assert "optimizer.lr=0.0123" in plain and "scheduler.warmup_epochs=0.5" in plain  # rounded: 3 figures
    assert "optimizer.lr=0.2" in commands["repconv"]
    assert f"hydra.sweep.dir={tmp_path / 'out' / 'plain'}" in plain and plain[-1] == "logger=csv"
    # How the tuning ran (sweep, launcher, the tuning seed) is not carried over.
    assert not [o for o in plain if o.startswith(("+sweep", "+launcher", "hydra.launcher", "seed=100"))]
    # The analysis rows: variant and the tuned values; the baseline row is plain's, as the analysis labels it.
    assert "++analysis.by=[variant,optimizer.lr,scheduler.warmup_epochs]" in plain
    assert "++analysis.baseline='plain,0.0123,0.5'" in commands["repconv"]


@pytest.mark.parametrize(
    "second, match",
    [
        (dict(variant="plain"), "one tuning sweep per variant"),
        (dict(n_trials=20), "tuning budget"),
        (dict(params={"optimizer.lr": "tag(log, interval(0.01, 0.3))"}), "tuning budget"),
        (dict(overrides=("+experiment=deep_shapes", "trainer.max_epochs=9")), "overrides"),
        (dict(overrides=("+experiment=deep_shapes", "optimizer.lr=tag(log, interval(0.01, 0.3))")), "tuning budget"),
    ],
)
def test_tuning_sweeps_that_differ_in_more_than_the_variant_are_refused(tmp_path, second, match):
    first = read_tuning(fake_tuning(tmp_path / "a", "plain", 0.1))
    second = {"variant": "repconv", "lr": 0.2, **second}
    other = read_tuning(fake_tuning(tmp_path / "b", second.pop("variant"), second.pop("lr"), **second))
    with pytest.raises(TuningError, match=match):
        check_comparable([first, other])


def test_cli_refuses_bad_input_with_status_2(tmp_path, capsys):
    done = fake_tuning(tmp_path / "plain", "plain", 0.1)
    unfinished = tmp_path / "unfinished"
    fake_tuning(unfinished, "repconv", 0.1)
    (unfinished / tuned.OPTUNA_RESULTS).unlink()
    assert tuned.main([str(done), str(unfinished), "--dry-run"]) == 2
    assert "did not finish" in capsys.readouterr().err
    assert tuned.main([str(done), "optimizer.lr=0.5", "--dry-run"]) == 2  # would replace a tuned value
    assert "tuned" in capsys.readouterr().err
    assert tuned.main([str(done), "seed=3", "--dry-run"]) == 2
    assert tuned.main([str(done), "--seeds", "a,b", "--dry-run"]) == 2
    assert tuned.main([str(done), "--dry-run", "--out", str(tmp_path / "x")]) == 0
    assert "optimizer.lr=0.1" in capsys.readouterr().out


# --- end to end, tiny -----------------------------------------------------------------------------------------------


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=subprocess_env(), capture_output=True, text=True, timeout=timeout
    )


def _results(directory: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(directory.rglob("results.json"))]


@pytest.mark.slow
def test_tune_then_compare_end_to_end(tmp_path):
    tunes = {}
    for variant in ("plain", "repconv"):
        tunes[variant] = tmp_path / "tune" / variant
        done = _run(
            "-m", "repablate", "+sweep=tune", f"+variant={variant}", "hydra.sweeper.n_trials=2",
            *TINY, f"hydra.sweep.dir={tunes[variant]}",
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        trials = _results(tunes[variant])
        assert len(trials) == 2 and {t["seed"] for t in trials} == {100} and {t["variant"] for t in trials} == {variant}
        # The best value Optuna reports is the best trial's validation accuracy, and its parameters are that trial's.
        best = OmegaConf.load(tunes[variant] / tuned.OPTUNA_RESULTS)
        top = max(trials, key=lambda t: t["val/acc"])
        assert best.best_value == pytest.approx(top["val/acc"])
        assert any(
            math.isclose(t["config/optimizer.lr"], best.best_params["optimizer.lr"]) and t["val/acc"] == top["val/acc"]
            for t in trials
        )

    # A tuning sweep directory is never reused.
    again = _run("-m", "repablate", "+sweep=tune", "+variant=plain", *TINY, f"hydra.sweep.dir={tunes['plain']}")
    assert again.returncode != 0 and "already holds a sweep" in again.stderr

    out = tmp_path / "compared"
    done = _run("-m", "repablate.train.tuned", str(tunes["plain"]), "--seeds", "0,1", "--out", str(out),
                str(tunes["repconv"]), "logger=csv")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / tuned.RECORD_FILE).read_text())
    runs = _results(out)
    assert len(runs) == 4 and all(r["status"] == "completed" for r in runs)
    for variant in ("plain", "repconv"):
        applied = record["variants"][variant]["applied"]
        mine = [r for r in runs if r["variant"] == variant]
        assert sorted(r["seed"] for r in mine) == [0, 1]
        assert {r["config/optimizer.lr"] for r in mine} == {applied["optimizer.lr"]}
        assert {r["config/scheduler.warmup_epochs"] for r in mine} == {applied["scheduler.warmup_epochs"]}

    # The analysis needs no flags: rows by variant and tuned values, plain's row the baseline.
    table = _run("-m", "repablate.analysis", str(out), "--no-figures", "--metrics", "deploy_form/test/acc")
    assert table.returncode == 0, table.stderr
    for variant in ("plain", "repconv"):
        lr = tuned.label(record["variants"][variant]["applied"]["optimizer.lr"])
        assert f"| {variant},{lr}," in table.stdout
    assert "Difference from plain," in table.stdout
    # By variant alone the rows are still one configuration each: the learning rate is constant within a row.
    by_variant = _run("-m", "repablate.analysis", str(out), "--by", "variant", "--baseline", "plain", "--no-figures",
                      "--out", str(tmp_path / "by_variant"))  # fmt: skip
    assert by_variant.returncode == 0, by_variant.stderr

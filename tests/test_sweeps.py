"""Named sweeps and launchers compose; a real tiny multirun, with deliberately failing jobs, gives a table whose
n and values are those of its run files, and the failures with their errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from filelock import FileLock
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf
from scipy import stats as sps

from repablate.analysis import ablation_table, collect_runs, failures
from repablate.train.main import register_resolvers

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TUNING = {"tune"}  # an Optuna search, not a grid: tests/test_tune.py
# The grid sweeps; _base is a part of them.
SWEEPS = sorted(p.stem for p in (CONF / "sweep").glob("*.yaml") if not p.stem.startswith("_") and p.stem not in TUNING)
VARIANTS = {p.stem for p in (CONF / "variant").glob("*.yaml")}
ACC = "deploy_form/test/acc"

# 2 variants x 2 seeds that train (one epoch of 5 batches), and as many that fail: lr_scale=-1 is rejected by the
# harness after Hydra started the job. Failures sit between successes, so a failure must not stop the sweep.
TINY_SWEEP = [
    "-m",
    "+variant=plain,repconv",
    "seed=0,1",
    "lr_scale=1.0,-1",
    "trainer.max_epochs=1",
    "+trainer.limit_train_batches=5",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "logger=csv",
    "callbacks.progress_bar.refresh_rate=0",
    "callbacks.branch_gradients.every_n_steps=1",
    "+callbacks.deploy_check.bench.warmup=2",
    "+callbacks.deploy_check.bench.min_run_time=0.02",
]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}


def _run_tiny_sweep(sweep_dir: Path) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "repablate", *TINY_SWEEP, f"hydra.sweep.dir={sweep_dir}"],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return {"sweep_dir": str(sweep_dir), "returncode": done.returncode, "stderr": done.stderr[-4000:]}


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory, worker_id) -> dict:
    """The tiny multirun, run once per test session (shared by pytest-xdist workers through a file lock)."""
    if worker_id == "master":
        return _run_tiny_sweep(tmp_path_factory.mktemp("tiny_sweep") / "sweep")
    shared = tmp_path_factory.getbasetemp().parent  # one directory per session, common to the workers
    marker = shared / "tiny_sweep.json"
    with FileLock(str(marker) + ".lock"):
        if not marker.is_file():
            marker.write_text(json.dumps(_run_tiny_sweep(shared / "tiny_sweep")))
        return json.loads(marker.read_text())


@pytest.fixture(autouse=True)
def no_hydra_state_leaks():
    yield
    HydraConfig.instance().cfg = None


def compose_with_hydra(*overrides: str):
    register_resolvers()  # ${repablate.unique:} in the sweep directory
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve, as in a real job
    return cfg


def _same(value: str, swept: str) -> bool:
    try:
        return float(value) == float(swept)
    except ValueError:
        return value == swept


# --- the named sweeps and the launchers ---------------------------------------------------------------------------


def test_the_named_ablations_are_all_there():
    assert {"article", "branches", "init", "lr", "clip", "default", "depth"} <= set(SWEEPS)
    assert TUNING <= {p.stem for p in (CONF / "sweep").glob("*.yaml")}


@pytest.mark.parametrize("name", SWEEPS)
def test_named_sweep_composes(name):
    cfg = compose_with_hydra(f"+sweep={name}")
    params = cfg.hydra.sweeper.params
    assert cfg.hydra.mode.name == "MULTIRUN"
    assert str(cfg.hydra.sweep.dir).startswith(f"multirun/{name}/")
    assert set(params["+variant"].split(",")) <= VARIANTS
    assert len(set(params["seed"].split(","))) >= 3
    assert cfg.logger.wandb.group == name  # one wandb group per sweep
    # The table the sweep asks for: its grouping keys are swept and its baseline is one of the swept cells.
    by, baseline = list(cfg.analysis.by), str(cfg.analysis.baseline).split(",")
    assert len(by) == len(baseline)
    for key, value in zip(by, baseline, strict=True):
        swept = params["+variant" if key == "variant" else key].split(",")
        assert any(_same(value, s) for s in swept), (key, value, swept)


@pytest.mark.parametrize("name", SWEEPS)
def test_named_sweep_says_only_what_it_compares(name):
    """The shared block (mode, sweep directory, wandb group, analysis defaults) is sweep/_base.yaml's alone."""
    own = OmegaConf.load(CONF / "sweep" / f"{name}.yaml")
    assert list(own.defaults) == ["_base", "_self_"]
    assert list(own.hydra) == ["sweeper"] and list(own.hydra.sweeper) == ["params"]
    assert "logger" not in own and "run_group" not in own and set(own) <= {"defaults", "hydra", "analysis"}


@pytest.mark.parametrize("name", SWEEPS)
def test_a_sweep_runs_without_wandb_when_asked(name):
    # logger=csv alone: a sweep must leave no half logger node behind (a wandb entry without _target_ failed every
    # job).
    cfg = compose_with_hydra(f"+sweep={name}", "logger=csv")
    assert list(cfg.logger) == ["csv"] and "_target_" in cfg.logger.csv


@pytest.mark.parametrize(
    "launcher, target", [("basic", "BasicLauncher"), ("joblib", "JoblibLauncher"), ("slurm", "SlurmLauncher")]
)
def test_launchers_compose(launcher, target):
    if launcher == "slurm":
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    cfg = compose_with_hydra("+sweep=article", f"+launcher={launcher}")
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.hydra.sweeper.params["+variant"] == "plain,repconv,repconv_n"  # the sweep is unchanged
    if launcher == "slurm":
        assert cfg.hydra.launcher.gpus_per_node == 1 and cfg.hydra.launcher.tasks_per_node == 1
        assert cfg.trainer.accelerator == "gpu"


# --- the real tiny multirun ----------------------------------------------------------------------------------------


def _records(sweep_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(sweep_dir.rglob("results.json"))]


@pytest.mark.slow
def test_failed_jobs_do_not_stop_the_sweep(tiny_sweep):
    sweep_dir = Path(tiny_sweep["sweep_dir"])
    records = _records(sweep_dir)
    # Hydra's basic sweeper reports the failures after the batch, with a non-zero exit; every job has run.
    assert tiny_sweep["returncode"] != 0
    assert len(records) == 8, tiny_sweep["stderr"]
    by_status = {s: [r for r in records if r["status"] == s] for s in ("completed", "failed")}
    assert len(by_status["completed"]) == 4 and len(by_status["failed"]) == 4, tiny_sweep["stderr"]
    assert all("lr_scale=-1" in r["error"] for r in by_status["failed"])


@pytest.mark.slow
def test_table_n_and_values_equal_the_run_files(tiny_sweep):
    sweep_dir = Path(tiny_sweep["sweep_dir"])
    runs = collect_runs(sweep_dir)
    table = ablation_table(runs, metrics=[ACC, "deploy_form/latency_ms"], baseline="plain")
    done = [r for r in _records(sweep_dir) if r["status"] == "completed"]
    assert list(table.index) == ["plain", "repconv"]
    for variant in table.index:
        for metric in (ACC, "deploy_form/latency_ms"):
            values = [r[metric] for r in done if r["variant"] == variant]
            baseline = [r[metric] for r in done if r["variant"] == "plain"]
            assert table.loc[variant, (metric, "n")] == len(values) == 2
            assert table.loc[variant, (metric, "mean")] == pytest.approx(sum(values) / 2, rel=1e-12)
            if variant == "repconv" and len(set(values)) > 1 and len(set(baseline)) > 1:
                expected = sps.ttest_ind(values, baseline, equal_var=False).pvalue
                assert table.loc[variant, (metric, "p_value")] == pytest.approx(expected, rel=1e-9)
    assert len(failures(runs)) == 4


@pytest.mark.slow
def test_analysis_command_on_the_sweep_shows_the_failures(tiny_sweep, tmp_path):
    out = tmp_path / "analysis"
    done = subprocess.run(
        [sys.executable, "-m", "repablate.analysis", tiny_sweep["sweep_dir"], "--baseline", "plain", "--out", str(out)],
        cwd=ROOT,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "4 completed, 4 failed or missing" in done.stdout
    assert "Failed or missing jobs (4)" in done.stdout and "lr_scale=-1 is not allowed" in done.stdout
    for name in ("accuracy_vs_latency", "forms_flops_latency", "branch_gradients"):
        assert (out / "figures" / f"{name}.png").read_bytes().startswith(b"\x89PNG"), done.stderr

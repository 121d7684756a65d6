"""How a run ends when it does not simply complete, met as a user meets it (``python -m repablate`` in a
subprocess): resuming and extending, divergence, SIGINT/SIGTERM of a run and of a sweep, a reused run directory,
a checkpoint that is not one. docs/FAILURE_MODES.md describes what is tested here."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from repablate.train.schedules import warmup_schedule
from tests.test_cli import REPO, repablate

pytestmark = pytest.mark.slow

# A few batches of digits, the deploy check measured briefly: each run takes seconds.
TINY = [
    "logger=csv",
    "callbacks.progress_bar.refresh_rate=0",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "callbacks.deploy_check.measure_batch_size=8",
    "+callbacks.deploy_check.bench.warmup=2",
    "+callbacks.deploy_check.bench.min_run_time=0.02",
]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


def _start(*args: str, cwd: Path) -> subprocess.Popen:
    """``python -m repablate ARGS`` in the background, as ``repablate`` in tests/test_cli.py runs it."""
    env = dict(os.environ, WANDB_MODE="disabled", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, "-m", "repablate", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _wait_for(path: Path, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if process.poll() is not None:
            pytest.fail(
                f"the process ended (rc={process.returncode}) before {path} appeared:\n{process.stdout.read()[-3000:]}"
            )
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"{path} did not appear within {timeout} s")
        time.sleep(0.05)


def _steps(run_dir: Path, column: str) -> dict[int, float]:
    with open(run_dir / "metrics.csv") as handle:
        return {int(row["step"]): float(row[column]) for row in csv.DictReader(handle) if row.get(column)}


# --- resume and extend -------------------------------------------------------------------------------------------


def test_extending_a_finished_run_trains_only_the_added_epochs(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["+variant=plain", "trainer.log_every_n_steps=1", *TINY]
    done = repablate(*common, "trainer.max_epochs=2", f"hydra.run.dir={first}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    last = first / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert (saved["epoch"], saved["global_step"]) == (1, 6)  # the last epoch, whether or not val/acc improved

    resumed = repablate(*common, "trainer.max_epochs=3", f"ckpt_path={last}", f"hydra.run.dir={second}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = _results(second)
    assert record["status"] == "completed" and record["epochs"] == 3 and record["global_step"] == 9
    with open(second / "metrics.csv") as handle:
        trained = {row["epoch"] for row in csv.DictReader(handle) if row.get("train/loss")}
    assert trained == {"2"}  # one more epoch, not a replay of earlier ones
    # The schedule goes on from its saved state: the first rate after resuming is the one the saved scheduler gives.
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule, planned = warmup_schedule(optimizer, total_steps=6, steps_per_epoch=3), []
    for _ in range(7):
        planned.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        schedule.step()
    assert list(_steps(first, "lr-SGD").values()) == pytest.approx(planned[:6], rel=1e-6)
    resumed_lrs = _steps(second, "lr-SGD")
    assert min(resumed_lrs) == 6 and resumed_lrs[6] == pytest.approx(planned[6], rel=1e-6)
    assert last.is_file()  # the resumed run writes only into its own directory


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ({"state_dict": {}, "config": None, "deploy": True}, "is a deploy checkpoint"),
        ({"weights": torch.zeros(2)}, "is not a Lightning training checkpoint"),
    ],
)
def test_a_checkpoint_that_is_not_a_lightning_one_is_refused_before_training(content, message, tmp_path):
    path = tmp_path / "deploy.pt"
    torch.save(content, path)
    result = repablate("+variant=plain", f"ckpt_path={path}", f"hydra.run.dir={tmp_path / 'run'}", *TINY, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and f"ckpt_path='{path}' is not allowed: it {message}" in output
    assert "Traceback" not in output and "pytorch-lightning_version" not in output
    assert _results(tmp_path / "run")["status"] == "failed"
    assert not (tmp_path / "run" / "checkpoints").exists()


# --- divergence --------------------------------------------------------------------------------------------------


def test_a_diverged_run_stops_fails_and_saves_no_deploy_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    whole_epoch = [arg for arg in TINY if not arg.startswith("trainer.limit_train_batches")]  # nan at its last step
    result = repablate(
        "+variant=repconv",
        "trainer.max_epochs=1",
        "optimizer.lr=1000",
        f"hydra.run.dir={run_dir}",
        *whole_epoch,
        cwd=tmp_path,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    record = _results(run_dir)
    assert record["status"] == "diverged", record["error"]
    assert record["error"].startswith("TrainingDiverged: the training loss is nan at optimizer step")
    assert "Traceback" not in output
    # Found at the first non-finite loss, before that step's update (on the CPU every step is checked).
    assert isinstance(record["diverged_at_step"], int) and record["diverged_at_step"] == record["global_step"] >= 1
    assert f"optimizer step {record['diverged_at_step']}:" in record["error"]
    assert not (run_dir / "checkpoints" / "deploy.pt").exists()


# --- signals -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signalled_run_is_recorded_as_interrupted_and_exits_non_zero(signum, tmp_path):
    run_dir = tmp_path / "run"
    process = _start("+variant=plain", "trainer.max_epochs=1000", f"hydra.run.dir={run_dir}", *TINY, cwd=tmp_path)
    _wait_for(run_dir / "checkpoints" / "last.ckpt", process)  # an epoch has ended: there is something to resume
    process.send_signal(signum)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signum, output[-3000:]
    record = _results(run_dir)
    assert record["status"] == "interrupted" and signal.Signals(signum).name in record["error"]
    assert record["epochs"] >= 1 and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not (run_dir / "checkpoints" / "deploy.pt").exists()


def test_a_killed_sweep_exits_non_zero_and_lists_every_job_it_would_have_run(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # A named sweep (its jobs from hydra.sweeper.params) with a command-line override that replaces its seeds.
    process = _start(
        "+sweep=default", "seed=0,1", "trainer.max_epochs=1", f"hydra.sweep.dir={sweep_dir}", *TINY, cwd=tmp_path
    )
    _wait_for(sweep_dir / "0_plain_s0" / "results.json", process)
    process.send_signal(signal.SIGTERM)
    output = process.communicate(timeout=120)[0]
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    jobs = json.loads((sweep_dir / "sweep_jobs.json").read_text())["jobs"]
    assert [job["num"] for job in jobs] == [0, 1, 2, 3]
    cells = [tuple(o for o in job["overrides"] if o.startswith(("+variant=", "seed="))) for job in jobs]
    assert cells == [
        ("+variant=plain", "seed=0"),
        ("+variant=plain", "seed=1"),
        ("+variant=repconv", "seed=0"),
        ("+variant=repconv", "seed=1"),
    ]
    started = sorted(path for path in sweep_dir.iterdir() if (path / ".hydra").is_dir())
    assert [path.name for path in started][:1] == ["0_plain_s0"] and len(started) <= 2  # the rest never ran
    for path in started:  # exactly what Hydra saved for each job it started (the signal may cut job 1's start short)
        saved = path / ".hydra" / "overrides.yaml"
        if saved.is_file() or path.name == "0_plain_s0":
            assert yaml.safe_load(saved.read_text()) == jobs[int(path.name.split("_")[0])]["overrides"]
    assert _results(sweep_dir / "0_plain_s0")["status"] == "completed"
    if (sweep_dir / "1_plain_s1" / "results.json").exists():
        assert _results(sweep_dir / "1_plain_s1")["status"] == "interrupted"


# --- run directories ---------------------------------------------------------------------------------------------


def test_a_run_directory_that_holds_a_run_is_never_reused(tmp_path):
    run_dir = tmp_path / "run"
    done = repablate("+variant=plain", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}", *TINY, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    before = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}

    again = repablate("+variant=repconv", "trainer.max_epochs=1", f"hydra.run.dir={run_dir}", *TINY, cwd=tmp_path)
    output = again.stdout + again.stderr
    assert again.returncode == 1
    assert f"{run_dir} already holds a run" in output and "ckpt_path=" in output and "Traceback" not in output
    after = {path: path.read_bytes() for path in run_dir.rglob("*") if path.is_file()}
    assert after == before  # not a byte written: results, checkpoints, logs and .hydra/ are the first run's


def test_a_sweep_directory_that_holds_a_sweep_is_never_reused(tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "multirun.yaml").write_text("hydra: {}\n")
    result = repablate("-m", "+variant=plain,repconv", f"hydra.sweep.dir={sweep_dir}", *TINY, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 1 and f"{sweep_dir} already holds a sweep" in output and "Traceback" not in output
    assert [path.name for path in sweep_dir.iterdir()] == ["multirun.yaml"]

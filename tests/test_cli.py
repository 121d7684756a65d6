"""``python -m repablate`` run as a user runs it: a subprocess in a fresh directory."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
# Every results.json field docs/RUNS.md documents (plus config/<key> for the whole resolved config).
FIELDS = [
    "status",
    "error",
    "variant",
    "seed",
    "task",
    "run_dir",
    "started_at",
    "finished_at",
    "wall_time_s",
    "git_commit",
    "torch_version",
    "device",
    "epochs",
    "global_step",
    "train/images_per_s",
    "train_form/val/acc",
    "train_form/test/acc",
    "deploy_form/val/acc",
    "deploy_form/test/acc",
    "val/acc_best",
    "test/acc",
    "equivalence/max_abs",
    "equivalence/max_rel",
    "train_form/params",
    "train_form/flops",
    "train_form/mem_bytes",
    "train_form/latency_ms",
    "train_form/latency_iqr_ms",
    "train_form/throughput",
    "deploy_form/params",
    "deploy_form/flops",
    "deploy_form/mem_bytes",
    "deploy_form/latency_ms",
    "deploy_form/latency_iqr_ms",
    "deploy_form/throughput",
    "ratio/params",
    "ratio/flops",
    "ratio/mem_bytes",
    "ratio/latency_ms",
    "onnx/max_rel_error",
    "onnx/latency_ms",
    "onnx/val/acc",
    "onnx/test/acc",
    "int8/val/acc",
    "int8/test/acc",
    "int8/drop",
    "int8/latency_ms",
    "bench/batch_size",
    "bench/threads",
    "bench/device",
    "bench/dtype",
    "grad/warnings",
    "grad/share_mean/dense",
    "grad/share_mean/1x1",
    "grad/share_mean/identity",
    "grad/share_min/dense",
    "grad/share_min/1x1",
    "grad/share_min/identity",
    "config/variant",
    "config/seed",
    "config/optimizer.lr",
    "config/model._target_",
    "config/block._target_",
    "choice/variant",
    "choice/block",
    "choice/init",
    "choice/model",
    "choice/data",
    "choice/optimizer",
    "choice/scheduler",
    "choice/task",
    "choice/trainer",
    "choice/callbacks",
    "choice/logger",
]


def repablate(*args: str, cwd: Path, wandb_mode: str = "disabled") -> subprocess.CompletedProcess:
    env = dict(os.environ, WANDB_MODE=wandb_mode)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run(
        [sys.executable, "-m", "repablate", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_main_job_writes_the_documented_run_directory(tmp_path):
    result = repablate(
        "+variant=repconv",
        "trainer.max_epochs=2",
        "callbacks.deploy_check.measure_batch_size=8",
        cwd=tmp_path,
        wandb_mode="offline",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    assert re.fullmatch(r"\d\d-\d\d-\d\d_repconv_s0_[0-9a-f]{8}", run_dir.name)
    record = json.loads((run_dir / "results.json").read_text())
    assert [field for field in FIELDS if field not in record] == []
    assert record["status"] == "completed" and record["run_dir"] == str(run_dir.resolve())
    assert record["epochs"] == 2 and record["task"] == "classify" and record["device"] == "cpu"
    assert record["choice/variant"] == record["variant"] == "repconv" and record["choice/block"] == "repconv"
    assert record["deploy_form/val/acc"] == record["train_form/val/acc"] > 0.5
    assert record["deploy_form/test/acc"] == record["train_form/test/acc"] == record["test/acc"]
    assert record["ratio/params"] > 1 and record["deploy_form/latency_ms"] > 0
    assert record["onnx/ok"] and record["int8/drop"] == record["deploy_form/test/acc"] - record["int8/test/acc"]
    for name in (
        "metrics.csv",
        "branch_gradients.csv",
        "checkpoints/last.ckpt",
        "checkpoints/deploy.pt",
        "checkpoints/model.onnx",
        "checkpoints/model.int8.onnx",
        ".hydra/config.yaml",
    ):
        assert (run_dir / name).is_file(), name
    assert list((run_dir / "wandb").glob("offline-run-*")), "wandb wrote no offline run"
    with open(run_dir / "metrics.csv") as handle:
        columns = next(csv.reader(handle))
    assert {"train/loss", "val/acc", "val/acc_best", "lr-SGD", "grad/share_mean/dense"} <= set(columns)
    assert torch.load(run_dir / "checkpoints" / "deploy.pt", weights_only=False)["config"]["variant"] == "repconv"


# A line of Hydra's log format (console and main.log), and one of Lightning's own console handler.
HYDRA_LOG_LINE = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+\]\[[\w.]+\]\[[A-Z]+\] - (.*)$")
LIGHTNING_LOG_LINE = re.compile(r"^(?:DEBUG|INFO|WARNING|ERROR|CRITICAL): (.*)$")


@pytest.mark.slow
def test_the_console_shows_each_line_once_and_ends_on_the_run_summary(tmp_path):
    env = {key: value for key, value in os.environ.items() if not key.startswith("WANDB_")}
    env.update(WANDB_MODE="offline", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    args = [
        "+variant=repconv",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=2",
        "trainer.limit_test_batches=2",
        "callbacks.deploy_check.measure_batch_size=8",
        "+callbacks.deploy_check.bench.warmup=2",
        "+callbacks.deploy_check.bench.min_run_time=0.02",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "repablate", *args],
        cwd=tmp_path,
        env=env,
        text=True,
        timeout=300,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )  # one stream, in the order printed
    assert result.returncode == 0, result.stdout[-3000:]
    lines = [line.rstrip() for line in re.split(r"[\r\n]", result.stdout) if line.strip()]
    messages = [
        match.group(1)
        for line in lines
        for match in [HYDRA_LOG_LINE.match(line) or LIGHTNING_LOG_LINE.match(line)]
        if match
    ]
    assert "Seed set to 0" in messages
    assert [m for m in set(messages) if messages.count(m) > 1] == [], "a log line is printed twice"
    assert not [line for line in lines if LIGHTNING_LOG_LINE.match(line)], "Lightning's own console handler is on"
    for noise in ("Tip", "anonymous", "wandb:", "LeafSpec", "No CUDA runtime"):
        assert noise not in result.stdout, noise
    assert any(line.startswith("Epoch 0:") for line in lines), "the progress bar is gone"

    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    summary = lines[max(i for i, line in enumerate(lines) if "] - repconv seed 0: completed in " in line) :]
    assert all(line.startswith("  ") for line in summary[1:]), summary  # nothing printed after the block
    assert summary[-1] == f"  results: {run_dir.resolve() / 'results.json'}"
    assert any(line.split()[:2] == ["test", "accuracy"] for line in summary)
    assert any(line.split()[0] == "params" and line.endswith("x") for line in summary)
    assert any(line.startswith("  equivalence: max relative error") for line in summary)
    assert list((run_dir / "wandb").glob("offline-run-*/*.wandb")), "a quiet wandb still writes its offline run"
    log = (run_dir / "main.log").read_text()
    assert "Seed set to 0" in log and "repconv seed 0: completed" in log and "Tip" not in log


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["model=nope"], "Could not find 'model/nope'"),
        (["+variant=nope"], "Available options in 'variant'"),
        (["optimizer.lr=-0.5"], "optimizer.lr=-0.5 is not allowed: the learning rate must be a positive number"),
        (["trainer.max_epochs=-1"], "trainer.max_epochs=-1 is not allowed: use a positive integer"),
        (["seed=abc"], "seed='abc' is not allowed: use an integer from 0 to 4294967295"),
        (["optimizer.lr=true"], "optimizer.lr=True is not allowed: the learning rate must be a positive number"),
        (
            ["data=imagefolder", "data.root=missing/images", "data_shape.num_classes=3"],
            "data.root='missing/images' is not allowed",
        ),
    ],
)
@pytest.mark.slow
def test_bad_overrides_fail_with_one_clear_message(args, message, tmp_path):
    result = repablate(*args, cwd=tmp_path)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert message in output
    assert "Traceback" not in output
    for path in tmp_path.rglob("results.json"):
        assert json.loads(path.read_text())["status"] == "failed"


@pytest.mark.slow
def test_multirun_jobs_get_their_own_directories(tmp_path):
    result = repablate(
        "-m",
        "+variant=plain,repconv",
        "trainer=debug",
        "logger=csv",
        "+callbacks.deploy_check.bench.latency=false",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep,) = (tmp_path / "multirun").glob("*/*")
    assert re.fullmatch(r"\d\d-\d\d-\d\d_[0-9a-f]{8}", sweep.name)
    jobs = sorted(path.name for path in sweep.iterdir() if path.is_dir())
    assert jobs == ["0_plain_s0", "1_repconv_s0"]
    for job in jobs:
        assert json.loads((sweep / job / "results.json").read_text())["status"] == "completed"


@pytest.mark.slow
def test_non_editable_install_finds_its_config(tmp_path):
    source, target = tmp_path / "source", tmp_path / "site"  # a copy: the build leaves nothing in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("repablate", "conf"):
        shutil.copytree(REPO / name, source / name, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    install = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(source),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    assert (target / "repablate" / "conf" / "config.yaml").is_file()
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target))
    result = subprocess.run(
        [sys.executable, "-m", "repablate", "+variant=plain", "--cfg", "job"],
        cwd=elsewhere,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "variant: plain" in result.stdout and "_target_: repablate.nn.Conv" in result.stdout


@pytest.mark.slow
def test_an_error_in_a_dataloader_worker_shows_its_own_message_and_logs_its_traceback(tmp_path):
    result = repablate(
        "+variant=plain",
        "data._target_=tests.test_train.CorruptDataModule",
        "data.batch_size=8",
        "logger=csv",
        "callbacks.progress_bar.refresh_rate=0",
        cwd=tmp_path,
    )
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "run failed: ValueError: sample 3 is unreadable (images/0003.png, line 2 of labels.txt)" in output
    assert "Traceback" not in output and "Caught ValueError" not in output  # the console: one line
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    assert json.loads((run_dir / "results.json").read_text())["error"].startswith("ValueError: sample 3 is unreadable")
    log = (run_dir / "main.log").read_text()
    assert "in DataLoader worker process 0 raised it; the traceback there:\nTraceback" in log
    assert 'raise ValueError("sample 3 is unreadable' in log

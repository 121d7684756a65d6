"""python -m repablate.inspect: from a config or a checkpoint, run the way a user runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repablate import inspect as inspect_cli
from repablate.nn import reparameterize

ROOT = Path(__file__).resolve().parent.parent
OVERRIDES = ["model=small", "+variant=repconv"]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled"}
    return subprocess.run(
        [sys.executable, "-m", "repablate.inspect", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture(scope="module")
def config():
    return inspect_cli.compose_config(OVERRIDES)


@pytest.fixture(scope="module")
def trained(config):
    model = inspect_cli.build_model(config)
    with torch.no_grad():  # non-trivial BN statistics, as after training
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-1, 1)
                module.running_var.uniform_(0.5, 2)
    return model


def test_config_path_fused_runs_one_convolution_per_block():
    result = run_cli(*OVERRIDES, "--fuse")
    assert result.returncode == 0, result.stderr
    assert "verdict: OK" in result.stdout and "expected form: deployed" in result.stdout
    assert "| stages.1.1 | RepConv | deployed | - | 1 | 1 | 0 | 0 |" in result.stdout
    assert "native_batch_norm" not in result.stdout


def test_deploy_checkpoint_with_unfused_blocks_exits_non_zero(tmp_path, config, trained):
    path = tmp_path / "deploy.pt"
    torch.save({"state_dict": trained.state_dict(), "config": config, "deploy": True}, path)  # fusion skipped
    result = run_cli("--checkpoint", str(path))
    assert result.returncode == 1
    assert "meant to be deployed but 5 block(s) are unfused: stages.0.0" in result.stderr
    assert "left unfused" in result.stdout


def test_fused_deploy_checkpoint_passes(tmp_path, config, trained, capsys):
    path = tmp_path / "deploy.pt"
    torch.save({"state_dict": reparameterize(trained).state_dict(), "config": config, "deploy": True}, path)
    assert inspect_cli.main(["--checkpoint", str(path)]) == 0
    out = capsys.readouterr().out
    assert "deploy checkpoint" in out and "verdict: OK" in out and "input (1, 1, 8, 8)" in out


def test_lightning_checkpoint_lists_the_training_form(tmp_path, config, trained, capsys):
    path = tmp_path / "last.ckpt"
    state = {f"model.{key}": value for key, value in trained.state_dict().items()}
    torch.save({"state_dict": state, "repablate_config": config, "epoch": 3}, path)
    assert inspect_cli.main(["--checkpoint", str(path), "--input-shape", "2,1,16,16"]) == 0
    out = capsys.readouterr().out
    assert "| stages.1.1 | RepConv | training | dense, 1x1, identity | 1 | 2 | 3 | 2 |" in out
    assert "input (2, 1, 16, 16)" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--checkpoint", "missing.pt"], "missing.pt does not exist"),
        (["model=no_such_model"], "cannot compose the model config"),
        (["--checkpoint", "x.pt", "model=small"], "either --checkpoint or config overrides"),
        ([*OVERRIDES, "--input-shape", "1,a"], "--input-shape '1,a' is not allowed"),
    ],
)
def test_bad_input_is_named(argv, message, capsys):
    assert inspect_cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_file_that_is_no_repablate_checkpoint_is_refused(tmp_path, capsys):
    path = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, path)
    assert inspect_cli.main(["--checkpoint", str(path)]) == 2
    assert "is not a repablate checkpoint" in capsys.readouterr().err

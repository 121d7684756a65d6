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


@pytest.mark.slow
def test_config_path_fused_runs_one_convolution_per_block():
    result = run_cli(*OVERRIDES, "--fuse")
    assert result.returncode == 0, result.stderr
    assert "verdict: OK" in result.stdout and "expected form: deployed" in result.stdout
    assert "| stages.1.1 | RepConv | deployed | - | 1 | 1 | 0 | 0 |" in result.stdout
    assert "native_batch_norm" not in result.stdout


@pytest.mark.slow
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


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): the stand-in for any code a crafted checkpoint could run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


@pytest.mark.slow
def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, config, trained):
    marker, path = tmp_path / "marker", tmp_path / "deploy.pt"
    state = reparameterize(trained).state_dict()
    torch.save({"state_dict": state, "config": config, "deploy": True, "x": _WritesMarker(marker)}, path)
    result = run_cli("--checkpoint", str(path))
    assert result.returncode == 2, result.stderr
    assert "refuses to run code from files" in result.stderr and str(path) in result.stderr
    assert not marker.exists()


@pytest.mark.parametrize(
    ("model_config", "message"),
    [
        ({"_target_": "os.system", "_args_": ["true"]}, "target 'os.system' at model is not allowed"),
        ({"_target_": "subprocess.call", "_args_": [["true"]]}, "target 'subprocess.call' at model is not allowed"),
        ({"_target_": "builtins.eval", "_args_": ["1"]}, "target 'builtins.eval' at model is not allowed"),
        ("nested", "target 'builtins.open' at model.block.act is not allowed"),
        ("partial", "target 'builtins.open' at model.block is not allowed"),
    ],
)
@pytest.mark.parametrize("kind", ["deploy", "lightning"])
def test_a_stored_config_that_names_foreign_code_builds_nothing(
    tmp_path, config, trained, model_config, message, kind, capsys
):
    marker = tmp_path / "marker"
    opens_marker = {"_target_": "builtins.open", "_args_": [str(marker), "w"]}  # not on Hydra's own blocklist
    if model_config == "nested":
        model_config = {**config["model"], "block": {**config["model"]["block"], "act": opens_marker}}
    elif model_config == "partial":
        model_config = {**config["model"], "block": {**opens_marker, "_partial_": True}}
    crafted = {**config, "model": model_config}
    path = tmp_path / ("deploy.pt" if kind == "deploy" else "last.ckpt")
    if kind == "deploy":
        torch.save({"state_dict": reparameterize(trained).state_dict(), "config": crafted, "deploy": True}, path)
    else:
        state = {f"model.{key}": value for key, value in trained.state_dict().items()}
        torch.save({"state_dict": state, "repablate_config": crafted}, path)
    assert inspect_cli.main(["--checkpoint", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "allowed targets: repablate.models." in err
    assert not marker.exists()


def test_a_folder_and_a_text_file_get_clear_messages(tmp_path, capsys):
    assert inspect_cli.main(["--checkpoint", str(tmp_path)]) == 2
    assert "is a directory; give a checkpoint file such as RUN_DIR/checkpoints/deploy.pt" in capsys.readouterr().err
    text = tmp_path / "notes.txt"
    text.write_text("hello world\nthis is text\n" * 5)
    assert inspect_cli.main(["--checkpoint", str(text)]) == 2
    err = capsys.readouterr().err
    assert f"{text} is not a torch checkpoint" in err and "Memo value" not in err

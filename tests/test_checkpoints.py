"""Reading checkpoints runs no code from the file: weights-only unpickling, model configs built only from
repablate's own targets. Crafted files try to write a marker file; it must never appear."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from repablate.models import RepVGGClassifier
from repablate.nn import RepConv, reparameterize
from repablate.train.callbacks import DeployCheck
from repablate.train.checkpoints import CheckpointError, build_model, check_model_config, read_checkpoint

SMALL = {
    "_target_": "repablate.models.small",
    "num_classes": 10,
    "in_channels": 1,
    "block": {"_target_": "repablate.nn.RepConv", "_partial_": True, "k": 3},
}
CONF = Path(__file__).resolve().parent.parent / "conf"


class _WritesMarker:
    """Unpickling this calls open(marker, "w"): the stand-in for any code a crafted pickle could run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def _marker_config(marker: Path) -> dict:
    # builtins.open is not on Hydra's own blocklist: instantiating this creates the marker file.
    return {"_target_": "builtins.open", "_args_": [str(marker), "w"]}


# --- read_checkpoint -------------------------------------------------------------------------------------------


def test_a_missing_path_is_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing\.pt does not exist"):
        read_checkpoint(tmp_path / "nothing.pt")


def test_a_directory_is_refused_with_a_hint(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory; give a checkpoint file such as RUN_DIR/checkpoints"):
        read_checkpoint(tmp_path)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("notes.txt", b"hello world\nthis is text, not a checkpoint\n" * 5),  # torch said "Memo value not found"
        ("empty.pt", b""),
        ("garbage.pt", bytes(range(256))),
    ],
)
def test_a_file_that_is_no_torch_checkpoint_is_named(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=f"{name} is not a torch checkpoint"):
        read_checkpoint(path)


def test_a_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "deploy.pt"
    torch.save({"state_dict": {"w": torch.ones(100)}}, path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="deploy.pt is not a torch checkpoint"):
        read_checkpoint(path)


@pytest.mark.parametrize("legacy_format", [False, True])
def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path, legacy_format):
    marker, path = tmp_path / "marker", tmp_path / "deploy.pt"
    payload = {"state_dict": {}, "config": {}, "deploy": True, "extra": _WritesMarker(marker)}
    if legacy_format:  # a bare pickle in the protocol torch's legacy format uses
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointError, match="refuses to run code from files") as error:
        read_checkpoint(path)
    assert "deploy.pt" in str(error.value) and re.search(r"\b(io|builtins)\.open\b", str(error.value))
    assert not marker.exists()


def test_a_pickle_in_a_protocol_torch_never_writes_is_refused_and_runs_nothing(tmp_path):
    # Protocol 4 frames are unknown to the weights-only unpickler: refused before the code is reached.
    marker, path = tmp_path / "marker", tmp_path / "deploy.pt"
    path.write_bytes(pickle.dumps({"x": _WritesMarker(marker)}, protocol=4))
    with pytest.raises(CheckpointError, match="deploy.pt is not a torch checkpoint"):
        read_checkpoint(path)
    assert not marker.exists()


def test_a_file_holding_no_dict_is_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(torch.zeros(3), path)
    with pytest.raises(CheckpointError, match="holds a Tensor, not a checkpoint dict"):
        read_checkpoint(path)


def test_a_plain_checkpoint_reads_back_on_the_cpu(tmp_path):
    path = tmp_path / "deploy.pt"
    torch.save({"state_dict": {"w": torch.arange(3.0)}, "config": {"model": SMALL}, "deploy": True}, path)
    checkpoint = read_checkpoint(path)
    assert torch.equal(checkpoint["state_dict"]["w"], torch.arange(3.0)) and checkpoint["config"]["model"] == SMALL


# --- build_model ---------------------------------------------------------------------------------------------------


def test_a_stored_small_config_builds_in_both_forms():
    assert isinstance(build_model(SMALL), RepVGGClassifier)
    deployed = build_model(SMALL, deploy=True)
    assert all(module.deploy for module in deployed.modules() if isinstance(module, RepConv))


@pytest.mark.parametrize(
    ("model_config", "where"),
    [
        ({"_target_": "os.system", "_args_": ["true"]}, "model"),
        ({"_target_": "subprocess.call", "_args_": [["true"]]}, "model"),
        ({"_target_": "builtins.eval", "_args_": ["1"]}, "model"),
        ({**SMALL, "block": {"_target_": "os.system", "_partial_": True}}, "model.block"),
        ({**SMALL, "block": {**SMALL["block"], "act": {"_target_": "builtins.exec"}}}, "model.block.act"),
        ({**SMALL, "widths": [16, {"_target_": "os.getcwd"}, 32]}, "model.widths[1]"),
        ({"_target_": "repablate.models.small.__globals__"}, "model"),  # an attribute path of an allowed target
        ({"_target_": "repablate.train.checkpoints.build_model"}, "model"),  # repablate's own, but no model
        ({"_target_": "repablate.nn.reparameterize"}, "model"),  # exported by repablate.nn, but no block
        ({"_target_": "torch.nn.Linear", "in_features": 1, "out_features": 1}, "model"),  # torch.nn, no activation
    ],
)
def test_a_target_outside_the_allow_list_is_refused(model_config, where):
    with pytest.raises(CheckpointError, match="is not allowed") as error:
        build_model(model_config)
    message = str(error.value)
    assert f"at {where} is not allowed" in message
    assert all(
        part in message for part in ("allowed targets: repablate.models.{", " small", "repablate.nn.{", "torch.nn.{")
    )


def test_targets_are_checked_before_anything_is_built(monkeypatch):
    # Allowed targets first, the forbidden one last and deepest: a check made while building would build first.
    from repablate.train import checkpoints

    built = []
    monkeypatch.setattr(checkpoints, "instantiate", lambda *args, **kwargs: built.append(args))
    config = {
        **SMALL,
        "block": {**SMALL["block"], "act": {"_target_": "torch.nn.ReLU"}},
        "zz": [{"_target_": "torch.nn.SiLU"}, {"_target_": "os.system"}],
    }
    with pytest.raises(CheckpointError, match=r"'os.system' at model.zz\[1\] is not allowed"):
        build_model(config)
    assert built == []


@pytest.mark.parametrize(
    ("model_config", "message"),
    [
        ({**SMALL, "_args_": [10]}, "key '_args_' at model is not allowed"),
        ({**SMALL, "block": {**SMALL["block"], "_recursive_": False}}, "key '_recursive_' at model.block"),
        ({**SMALL, "_convert_": "all"}, "key '_convert_' at model is not allowed"),
        ({**SMALL, "block": "${oc.decode:'{_target_: os.system}'}"}, "interpolation"),
        ({**SMALL, "num_classes": "${oc.env:HOME}"}, "interpolation"),
        ({**SMALL, "num_classes": torch.tensor(10)}, "holds a Tensor at model.num_classes"),
        ({**SMALL, "block": {**SMALL["block"], "_partial_": "yes"}}, "_partial_ at model.block must be true or false"),
        ({**SMALL, "_target_": ["repablate.models.small"]}, "_target_ at model must be a string"),
        ({"num_classes": 10}, "names no _target_"),
    ],
)
def test_hydra_keys_that_could_smuggle_code_are_refused(model_config, message):
    with pytest.raises(CheckpointError, match=re.escape(message)):
        build_model(model_config)


def test_keyword_arguments_are_checked_too(tmp_path):
    marker = tmp_path / "marker"
    with pytest.raises(CheckpointError, match="builtins.open"):
        build_model(SMALL, block=_marker_config(marker))
    assert not marker.exists()


@pytest.mark.parametrize("model", sorted(p.stem for p in (CONF / "model").glob("*.yaml")))
@pytest.mark.parametrize("block", sorted(p.stem for p in (CONF / "block").glob("*.yaml")))
def test_every_shipped_model_and_block_passes_the_allow_list(model, block):
    # Checked, not built: the large presets take seconds to build. Spellings differ between configs
    # (repablate.models.small, repablate.models.yolov7_tiny.YOLOv7Tiny), so both must be accepted.
    from repablate.inspect import compose_config

    data = ["task=detect", "data=shapes_detect"] if model == "yolov7_tiny" else []
    check_model_config(compose_config([f"model={model}", f"block={block}", *data])["model"])


def test_defining_module_spellings_and_torch_activations_build():
    config = {
        "_target_": "repablate.models.classifier.RepVGGClassifier",
        "num_classes": 3,
        "in_channels": 1,
        "widths": [4],
        "depths": [1],
        "strides": [1],
        "block": {
            "_target_": "repablate.nn.blocks.RepConv",
            "_partial_": True,
            "k": 3,
            "act": {"_target_": "torch.nn.LeakyReLU", "negative_slope": 0.1},
        },
    }
    model = build_model(config)
    assert isinstance(model, RepVGGClassifier)
    assert any(isinstance(module, nn.LeakyReLU) for module in model.modules())


# --- DeployCheck reloads deploy.pt as data (weights only) --------------------------------------------------------


def test_deploy_check_verifies_a_real_deploy_checkpoint(tmp_path):
    check = DeployCheck(tmp_path / "deploy.pt")
    check.run_config = {"model": SMALL}
    check._save_deploy_checkpoint(reparameterize(build_model(SMALL)), torch.randn(2, 1, 8, 8))
    assert read_checkpoint(tmp_path / "deploy.pt")["deploy"] is True


# --- what a real run writes ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_checkpoints_of_a_real_run_read_weights_only_and_inspect_cleanly(compose_config, tmp_path, capsys):
    from repablate import inspect as inspect_cli
    from repablate.train.main import run

    run_dir = tmp_path / "run"
    # EMA weight averaging adds its own entries (averaging_state, current_model_state) to Lightning's checkpoints.
    cfg = compose_config(
        "+variant=repconv",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "logger=csv",
        "+callbacks.deploy_check.bench.latency=false",
        "callbacks.deploy_check.export=false",  # the ONNX files are tested with the export; these are torch files
        "callbacks.progress_bar.refresh_rate=0",
        "+callbacks.ema._target_=lightning.pytorch.callbacks.EMAWeightAveraging",
        "+callbacks.ema.decay=0.9",
        run_dir=run_dir,
    )
    assert run(cfg, run_dir)["status"] == "completed"
    files = sorted((run_dir / "checkpoints").iterdir())
    assert {path.name for path in files} == {"best-0.ckpt", "deploy.pt", "last.ckpt"}
    for path in files:
        checkpoint = read_checkpoint(path)
        assert checkpoint.get("repablate_config", checkpoint.get("config"))["model"]["_target_"]
        assert inspect_cli.main(["--checkpoint", str(path)]) == 0, capsys.readouterr().err
        assert "verdict: OK" in capsys.readouterr().out

"""The training harness in-process: fast_dev_run of every variant, resume, learning-rate schedule, failures."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback

from repablate.nn import load_state_dict
from repablate.train.main import ConfigError, run

VARIANTS = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "conf" / "variant").glob("*.yaml"))
QUICK = ["logger=csv", "+callbacks.deploy_check.bench.latency=false", "callbacks.progress_bar.refresh_rate=0"]


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.parametrize("variant", VARIANTS)
def test_fast_dev_run_of_every_variant(variant, compose_config, tmp_path):
    cfg = compose_config(f"+variant={variant}", "trainer=debug", *QUICK)
    record = run(cfg, tmp_path / "run")
    assert record == _results(tmp_path / "run")
    assert record["status"] == "completed" and record["error"] is None and record["variant"] == variant
    assert record["deploy_form/val/acc"] == record["train_form/val/acc"]
    assert record["deploy_form/test/acc"] == record["train_form/test/acc"]
    assert 0 <= record["equivalence/max_rel"] <= 1e-4
    assert record["deploy_form/params"] <= record["train_form/params"]
    assert record["config/variant"] == variant and record["config/optimizer.lr"] == cfg.optimizer.lr


def test_short_run_writes_checkpoints_that_rebuild_the_model(compose_config, tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_config(
        "+variant=repconv",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=3",
        "callbacks.branch_gradients.every_n_steps=1",
        *QUICK,
        run_dir=run_dir,
    )
    record = run(cfg, run_dir)
    assert record["epochs"] == 2 and record["global_step"] == 6
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert last["repablate_config"]["variant"] == "repconv"
    assert all(key.startswith(("model.", "val_acc_best.")) for key in last["state_dict"])
    model = instantiate(last["repablate_config"]["model"])
    weights = {k.removeprefix("model."): v for k, v in last["state_dict"].items() if k.startswith("model.")}
    load_state_dict(model, weights)
    deploy = torch.load(run_dir / "checkpoints" / "deploy.pt", weights_only=False)
    assert deploy["deploy"] is True
    fused = instantiate(deploy["config"]["model"], deploy=True)
    load_state_dict(fused, deploy["state_dict"])
    with open(run_dir / "branch_gradients.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["step", "layer", "branch", "grad_norm", "share"]
    assert {row["step"] for row in rows} == {str(step) for step in range(6)}
    assert {row["branch"] for row in rows} == {"dense", "1x1", "identity"}
    assert record["grad/share_min/identity"] <= record["grad/share_mean/identity"] <= 1


def test_resume_from_last_checkpoint_continues_the_epoch_count(compose_config, tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    common = ["+variant=plain", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1", *QUICK]
    run(compose_config(*common, "trainer.max_epochs=1", run_dir=first), first)
    ckpt = first / "checkpoints" / "last.ckpt"
    record = run(compose_config(*common, "trainer.max_epochs=3", f"ckpt_path={ckpt}", run_dir=second), second)
    assert record["epochs"] == 3 and record["global_step"] == 6
    with open(second / "metrics.csv") as handle:
        epochs = {row["epoch"] for row in csv.DictReader(handle) if row["val/acc"]}
    assert epochs == {"1", "2"}  # the second run trained only the epochs the first had not


class StopAfterEpochs(Callback):
    """Ends the fit after ``epochs`` epochs, as a run killed between epochs ends (its last.ckpt then is that epoch)."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = trainer.current_epoch + 1 >= self.epochs


def test_a_resumed_run_continues_exactly_where_it_stopped(compose_config, tmp_path):
    # repconv_lr: a warm-up then cosine (SequentialLR), whose saved state must load with weights_only=True too.
    common = [
        "+variant=repconv_lr",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
        "trainer.log_every_n_steps=1",
        *QUICK,
    ]
    whole, stopped, resumed = tmp_path / "whole", tmp_path / "stopped", tmp_path / "resumed"
    run(compose_config(*common, run_dir=whole), whole)
    stop = [f"+callbacks.stop._target_={__name__}.StopAfterEpochs", "+callbacks.stop.epochs=2"]
    assert run(compose_config(*common, *stop, run_dir=stopped), stopped)["global_step"] == 6
    ckpt = stopped / "checkpoints" / "last.ckpt"
    record = run(compose_config(*common, f"ckpt_path={ckpt}", run_dir=resumed), resumed)
    assert record["status"] == "completed" and record["epochs"] == 3 and record["global_step"] == 9

    def lrs(run_dir):
        with open(run_dir / "metrics.csv") as handle:
            return {int(row["step"]): float(row["lr-SGD"]) for row in csv.DictReader(handle) if row.get("lr-SGD")}

    assert lrs(resumed) == {step: lr for step, lr in lrs(whole).items() if step >= 6}  # the same schedule, on
    weights = [torch.load(d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"] for d in (whole, resumed)]
    for name, value in weights[0].items():  # the same data order and updates: the same model
        torch.testing.assert_close(weights[1][name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_lr_variant_warms_up_from_the_scaled_rate(compose_config, tmp_path):
    cfg = compose_config(
        "+variant=repconv_lr",
        "trainer.max_epochs=2",
        "trainer.limit_train_batches=4",
        "trainer.log_every_n_steps=1",
        "scheduler.warmup_start_factor=0.5",
        *QUICK,
    )
    run(cfg, tmp_path / "run")
    with open(tmp_path / "run" / "metrics.csv") as handle:
        lrs = {int(row["step"]): float(row["lr-SGD"]) for row in csv.DictReader(handle) if row.get("lr-SGD")}
    peak = cfg.optimizer.lr * 0.75
    assert lrs[0] == pytest.approx(peak * 0.5, rel=1e-6)  # warm-up starts at start_factor x the scaled lr
    assert lrs[4] == pytest.approx(peak, rel=1e-6)  # one epoch (4 steps) later it reaches it
    assert max(lrs.values()) == pytest.approx(peak, rel=1e-6)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.lr=-0.1", "optimizer.lr=-0.1 is not allowed"),
        ("lr_scale=0", "lr_scale=0 is not allowed"),
        ("ckpt_path=/nonexistent/last.ckpt", "no such checkpoint file"),
    ],
)
def test_bad_values_fail_before_training_and_record_the_failure(override, message, compose_config, tmp_path):
    cfg = compose_config("+variant=repconv", override, *QUICK)
    with pytest.raises(ConfigError, match=message):
        run(cfg, tmp_path / "run")
    record = _results(tmp_path / "run")
    assert record["status"] == "failed" and message in record["error"]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_missing_dataset_path_fails_and_records_the_failure(compose_config, tmp_path):
    missing = tmp_path / "no-such-dataset"
    cfg = compose_config("data=imagefolder", f"data.root={missing}", "data_shape.num_classes=2", *QUICK)
    with pytest.raises(ConfigError, match=re.escape(f"data.root='{missing}' is not allowed")):
        run(cfg, tmp_path / "run")
    record = _results(tmp_path / "run")
    assert record["status"] == "failed" and str(missing) in record["error"]

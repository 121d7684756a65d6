"""The training harness in-process: fast_dev_run of every variant, resume, learning-rate schedule, failures, paired
runs (data order and initialization across variants), errors in DataLoader workers."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from repablate.nn import load_state_dict
from repablate.train.main import assemble, run
from repablate.train.validation import ConfigError

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
    blocks = {
        "plain": "plain",
        "repconv_n": "repconv_n",
        "repconv_no1x1": "repconv_no1x1",
        "qarepconv": "qarepconv",
        "quantrepconv": "quantrepconv",
    }
    assert record["choice/variant"] == variant and record["choice/block"] == blocks.get(variant, "repconv")
    assert record["choice/trainer"] == "debug" and record["choice/task"] == record["task"] == "classify"


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


# --- paired runs: one seed, one data order and one initialization of the shared layers, in every variant -----------


class RecordBatches(Callback):
    """Records every training batch as the model receives it: (epoch, digest of the images, labels)."""

    def __init__(self):
        self.batches: list[tuple[int, str, list[int]]] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        images, labels = batch
        digest = hashlib.sha256(images.detach().cpu().numpy().tobytes()).hexdigest()
        self.batches.append((trainer.current_epoch, digest, labels.tolist()))


def _image_folder(root: Path, per_class: int = 8) -> Path:
    """Two classes of random 8x8 RGB images: 12 train, 2 val, 2 test with ImageFolderDataModule's fractions."""
    from PIL import Image

    colours = torch.Generator().manual_seed(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(per_class):
            pixels = torch.randint(0, 256, (8, 8, 3), dtype=torch.uint8, generator=colours).numpy()
            Image.fromarray(pixels).save(root / label / f"{i}.png")
    return root


def _training_batches(compose_config, tmp_path: Path, variant: str, seed: int) -> list:
    """The batches the Trainer feeds ``variant`` with ``seed`` over 2 epochs of augmented (random crop and flip)
    images, and torch's global RNG state once the run was assembled."""
    root = tmp_path / "images"
    if not root.exists():
        _image_folder(root)
    run_dir = tmp_path / f"{variant}-{seed}"
    cfg = compose_config(
        f"+variant={variant}",
        f"seed={seed}",
        "data=imagefolder",
        f"data.root={root}",
        "data.batch_size=4",
        "data_shape.num_classes=2",
        "data_shape.image_size=8",
        "trainer.max_epochs=2",
        "trainer.limit_val_batches=0",
        "~callbacks.checkpoint",
        "~callbacks.deploy_check",
        f"+callbacks.record._target_={__name__}.RecordBatches",
        "logger=csv",
        "callbacks.progress_bar.refresh_rate=0",
        run_dir=run_dir,
    )
    parts = assemble(cfg)
    rng_after_assembly = torch.get_rng_state()
    parts.trainer.fit(parts.module, datamodule=parts.datamodule)
    (recorder,) = (callback for callback in parts.callbacks if isinstance(callback, RecordBatches))
    return recorder.batches, rng_after_assembly


def test_runs_of_one_seed_see_the_same_batches_in_every_variant(compose_config, tmp_path):
    plain, plain_rng = _training_batches(compose_config, tmp_path, "plain", 0)
    repconv, repconv_rng = _training_batches(compose_config, tmp_path, "repconv", 0)
    assert [epoch for epoch, _, _ in plain] == [0, 0, 0, 1, 1, 1]
    assert repconv == plain  # order and augmentation, batch by batch, over both epochs
    assert torch.equal(repconv_rng, plain_rng)  # building more parameters draws nothing from the global generator
    other_seed, _ = _training_batches(compose_config, tmp_path, "plain", 1)
    assert [epoch for epoch, _, _ in other_seed] == [0, 0, 0, 1, 1, 1]
    assert all(digest != other[1] for (_, digest, _), other in zip(plain, other_seed, strict=True))
    assert [labels for _, _, labels in plain] != [labels for _, _, labels in other_seed]  # another order


def _model(compose_config, *overrides: str):
    return assemble(compose_config(*overrides)).module.model


@pytest.mark.parametrize("variant", ["repconv", "repconv_n", "repconv_no1x1", "repconv_seed_init"])
def test_variants_of_one_seed_start_from_the_same_head_and_3x3_kernels(variant, compose_config):
    from repablate.nn import Conv, RepConv

    plain, other = _model(compose_config, "+variant=plain"), _model(compose_config, f"+variant={variant}")
    assert torch.equal(plain.head.weight, other.head.weight) and torch.equal(plain.head.bias, other.head.bias)
    pairs = [
        (dict(plain.named_modules())[name], block)
        for name, block in other.named_modules()
        if isinstance(block, RepConv)
    ]
    assert pairs and all(isinstance(conv, Conv) for conv, _ in pairs)
    for conv, block in pairs:  # the article's init redraws the dense kernels on purpose (Kaiming-normal)
        assert torch.equal(conv.conv.weight, block.rbr_dense[0].weight) == (variant != "repconv_seed_init")
    reseeded = _model(compose_config, "+variant=plain", "seed=1")
    assert not torch.equal(plain.head.weight, reseeded.head.weight)
    assert not torch.equal(pairs[0][0].conv.weight, dict(reseeded.named_modules())["stages.0.0"].conv.weight)


def test_a_model_that_sets_a_layer_itself_keeps_it_and_shares_the_rest(compose_config):
    from repablate.train.main import build_model

    heads = []
    for variant in ("plain", "repconv"):
        cfg = compose_config(f"+variant={variant}", "task=detect", "model=yolov7_tiny", "data=shapes_detect")
        heads.append(build_model(cfg.model, cfg.init, cfg.seed).detect)
    for plain, repconv in zip(heads[0].m, heads[1].m, strict=True):
        assert torch.equal(plain.weight, repconv.weight)  # built after the blocks, drawn alike all the same
        objectness = plain.bias.view(heads[0].na, -1)[:, 4]
        assert (objectness < -3).all()  # YOLOv7's objectness prior, which IDetect adds to the drawn bias, is kept


# --- errors raised in DataLoader workers ----------------------------------------------------------------------------


class CorruptSamples(Dataset):
    """32 blank digits-shaped samples; sample 3 cannot be read."""

    def __len__(self) -> int:
        return 32

    def __getitem__(self, index: int):
        if index == 3:
            raise ValueError("sample 3 is unreadable (images/0003.png, line 2 of labels.txt)")
        return torch.zeros(1, 8, 8), index % 10


class CorruptDataModule(L.LightningDataModule):
    """Loads ``CorruptSamples`` in one worker process."""

    num_classes, in_channels, image_size = 10, 1, 8

    def __init__(self, batch_size: int = 8, seed: int = 0):
        super().__init__()
        self.batch_size = batch_size

    def _loader(self) -> DataLoader:
        return DataLoader(CorruptSamples(), batch_size=self.batch_size, num_workers=1)

    train_dataloader = val_dataloader = test_dataloader = _loader


def test_an_error_in_a_dataloader_worker_is_recorded_as_its_own_message(compose_config, tmp_path, caplog):
    cfg = compose_config("+variant=plain", f"data._target_={__name__}.CorruptDataModule", "data.batch_size=8", *QUICK)
    with pytest.raises(ValueError, match="in DataLoader worker process 0"):
        run(cfg, tmp_path / "run")
    record = _results(tmp_path / "run")
    assert record["status"] == "failed"
    assert record["error"] == "ValueError: sample 3 is unreadable (images/0003.png, line 2 of labels.txt)"
    (line,) = [r.getMessage() for r in caplog.records if r.name == "repablate.train.main"]
    assert line == f"run failed: {record['error']}"
    (trace,) = [r.getMessage() for r in caplog.records if r.name == "repablate.train.main.traceback"]
    assert trace.startswith("in DataLoader worker process 0 raised it; the traceback there:\nTraceback")
    assert "__getitem__" in trace and trace.endswith(record["error"])


class NeedsTwoArguments(Exception):
    def __init__(self, what: str, where: str):
        super().__init__(f"{what} at {where}")


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ValueError("bad sample\nsecond line: x"), "ValueError: bad sample\nsecond line: x"),
        (KeyError("label"), "KeyError: 'label'"),
        (NeedsTwoArguments("truncated file", "shard 7"), "NeedsTwoArguments: truncated file at shard 7"),
    ],
)
def test_a_worker_error_is_read_back_from_torchs_reraise(error, expected):
    import sys

    from torch._utils import ExceptionWrapper

    from repablate.train.failures import dataloader_worker_error

    try:
        raise error
    except Exception:
        wrapper = ExceptionWrapper(sys.exc_info(), where="in DataLoader worker process 2")
    with pytest.raises(Exception) as reraised:  # torch: the same type, or a RuntimeError when it cannot build one
        wrapper.reraise()
    found = dataloader_worker_error(reraised.value)
    assert f"{found.type_name}: {found.message}" == expected and found.where == "in DataLoader worker process 2"
    assert found.traceback.startswith("Traceback (most recent call last):")
    assert dataloader_worker_error(error) is None

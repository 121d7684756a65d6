"""The switches for GPU training, exercised on the CPU where torch allows: mixed precision (the deploy check stays
exact in float32 and records accuracy at the run's precision), channels_last, compile (of the training form only)
and device-resident in-memory data. On a CUDA machine the marked tests run the same on the GPU."""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from repablate.data import DigitsDataModule
from repablate.data.tensors import TensorBatches
from repablate.data.vision import Standardize
from repablate.train.main import assemble, run
from repablate.train.validation import ConfigError

QUICK = ("+variant=repconv", "trainer.max_epochs=1", "logger=csv", "callbacks.deploy_check.export=false")


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_a_low_precision_run_proves_equivalence_in_float32_and_records_accuracy_at_its_precision(
    precision, compose_config, tmp_path
):
    record = run(compose_config(*QUICK, f"trainer.precision={precision}"), tmp_path / "run")
    assert record["status"] == "completed" and record["at_precision/name"] == precision
    # bfloat16 keeps 8 bits of mantissa (relative error ~4e-3 per op): a float32 comparison is ~1e-6.
    assert record["equivalence/max_rel"] < 1e-5
    for form in ("train_form", "deploy_form"):
        for split in ("val", "test"):
            value = record[f"at_precision/{form}/{split}/acc"]
            assert 0 <= value <= 1 and abs(value - record[f"{form}/{split}/acc"]) < 0.1
    # At bf16 both forms still agree closely: the fused conv is the same function, rounded differently.
    assert abs(record["at_precision/train_form/test/acc"] - record["at_precision/deploy_form/test/acc"]) < 0.02


def test_a_float32_run_records_its_float32_figures_at_precision(compose_config, tmp_path):
    record = run(compose_config(*QUICK, "trainer.limit_train_batches=2"), tmp_path / "run")
    assert record["at_precision/name"] == "32-true"
    assert record["at_precision/deploy_form/test/acc"] == record["deploy_form/test/acc"]


def test_channels_last_puts_weights_and_batches_in_that_format_and_computes_the_same(compose_config):
    eager = assemble(compose_config(*QUICK)).module
    last = assemble(compose_config(*QUICK, "channels_last=true")).module
    convs = [m for m in last.model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    x = torch.randn(4, 1, 8, 8)
    eager.model.eval(), last.model.eval()
    torch.testing.assert_close(last.run_model(x), eager.run_model(x), rtol=1e-5, atol=1e-5)


def test_compile_compiles_the_training_steps_only_and_keeps_the_state_dict(compose_config):
    import torch._dynamo

    eager = assemble(compose_config(*QUICK)).module
    compiled = assemble(compose_config(*QUICK, "compile=true", "compile_options.backend=eager")).module
    assert list(compiled.state_dict()) == list(eager.state_dict())  # no "_orig_mod" copies of the weights
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(compiled.run_model(x), eager.run_model(x))
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # dynamo traced the model
    assert compiled.model is not compiled.__dict__["_compiled_model"]  # the deploy check sees the eager module


@pytest.mark.slow
def test_a_compiled_run_trains_what_the_eager_run_trains(compose_config, tmp_path):
    common = (*QUICK, "trainer.limit_train_batches=3", "compile_options.backend=aot_eager")
    eager = run(compose_config(*common, "compile=false", run_dir=tmp_path / "eager"), tmp_path / "eager")
    compiled = run(compose_config(*common, "compile=true", run_dir=tmp_path / "compiled"), tmp_path / "compiled")
    assert compiled["status"] == "completed" and compiled["config/compile"] is True
    assert compiled["train/loss_epoch"] == pytest.approx(eager["train/loss_epoch"], rel=1e-4)
    assert compiled["deploy_form/test/acc"] == pytest.approx(eager["deploy_form/test/acc"], abs=0.005)


@pytest.mark.parametrize("override", ["channels_last=1", "compile=yes"])
def test_the_switches_take_booleans_only(override, compose_config):
    with pytest.raises(ValueError, match=re.escape(f"{override.split('=')[0]}=")):
        assemble(compose_config(*QUICK, override))


def test_device_resident_data_moves_every_split_once_at_setup():
    data = DigitsDataModule(batch_size=32)
    data.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("meta")), global_rank=0)
    data.setup("fit")
    assert {split.images.device.type for split in data.splits.values()} == {"meta"}
    kept = DigitsDataModule(batch_size=32, device_resident=False)
    kept.trainer = data.trainer
    kept.setup("fit")
    assert {split.images.device.type for split in kept.splits.values()} == {"cpu"}
    with pytest.raises(ValueError, match="device_resident='yes' is not allowed"):
        DigitsDataModule(device_resident="yes")


def test_augmentation_draws_the_same_crops_whatever_the_device_of_the_images():
    images = torch.randint(0, 255, (6, 3, 8, 8), dtype=torch.uint8)
    transform = Standardize(torch.full((3,), 0.5), torch.full((3,), 0.25), augment=True, pad=2)
    on_cpu = TensorBatches(images, torch.zeros(6), transform, seed=3)[torch.arange(6)][0]
    # On the meta device nothing is computed, but every tensor the transform mixes must be on the images' device:
    # a crop index or a statistic left on the CPU raises here, without a GPU.
    on_meta = TensorBatches(images, torch.zeros(6), transform, seed=3).to("meta")[torch.arange(6)][0]
    assert on_meta.device.type == "meta" and on_meta.shape == on_cpu.shape
    if torch.cuda.is_available():  # and on a GPU the same crops, drawn from the same CPU generator
        moved = TensorBatches(images, torch.zeros(6), transform, seed=3).to("cuda")[torch.arange(6)][0]
        torch.testing.assert_close(moved.cpu(), on_cpu)


def test_sync_batchnorm_on_the_cpu_is_refused_with_what_to_set(compose_config):
    with pytest.raises(ConfigError, match=r"trainer.sync_batchnorm=true is not allowed on the CPU.*=false"):
        assemble(compose_config(*QUICK, "trainer=ddp", "trainer.accelerator=cpu"))


def test_ddp_with_detection_data_is_refused(compose_config):
    with pytest.raises(ConfigError, match="ShapesDetectDataModule: DDP here splits each global batch"):
        assemble(
            compose_config(
                "task=detect", "model=yolov7_tiny", "data=shapes_detect", "trainer=ddp", "trainer.sync_batchnorm=false"
            )
        )


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_a_gpu_run_in_every_mode_holds_its_data_on_the_gpu_and_stays_exact(compose_config, tmp_path):
    modes = {
        "bf16": ["trainer.precision=bf16-mixed"],
        "fp16": ["trainer.precision=16-mixed"],
        "channels_last": ["channels_last=true"],
        "compile": ["compile=true"],
    }
    for name, overrides in modes.items():
        cfg = compose_config(*QUICK, "trainer.accelerator=gpu", *overrides, run_dir=tmp_path / name)
        record = run(cfg, tmp_path / name)
        assert record["status"] == "completed" and record["device"].startswith("cuda"), name
        assert record["equivalence/max_rel"] < 1e-4, name
    parts = assemble(compose_config(*QUICK, "trainer.accelerator=gpu", run_dir=tmp_path / "setup"))
    parts.datamodule.trainer = parts.trainer
    parts.datamodule.setup("fit")
    assert parts.datamodule.split("train").images.device.type == "cuda"

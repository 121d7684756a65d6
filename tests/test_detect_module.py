"""The detection LightningModule: NMS, mAP from torchmetrics, deploy-form detections, a Lightning run."""

from __future__ import annotations

from functools import partial

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging
from torch import nn

from repablate.data.detection import ShapesDetectDataModule
from repablate.models.yolov7_tiny import YOLOv7Tiny
from repablate.nn import reparameterize
from repablate.train.detect import DetectionModule, postprocess
from tests.test_yolo_model import randomize_batch_norms

NUM_CLASSES = 6


class OracleDetector(nn.Module):
    """Returns decoded detections built from the labels it is given, optionally with wrong classes or shifted
    boxes; has the head attributes the module needs."""

    def __init__(self, batches, wrong_class: bool = False, shift: float = 0.0):
        super().__init__()
        self.detect = YOLOv7Tiny(nc=NUM_CLASSES).detect
        self.answers = [self._decoded(targets, len(images), wrong_class, shift) for images, targets in batches]
        self.calls = 0

    @staticmethod
    def _decoded(targets, batch_size, wrong_class, shift):
        width = max(1, max((targets[:, 0] == i).sum().item() for i in range(batch_size)))
        decoded = torch.zeros(batch_size, width, 5 + NUM_CLASSES)
        for i in range(batch_size):
            rows = targets[targets[:, 0] == i]
            classes = (rows[:, 1].long() + int(wrong_class)) % NUM_CLASSES
            decoded[i, : len(rows), :4] = rows[:, 2:]
            decoded[i, : len(rows), 0] += shift
            decoded[i, : len(rows), 4] = 1.0
            decoded[i, torch.arange(len(rows)), 5 + classes] = 1.0
        return decoded

    def forward(self, images):
        decoded = self.answers[self.calls]
        self.calls += 1
        return decoded, []


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    data = ShapesDetectDataModule(num_train=8, num_val=8, batch_size=4, cache_dir=str(tmp_path_factory.mktemp("c")))
    data.prepare_data()
    data.setup()
    return data


def _module(model: nn.Module) -> DetectionModule:
    return DetectionModule(model, partial(torch.optim.SGD, lr=0.01), num_classes=NUM_CLASSES, image_size=64)


def test_map_is_one_when_predictions_equal_the_labels(shapes):
    batches = list(shapes.val_dataloader())
    assert _module(OracleDetector(batches)).evaluate(OracleDetector(batches), batches) == {"map50": 1.0, "map": 1.0}
    wrong = _module(OracleDetector(batches)).evaluate(OracleDetector(batches, wrong_class=True), batches)
    assert wrong == {"map50": 0.0, "map": 0.0}
    # Boxes shifted by a third of the smallest width: still found at IoU 0.5 for most, not at 0.95.
    shifted = _module(OracleDetector(batches)).evaluate(OracleDetector(batches, shift=3.0), batches)
    assert shifted["map"] < shifted["map50"] <= 1.0 and shifted["map"] < 1.0


def test_postprocess_keeps_the_best_of_overlapping_boxes_per_class():
    decoded = torch.tensor(
        [
            [
                [20, 20, 10, 10, 0.9, 1.0, 0.0],  # class 0
                [21, 20, 10, 10, 0.8, 1.0, 0.0],  # class 0, overlaps the first: suppressed
                [21, 20, 10, 10, 0.7, 0.0, 1.0],  # class 1 at the same place: kept (NMS is per class)
                [50, 50, 10, 10, 0.0005, 1.0, 0.0],  # below the confidence threshold
            ]
        ]
    )
    (result,) = postprocess(decoded, conf_threshold=0.001, iou_threshold=0.5)
    assert result["labels"].tolist() == [0, 1]
    assert torch.allclose(result["scores"], torch.tensor([0.9, 0.7]))
    assert torch.allclose(result["boxes"][0], torch.tensor([15.0, 15.0, 25.0, 25.0]))


@pytest.mark.parametrize("variant", ["repconv", "plain"])
def test_deploy_form_detections_equal_training_form(shapes, variant):
    torch.manual_seed(0)
    model = YOLOv7Tiny(nc=NUM_CLASSES, conv3x3=variant)
    randomize_batch_norms(model)  # statistics and affine parameters as training leaves them, not the identity
    deployed = reparameterize(model)
    model.eval()
    images = next(iter(shapes.val_dataloader()))[0]
    with torch.no_grad():  # a low threshold: the untrained head's scores are ~1e-3
        trained, fused = postprocess(model(images)[0], 1e-4), postprocess(deployed(images)[0], 1e-4)
    assert sum(len(r["labels"]) for r in trained) > 0
    for a, b in zip(trained, fused, strict=True):
        assert torch.equal(a["labels"], b["labels"])
        assert torch.allclose(a["boxes"], b["boxes"], atol=1e-3)  # pixels
        assert torch.allclose(a["scores"], b["scores"], atol=1e-6)


def test_module_refuses_a_mismatched_head():
    with pytest.raises(ValueError, match="num_classes=3 does not match"):
        DetectionModule(YOLOv7Tiny(nc=2), partial(torch.optim.SGD, lr=0.1), num_classes=3)
    with pytest.raises(ValueError, match="no YOLO head"):
        DetectionModule(nn.Linear(2, 2), partial(torch.optim.SGD, lr=0.1), num_classes=2)


def test_lightning_run_with_ema_weights(shapes, tmp_path):
    # Weight EMA is Lightning's callback; at the end of training the model holds the averaged weights.
    module = _module(YOLOv7Tiny(nc=NUM_CLASSES, conv3x3="repconv_n"))
    ema = EMAWeightAveraging(decay=0.5)
    trainer = pl.Trainer(
        max_steps=2,
        limit_val_batches=1,
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[ema],
    )
    trainer.fit(module, datamodule=shapes)
    assert {"train/loss", "val/map50", "val/map"} <= set(trainer.callback_metrics)
    assert torch.isfinite(trainer.callback_metrics["train/loss"])
    averaged = dict(ema._average_model.module.named_parameters())
    assert all(torch.equal(p, averaged[name]) for name, p in module.named_parameters())
    assert module.example_input(2).shape == (2, 3, 64, 64)

"""The detection LightningModule (``task=detect``), a ``repablate.train.task.TaskModule``:
``evaluate(model, dataloader) -> {"map50", "map"}``.

The model is a YOLO-style detector (``repablate.models.yolov7_tiny.YOLOv7Tiny``): raw per-level maps in
training mode, ``(decoded, raw)`` in eval mode. Detections are decoded boxes after per-class NMS
(torchvision.ops.batched_nms); mAP@0.5 and mAP@0.5:0.95 come from torchmetrics (COCO protocol, pycocotools).
Weight EMA is Lightning's ``EMAWeightAveraging`` callback (validation and the final model use the average).
"""

from __future__ import annotations

import torch
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.detection import MeanAveragePrecision
from torchvision.ops import batched_nms, box_convert

from repablate.train.schedules import configure_optimization
from repablate.train.task import OptimizerFactory, SchedulerFactory, TaskModule
from repablate.train.yolo_loss import YoloLoss


def postprocess(
    decoded: torch.Tensor,
    conf_threshold: float = 0.001,
    iou_threshold: float = 0.65,
    max_detections: int = 100,
    max_candidates: int = 10000,
) -> list[dict[str, torch.Tensor]]:
    """Decoded head output (B, N, 5 + classes: cx, cy, w, h, objectness, class scores) -> per image a dict of
    ``boxes`` (xyxy pixels), ``scores`` (objectness x class score) and ``labels``, after per-class NMS.

    Every (box, class) pair scoring above ``conf_threshold`` is a candidate (YOLO's multi-label evaluation);
    the ``max_candidates`` best go to NMS, the ``max_detections`` best survive it.
    """
    results = []
    for image in decoded:
        scores = image[:, 4:5] * image[:, 5:] if image.shape[1] > 5 else image[:, 4:5]
        box_index, labels = (scores > conf_threshold).nonzero(as_tuple=True)
        candidate_scores = scores[box_index, labels]
        if len(candidate_scores) > max_candidates:
            candidate_scores, best = candidate_scores.topk(max_candidates)
            box_index, labels = box_index[best], labels[best]
        boxes = box_convert(image[box_index, :4], "cxcywh", "xyxy")
        keep = batched_nms(boxes.float(), candidate_scores.float(), labels, iou_threshold)[:max_detections]
        results.append({"boxes": boxes[keep], "scores": candidate_scores[keep], "labels": labels[keep]})
    return results


def targets_per_image(targets: torch.Tensor, batch_size: int) -> list[dict[str, torch.Tensor]]:
    """(N, 6) ``batch_index, class, cx, cy, w, h`` rows -> per image a dict of ``boxes`` (xyxy) and ``labels``."""
    return [
        {"boxes": box_convert(rows[:, 2:], "cxcywh", "xyxy"), "labels": rows[:, 1].long()}
        for rows in (targets[targets[:, 0] == i] for i in range(batch_size))
    ]


def map_metric(sync_on_compute: bool = True) -> MeanAveragePrecision:
    """COCO mAP over IoU 0.5:0.95 (and at 0.5) for xyxy boxes; ``sync_on_compute``: gathered over DDP processes."""
    return MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", backend="pycocotools", sync_on_compute=sync_on_compute
    )


class DetectionModule(TaskModule):
    """YOLO training with the YOLO loss; logs ``train/loss`` (and its box/obj/cls parts), ``val/loss``,
    ``val/map50``, ``val/map``, ``val/map50_best`` and ``test/map50``, ``test/map``.

    Args:
        model: a YOLOv7Tiny-like detector whose ``detect`` head holds ``anchors`` (pixels) and ``stride``.
        optimizer: ``optimizer(param_groups)`` (a Hydra partial); biases and norm weights get no weight decay.
        scheduler: ``scheduler(optimizer, total_steps=, steps_per_epoch=)``, or None.
        num_classes, in_channels, image_size: of the data.
        lr_scale: multiplies the optimizer's learning rate.
        box_gain, obj_gain, cls_gain, anchor_t: of the loss (hyp.scratch.tiny by default).
        conf_threshold, iou_threshold, max_detections: of NMS for evaluation.
        channels_last, compile, compile_options: as in ``TaskModule``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        num_classes: int = 80,
        in_channels: int = 3,
        image_size: int = 640,
        lr_scale: float = 1.0,
        box_gain: float = 0.05,
        obj_gain: float = 1.0,
        cls_gain: float = 0.5,
        anchor_t: float = 4.0,
        conf_threshold: float = 0.001,
        iou_threshold: float = 0.65,
        max_detections: int = 100,
        channels_last: bool = False,
        compile: bool = False,
        compile_options: dict | None = None,
    ):
        super().__init__(
            model,
            optimizer,
            scheduler,
            num_classes,
            in_channels,
            image_size,
            lr_scale,
            channels_last,
            compile,
            compile_options,
        )
        head = getattr(model, "detect", None)
        if head is None or not hasattr(head, "anchors"):
            raise ValueError(f"model {type(model).__name__} has no YOLO head: expected model.detect with anchors")
        if head.nc != num_classes:
            raise ValueError(f"num_classes={num_classes} does not match the model's head ({head.nc} classes)")
        self.loss = YoloLoss(
            head.anchors,
            head.stride,
            num_classes,
            image_size,
            box=box_gain,
            obj=obj_gain,
            cls=cls_gain,
            anchor_t=anchor_t,
        )
        self.nms = dict(conf_threshold=conf_threshold, iou_threshold=iou_threshold, max_detections=max_detections)
        self.val_map, self.test_map = self.new_metric(), self.new_metric()
        self.val_map50_best = MaxMetric()
        self.val_map50_best.persistent(True)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        loss, parts = self.loss(self.run_model(images), targets)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(images))
        self.log_dict({f"train/{name}": value for name, value in parts.items()}, batch_size=len(images))
        return loss

    def _eval_step(self, batch, metric: MeanAveragePrecision, stage: str) -> None:
        images, targets = batch
        decoded, raw = self.run_model(images)
        loss, _ = self.loss(raw, targets)
        self.log(f"{stage}/loss", loss, batch_size=len(images))
        metric.update(postprocess(decoded, **self.nms), targets_per_image(targets, len(images)))

    def validation_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.val_map, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._eval_step(batch, self.test_map, "test")

    def on_validation_epoch_end(self) -> None:
        result = self.val_map.compute()
        self.val_map.reset()
        self.log_dict({"val/map50": result["map_50"], "val/map": result["map"]}, prog_bar=True)
        if not self.trainer.sanity_checking:
            self.val_map50_best.update(result["map_50"])
            self.log("val/map50_best", self.val_map50_best.compute())

    def on_test_epoch_end(self) -> None:
        result = self.test_map.compute()
        self.test_map.reset()
        self.log_dict({"test/map50": result["map_50"], "test/map": result["map"]})

    def new_metric(self, sync_on_compute: bool = True) -> MeanAveragePrecision:
        return map_metric(sync_on_compute)

    def update_metric(self, metric: MeanAveragePrecision, outputs, targets: torch.Tensor) -> None:
        decoded, _ = outputs  # eval mode: (decoded, raw)
        metric.update(postprocess(decoded, **self.nms), targets_per_image(targets, len(decoded)))

    def metric_results(self, metric: MeanAveragePrecision) -> dict[str, float]:
        """mAP@0.5 and mAP@0.5:0.95: ``{"map50": ..., "map": ...}``."""
        result = metric.compute()
        return {"map50": result["map_50"].item(), "map": result["map"].item()}

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A random batch of images in [0, 1] of the training size, on the module's device."""
        return torch.rand(batch_size, self.in_channels, self.image_size, self.image_size, device=self.device)

    def configure_optimizers(self):
        # YOLO's groups: weight decay on conv/linear weights only, not on biases, norm weights or implicit layers.
        decay, no_decay = [], []
        for name, parameter in self.model.named_parameters():
            (decay if parameter.ndim > 1 and "implicit" not in name else no_decay).append(parameter)
        groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
        return configure_optimization(self, groups, self.optimizer_factory, self.scheduler_factory, self.lr_scale)

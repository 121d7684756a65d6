"""The YOLO detection loss (YOLOv5/YOLOv7's ``ComputeLoss``, written from its description):

- matching: a target goes to every anchor whose width and height are both within a factor ``anchor_t`` (4.0)
  of its own, in the grid cell holding its centre and the two neighbouring cells its centre is closest to;
- box: CIoU (torchvision.ops.complete_box_iou_loss) of the decoded prediction, xy = 2 sigmoid - 0.5 + cell,
  wh = (2 sigmoid)^2 * anchor;
- objectness: BCE against the matched prediction's IoU (0 elsewhere), levels weighted 4.0 / 1.0 / 0.4;
- class: BCE against one-hot classes at matched predictions.
Gains follow hyp.scratch.tiny (box 0.05, obj 1.0, cls 0.5), scaled as YOLOv7 does by levels, classes and
image size.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torchvision.ops import complete_box_iou_loss

# Neighbour cells a target is also assigned to: itself, left, up, right, down (x, y offsets).
_OFFSETS = torch.tensor([[0, 0], [1, 0], [0, 1], [-1, 0], [0, -1]], dtype=torch.float32)


def _cxcywh_to_xyxy(boxes: torch.Tensor) -> torch.Tensor:
    return torch.cat((boxes[:, :2] - boxes[:, 2:] / 2, boxes[:, :2] + boxes[:, 2:] / 2), 1)


class YoloLoss:
    """``loss(raw, targets) -> (total, parts)``.

    Args:
        anchors: (levels, anchors, 2) in pixels; strides: per level. Both as the detection head holds them.
        num_classes: classes; image_size: training input side (scales the objectness gain as YOLOv7 does).
        box, obj, cls: loss gains; anchor_t: the width/height ratio limit for matching; balance: objectness
        weight per level.
    ``raw``: the head's training output, per level (B, anchors, ny, nx, 5 + classes).
    ``targets``: (N, 6) rows of ``batch_index, class, cx, cy, w, h`` in input pixels.
    ``total`` is summed over the parts and multiplied by the batch size (YOLO's convention); ``parts`` holds the
    detached ``box``, ``obj`` and ``cls`` losses before that scaling.
    """

    def __init__(
        self,
        anchors: torch.Tensor,
        strides: Sequence[float] | torch.Tensor,
        num_classes: int,
        image_size: int = 640,
        box: float = 0.05,
        obj: float = 1.0,
        cls: float = 0.5,
        anchor_t: float = 4.0,
        balance: Sequence[float] = (4.0, 1.0, 0.4),
    ):
        levels = anchors.shape[0]
        if len(balance) != levels:
            raise ValueError(f"balance={list(balance)} must give one weight per level ({levels})")
        if not anchor_t > 1:
            raise ValueError(f"anchor_t={anchor_t!r} is not allowed: it must be greater than 1")
        self.strides = torch.as_tensor(strides, dtype=torch.float32)
        self.anchors = anchors.detach().float() / self.strides.view(-1, 1, 1)  # in grid cells
        self.num_classes, self.anchor_t, self.balance = num_classes, anchor_t, list(balance)
        self.box_gain = box * 3 / levels
        self.cls_gain = cls * num_classes / 80 * 3 / levels
        self.obj_gain = obj * (image_size / 640) ** 2 * 3 / levels

    def match(self, targets: torch.Tensor, level: int, grid: tuple[int, int]):
        """Target-anchor-cell assignments of one level: (batch, anchor, gy, gx) indices, the target boxes in
        grid units relative to their cell, the classes, and the anchors (grid units)."""
        anchors = self.anchors[level].to(targets.device)
        ny, nx = grid
        boxes = targets[:, 2:] / self.strides[level]  # cx, cy, w, h in cells
        ratio = boxes[None, :, 2:] / anchors[:, None]  # (anchors, targets, 2)
        fits = torch.max(ratio, 1 / ratio).amax(2) < self.anchor_t
        anchor_index, target_index = fits.nonzero(as_tuple=True)
        t, a = targets[target_index], anchor_index
        xy = boxes[target_index, :2]
        # Also the neighbour cells the centre is closest to (2 of 4), where they exist.
        inverse = torch.tensor([nx, ny], device=xy.device) - xy
        near_low = (xy % 1 < 0.5) & (xy > 1)
        near_high = (inverse % 1 < 0.5) & (inverse > 1)
        use = torch.stack(
            (torch.ones_like(near_low[:, 0]), near_low[:, 0], near_low[:, 1], near_high[:, 0], near_high[:, 1])
        )  # (5, matches)
        offsets = _OFFSETS.to(xy.device)[:, None].expand(-1, len(xy), -1)[use] * 0.5
        t, a, xy = t.repeat(5, 1, 1)[use], a.repeat(5, 1)[use], xy.repeat(5, 1, 1)[use]
        cell = (xy - offsets).long()
        gx, gy = cell[:, 0].clamp(0, nx - 1), cell[:, 1].clamp(0, ny - 1)
        wh = t[:, 4:] / self.strides[level]
        box = torch.cat((xy - torch.stack((gx, gy), 1), wh), 1)
        return (t[:, 0].long(), a, gy, gx), box, t[:, 1].long(), anchors[a]

    def __call__(self, raw: Sequence[torch.Tensor], targets: torch.Tensor):
        device = raw[0].device
        box_loss = torch.zeros((), device=device)
        obj_loss = torch.zeros((), device=device)
        cls_loss = torch.zeros((), device=device)
        targets = targets.to(device=device, dtype=torch.float32)
        for level, prediction in enumerate(raw):
            prediction = prediction.float()
            (b, a, gy, gx), box, classes, anchors = self.match(targets, level, prediction.shape[2:4])
            objectness = torch.zeros(prediction.shape[:4], device=device)
            if len(b):
                matched = prediction[b, a, gy, gx]
                xy = matched[:, :2].sigmoid() * 2 - 0.5
                # torchvision's CIoU divides by the box height; a box far below a cell loses its height to rounding
                # (x2 - x1 == 0) and its gradient turns NaN, so sizes stop at 1e-4 cells.
                wh = ((matched[:, 2:4].sigmoid() * 2) ** 2 * anchors).clamp(min=1e-4)
                ciou_loss = complete_box_iou_loss(
                    _cxcywh_to_xyxy(torch.cat((xy, wh), 1)), _cxcywh_to_xyxy(box), reduction="none"
                )
                box_loss = box_loss + ciou_loss.mean()
                objectness[b, a, gy, gx] = (1 - ciou_loss).detach().clamp(0)
                if self.num_classes > 1:
                    one_hot = F.one_hot(classes, self.num_classes).float()
                    cls_loss = cls_loss + F.binary_cross_entropy_with_logits(matched[:, 5:], one_hot)
            level_obj = F.binary_cross_entropy_with_logits(prediction[..., 4], objectness)
            obj_loss = obj_loss + level_obj * self.balance[level]
        parts = {"box": box_loss * self.box_gain, "obj": obj_loss * self.obj_gain, "cls": cls_loss * self.cls_gain}
        total = sum(parts.values()) * raw[0].shape[0]
        return total, {name: value.detach() for name, value in parts.items()}

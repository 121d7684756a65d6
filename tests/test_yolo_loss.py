"""The YOLO loss: anchor matching by width/height ratio, exact zero box loss for a perfect box, and that it trains."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from repablate.models.yolov7_tiny import ANCHORS, STRIDES, YOLOv7Tiny
from repablate.train.yolo_loss import YoloLoss

ANCHOR_TENSOR = torch.tensor(ANCHORS, dtype=torch.float32).view(3, 3, 2)


def _loss(num_classes: int = 3, image_size: int = 64) -> YoloLoss:
    return YoloLoss(ANCHOR_TENSOR, STRIDES, num_classes, image_size)


@settings(max_examples=60, deadline=None)
@given(
    cx=st.floats(0.5, 63.5),
    cy=st.floats(0.5, 63.5),
    w=st.floats(2, 200),
    h=st.floats(2, 200),
    level=st.integers(0, 2),
)
def test_matches_respect_the_ratio_threshold_and_the_grid(cx, cy, w, h, level):
    loss = _loss()
    grid = 64 // STRIDES[level]
    targets = torch.tensor([[0, 1, cx, cy, w, h]])
    (b, a, gy, gx), box, classes, anchors = loss.match(targets, level, (grid, grid))
    anchor_px = ANCHOR_TENSOR[level]
    ratio = torch.tensor([w, h]) / anchor_px
    fitting = (torch.max(ratio, 1 / ratio).amax(1) < 4.0).nonzero().flatten().tolist()
    assert sorted(set(a.tolist())) == fitting  # exactly the anchors within a factor 4 in both sides
    assert ((gx >= 0) & (gx < grid) & (gy >= 0) & (gy < grid)).all()
    assert (classes == 1).all() and (b == 0).all()
    if fitting:
        centre = (int(cx / STRIDES[level]), int(cy / STRIDES[level]))
        cells = set(zip(gx.tolist(), gy.tolist(), strict=True))
        assert (min(centre[0], grid - 1), min(centre[1], grid - 1)) in cells
        # At most 3 cells per anchor: the centre's and its two nearest neighbours. A centre exactly on a cell edge
        # is "near" both neighbours of that axis under YOLOv7's rule (fractional offset < 0.5 from either side), as
        # in YOLOv7's build_targets: one more cell per such axis.
        on_edge = sum(float(v / STRIDES[level]).is_integer() for v in (cx, cy))
        assert len(a) <= (3 + on_edge) * len(fitting)
        # The target box relative to each assigned cell stays inside the reach of 2 sigmoid - 0.5.
        assert box[:, :2].min() >= -0.5 - 1e-5 and box[:, :2].max() <= 1.5 + 1e-5


def test_perfect_prediction_has_zero_box_loss():
    # xy logits 0 decode to the cell centre (2 * 0.5 - 0.5 = 0.5); wh logits logit(sqrt(t / anchor) / 2) decode to
    # exactly t for every anchor within the ratio 4 (the matched ones). A target centred in its cell (so no
    # neighbour cell is assigned) then costs no box loss.
    loss = _loss()
    target_wh = torch.tensor([12.0, 14.0])
    raw = []
    for level, stride in enumerate(STRIDES):
        grid = 64 // stride
        level_raw = torch.zeros(1, 3, grid, grid, 8)
        fraction = (torch.sqrt(target_wh / ANCHOR_TENSOR[level]) / 2).clamp(1e-4, 1 - 1e-4)
        level_raw[..., 2:4] = torch.logit(fraction).view(1, 3, 1, 1, 2)
        raw.append(level_raw)
    targets = torch.tensor([[0, 0, 8 * 3 + 4, 8 * 2 + 4, *target_wh.tolist()]])  # cell (3, 2) at stride 8
    matched = [len(loss.match(targets, level, raw[level].shape[2:4])[0][0]) for level in range(3)]
    assert matched == [3, 0, 0]  # all three P3 anchors, in the centre cell only; no P4/P5 anchor fits
    total, parts = loss(raw, targets)
    assert parts["box"].abs().item() < 1e-6  # float32 CIoU of identical boxes
    assert total > 0  # objectness and class are still wrong
    # Moving the target by a pixel makes the same prediction cost box loss.
    _, moved = loss(raw, targets + torch.tensor([[0, 0, 1.0, 0, 0, 0]]))
    assert moved["box"] > 1e-4


def test_loss_is_refused_with_bad_settings():
    for kwargs, word in (({"anchor_t": 1.0}, "anchor_t"), ({"balance": (1.0,)}, "balance")):
        try:
            YoloLoss(ANCHOR_TENSOR, STRIDES, 3, **kwargs)
        except ValueError as error:
            assert word in str(error)
        else:
            raise AssertionError(f"{kwargs} was accepted")


def test_loss_decreases_on_a_fixed_batch():
    torch.manual_seed(0)
    model = YOLOv7Tiny(nc=3, conv3x3="repconv").train()
    loss = _loss()
    images = torch.rand(2, 3, 64, 64)
    targets = torch.tensor([[0, 0, 20, 20, 16, 20], [0, 2, 44, 40, 24, 18], [1, 1, 32, 32, 30, 30]])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(10):
        total, _ = loss(model(images), targets)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        losses.append(total.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    # Measured on 1 and 2 threads, seeds 0 and 1: the 10th loss is 0.74-0.75 of the first.
    assert losses[-1] < 0.85 * losses[0], losses


def test_tiny_predicted_boxes_keep_finite_gradients():
    # Width/height logits of -30 decode to boxes ~1e-26 cells wide: their x2 - x1 rounds to 0 in float32.
    raw = [torch.zeros(1, 3, 64 // s, 64 // s, 8, requires_grad=True) for s in STRIDES]
    with torch.no_grad():
        for level in raw:
            level[..., 2:4] = -30.0
    total, _ = _loss()(raw, torch.tensor([[0, 0, 21.0, 19.0, 12.0, 14.0]]))
    total.backward()
    assert torch.isfinite(total) and all(torch.isfinite(level.grad).all() for level in raw)

"""repablate.models -- networks whose 3x3 convs are swappable blocks from repablate.nn, and init schemes."""

from repablate.models.classifier import (
    RepVGGClassifier,
    repconv_relu,
    repvgg_a0,
    repvgg_a1,
    repvgg_b0,
    small,
)
from repablate.models.init import article_init, default_init
from repablate.models.yolov7_tiny import YOLOv7Tiny

__all__ = [
    "RepVGGClassifier",
    "YOLOv7Tiny",
    "article_init",
    "default_init",
    "repconv_relu",
    "repvgg_a0",
    "repvgg_a1",
    "repvgg_b0",
    "small",
]

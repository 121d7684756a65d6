"""RepVGG-style classifiers whose 3x3 block is a factory, so one network compares plain convs and RepConv variants.

The layout follows RepVGG (Ding et al., 2021): stages of 3x3 blocks, the first block of each stage strided,
the first stage a single-block stem, then global average pooling and a linear head. No residual connections:
the block alone decides whether the network has multi-branch structure during training. The RepVGG presets
put ReLU after every block (``act=nn.ReLU``), as RepVGG does, whichever block they are given; ``small`` keeps
the block's own activation.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import nn

from repablate.nn import RepConv

BlockFactory = Callable[..., nn.Module]
ActivationFactory = Callable[[], nn.Module]


def repconv_relu(c_in: int, c_out: int, s: int = 1, deploy: bool = False, act: nn.Module | None = None) -> RepConv:
    """RepVGG's block: RepConv (3x3 + 1x1 + identity where shapes allow) with ReLU, or with ``act`` when given.
    The classifiers' default block."""
    return RepConv(c_in, c_out, k=3, s=s, act=nn.ReLU() if act is None else act, deploy=deploy)


def _check_stage_lists(widths: Sequence[int], depths: Sequence[int], strides: Sequence[int]) -> None:
    if not widths or not (len(widths) == len(depths) == len(strides)):
        raise ValueError(
            f"widths={list(widths)}, depths={list(depths)}, strides={list(strides)} are not allowed: "
            "give one entry per stage in each, at least one stage"
        )
    for name, values in (("widths", widths), ("depths", depths), ("strides", strides)):
        if any(not isinstance(v, int) or v < 1 for v in values):
            raise ValueError(f"{name}={list(values)} is not allowed: every entry must be a positive integer")


def _check_multiplier(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={value!r} is not allowed: it must be a positive number")


class RepVGGClassifier(nn.Module):
    """Stages of 3x3 blocks, global average pool, linear head.

    Args:
        num_classes, in_channels: of the task.
        widths: output channels of each stage; the first stage is the stem.
        depths: blocks per stage (RepVGG's stem stage has 1).
        block: factory ``block(c_in, c_out, s=stride)`` returning an nn.Module (e.g. a partial of
            ``repablate.nn.RepConv`` or ``repablate.nn.Conv`` with ``k=3``); default ``repconv_relu``.
            With ``deploy=True`` it is called with ``deploy=True`` as well, and with ``act=`` when ``act`` is given.
        strides: stride of each stage's first block (the others stride 1); default 2 for every stage.
        deploy: build every block fused, so a deploy-form state_dict loads.
        width_multiplier: scales every width (rounded, at least 1): a knob for sweeps.
        depth_multiplier: scales every depth (rounded, at least 1).
        act: the activation after each block: called once per block (e.g. ``nn.ReLU``) and the module passed to
            ``block`` as ``act=``; None leaves the block's own (``repconv_relu``: ReLU; RepConv and Conv: SiLU).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int,
        widths: Sequence[int],
        depths: Sequence[int],
        block: BlockFactory | None = None,
        strides: Sequence[int] | None = None,
        deploy: bool = False,
        width_multiplier: float = 1.0,
        depth_multiplier: float = 1.0,
        act: ActivationFactory | None = None,
    ):
        super().__init__()
        widths, depths = list(widths), list(depths)
        strides = [2] * len(widths) if strides is None else list(strides)
        _check_stage_lists(widths, depths, strides)
        _check_multiplier("width_multiplier", width_multiplier)
        _check_multiplier("depth_multiplier", depth_multiplier)
        for name, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not allowed: it must be a positive integer")
        block = repconv_relu if block is None else block
        extra = {"deploy": True} if deploy else {}

        def make(c_in: int, c_out: int, stride: int) -> nn.Module:
            if act is None:
                return block(c_in, c_out, s=stride, **extra)
            return block(c_in, c_out, s=stride, act=act(), **extra)

        self.widths = [max(1, round(w * width_multiplier)) for w in widths]
        self.depths = [max(1, round(d * depth_multiplier)) for d in depths]
        self.strides = strides
        self.num_classes, self.in_channels = num_classes, in_channels
        stages, c_in = [], in_channels
        for width, depth, stride in zip(self.widths, self.depths, self.strides, strict=True):
            blocks = [make(c_in, width, stride)] + [make(width, width, 1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            c_in = width
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c_in, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.flatten(self.pool(self.stages(x)), 1))


def small(
    num_classes: int = 10,
    in_channels: int = 1,
    block: BlockFactory | None = None,
    deploy: bool = False,
    width_multiplier: float = 1.0,
    depth_multiplier: float = 1.0,
    act: ActivationFactory | None = None,
) -> RepVGGClassifier:
    """A CPU-fast net for the embedded 8x8 digits (also fine on 32x32 shapes): widths 16-32-32, depths 1-2-2.

    Strides 1, 2, 2 take 8x8 inputs to 8, 4 and 2 pixels, so every stage still sees a spatial neighbourhood;
    the second block of each later stage has the identity branch. ``act``: see ``RepVGGClassifier``.
    """
    return RepVGGClassifier(
        num_classes,
        in_channels,
        widths=(16, 32, 32),
        depths=(1, 2, 2),
        strides=(1, 2, 2),
        block=block,
        deploy=deploy,
        width_multiplier=width_multiplier,
        depth_multiplier=depth_multiplier,
        act=act,
    )


def _repvgg(
    depths: Sequence[int],
    a: float,
    b: float,
    num_classes: int,
    in_channels: int,
    block: BlockFactory | None,
    deploy: bool,
    width_multiplier: float,
    depth_multiplier: float,
    act: ActivationFactory | None,
) -> RepVGGClassifier:
    # RepVGG, section 3.4: stage widths min(64, 64a), 64a, 128a, 256a, 512b, each stage starting with stride 2.
    widths = (min(64, int(64 * a)), int(64 * a), int(128 * a), int(256 * a), int(512 * b))
    return RepVGGClassifier(
        num_classes,
        in_channels,
        widths=widths,
        depths=depths,
        block=block,
        deploy=deploy,
        width_multiplier=width_multiplier,
        depth_multiplier=depth_multiplier,
        act=act,
    )


def repvgg_a0(
    num_classes: int = 1000,
    in_channels: int = 3,
    block: BlockFactory | None = None,
    deploy: bool = False,
    width_multiplier: float = 1.0,
    depth_multiplier: float = 1.0,
    act: ActivationFactory | None = nn.ReLU,
) -> RepVGGClassifier:
    """RepVGG-A0: depths 1, 2, 4, 14, 1; a = 0.75, b = 2.5 (8.30M deploy-form parameters at 1000 classes)."""
    return _repvgg(
        (1, 2, 4, 14, 1), 0.75, 2.5, num_classes, in_channels, block, deploy, width_multiplier, depth_multiplier, act
    )


def repvgg_a1(
    num_classes: int = 1000,
    in_channels: int = 3,
    block: BlockFactory | None = None,
    deploy: bool = False,
    width_multiplier: float = 1.0,
    depth_multiplier: float = 1.0,
    act: ActivationFactory | None = nn.ReLU,
) -> RepVGGClassifier:
    """RepVGG-A1: depths 1, 2, 4, 14, 1; a = 1, b = 2.5 (12.78M deploy-form parameters at 1000 classes)."""
    return _repvgg(
        (1, 2, 4, 14, 1), 1.0, 2.5, num_classes, in_channels, block, deploy, width_multiplier, depth_multiplier, act
    )


def repvgg_b0(
    num_classes: int = 1000,
    in_channels: int = 3,
    block: BlockFactory | None = None,
    deploy: bool = False,
    width_multiplier: float = 1.0,
    depth_multiplier: float = 1.0,
    act: ActivationFactory | None = nn.ReLU,
) -> RepVGGClassifier:
    """RepVGG-B0: depths 1, 4, 6, 16, 1; a = 1, b = 2.5 (14.33M deploy-form parameters at 1000 classes)."""
    return _repvgg(
        (1, 4, 6, 16, 1), 1.0, 2.5, num_classes, in_channels, block, deploy, width_multiplier, depth_multiplier, act
    )

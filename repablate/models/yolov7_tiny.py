"""YOLOv7-tiny with swappable stride-1 3x3 convs, written from the layer list of the official YOLOv7
repository's ``cfg/training/yolov7-tiny.yaml`` and its modules in ``models/common.py`` (layer indices in comments).

Every stride-1 3x3 conv (16 inside the ELAN blocks, 3 before the detection head) is built by one factory,
chosen by ``conv3x3``: ``"plain"`` (Conv + BN + LeakyReLU 0.1, the official layer and the plain-conv
baseline), ``"repconv"`` (RepConv, same activation), ``"repconv_n"`` (RepConv without identity branch),
``"qarepconv"`` (QARepVGG's block), ``"quantrepconv"`` (RepConv trained for its int8 deployed conv), or a block
factory such as the harness's ``block`` config (see ``conv3x3_factory``). Stride-2 and 1x1 convs stay
official Convs. Everything, the detection head's implicit layers included, fuses through
``repablate.nn.reparameterize``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
from torch import nn

from repablate.nn import Conv, QARepConv, QuantRepConv, RepConv

# Pixels, (w, h) per anchor, 3 per level: P3/8, P4/16, P5/32 (the official anchors).
ANCHORS: tuple[tuple[float, ...], ...] = (
    (10, 13, 16, 30, 33, 23),
    (30, 61, 62, 45, 59, 119),
    (116, 90, 156, 198, 373, 326),
)
STRIDES = (8, 16, 32)
CONV3X3_CHOICES = ("plain", "repconv", "repconv_n", "qarepconv", "quantrepconv")

# YOLOv7-tiny's conv settings: LeakyReLU(0.1), and the BN constants of YOLOv7's training code.
_BN = {"bn_eps": 1e-3, "bn_momentum": 0.03}


def _act() -> nn.Module:
    return nn.LeakyReLU(0.1, inplace=True)


def tiny_conv(c1: int, c2: int, k: int = 1, s: int = 1, deploy: bool = False) -> Conv:
    """The official tiny Conv: conv (no bias) + BN (eps 1e-3, momentum 0.03) + LeakyReLU(0.1)."""
    return Conv(c1, c2, k, s, act=_act(), deploy=deploy, **_BN)


def conv3x3_factory(conv3x3: str | Callable[..., nn.Module], deploy: bool = False) -> Callable[..., nn.Module]:
    """The ``block(c_in, c_out, s=1)`` factory for the swappable 3x3 convs named by ``conv3x3``.

    A callable (e.g. a Hydra partial of ``repablate.nn.RepConv`` or ``Conv`` with ``k=3``) is called with tiny's
    settings as keywords: ``act=LeakyReLU(0.1), deploy=..., bn_eps=1e-3, bn_momentum=0.03``.
    """
    if conv3x3 == "original":
        raise ValueError(
            'conv3x3="original" is now called "plain" (the official Conv + BN + LeakyReLU 0.1): use conv3x3="plain"'
        )
    if isinstance(conv3x3, str):
        named = {
            "plain": partial(Conv, k=3),
            "repconv": partial(RepConv, k=3),
            "repconv_n": partial(RepConv, k=3, use_identity=False),
            "qarepconv": partial(QARepConv, k=3),
            "quantrepconv": partial(QuantRepConv, k=3),
        }
        if conv3x3 not in named:
            raise ValueError(f"conv3x3={conv3x3!r} is not allowed: use one of {list(CONV3X3_CHOICES)} or a callable")
        base = named[conv3x3]
    elif callable(conv3x3):
        base = conv3x3
    else:
        raise ValueError(f"conv3x3={conv3x3!r} is not allowed: use one of {list(CONV3X3_CHOICES)} or a callable")

    def block(c1: int, c2: int, s: int = 1) -> nn.Module:
        return base(c1, c2, s=s, act=_act(), deploy=deploy, **_BN)

    return block


class ELAN(nn.Module):
    """The tiny ELAN block: two 1x1 branches, a chain of two 3x3 convs on the second, all four concatenated
    (newest first, as the official Concat[-1, -2, -3, -4]) and mixed by a 1x1 conv."""

    def __init__(self, c1: int, c_mid: int, c2: int, block: Callable[..., nn.Module], deploy: bool = False):
        super().__init__()
        self.cv1 = tiny_conv(c1, c_mid, deploy=deploy)
        self.cv2 = tiny_conv(c1, c_mid, deploy=deploy)
        self.cv3 = block(c_mid, c_mid, s=1)
        self.cv4 = block(c_mid, c_mid, s=1)
        self.out = tiny_conv(4 * c_mid, c2, deploy=deploy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x), self.cv2(x)
        c = self.cv3(b)
        d = self.cv4(c)
        return self.out(torch.cat((d, c, b, a), 1))


class SPPCSP(nn.Module):
    """The tiny SPP-CSP neck (layers 29-37): max pools 5/9/13 on one 1x1 branch, concatenated with the other."""

    def __init__(self, c1: int, c2: int, deploy: bool = False):
        super().__init__()
        self.cv1 = tiny_conv(c1, c2, deploy=deploy)
        self.cv2 = tiny_conv(c1, c2, deploy=deploy)
        self.pools = nn.ModuleList(nn.MaxPool2d(k, 1, k // 2) for k in (5, 9, 13))
        self.cv3 = tiny_conv(4 * c2, c2, deploy=deploy)
        self.out = tiny_conv(2 * c2, c2, deploy=deploy)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x), self.cv2(x)
        pooled = [pool(b) for pool in self.pools]
        b = self.cv3(torch.cat((pooled[2], pooled[1], pooled[0], b), 1))
        return self.out(torch.cat((b, a), 1))


class ImplicitA(nn.Module):
    """A learned per-channel add (init normal(0, 0.02))."""

    def __init__(self, channels: int):
        super().__init__()
        self.implicit = nn.Parameter(torch.randn(1, channels, 1, 1) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.implicit


class ImplicitM(nn.Module):
    """A learned per-channel multiply (init normal(1, 0.02))."""

    def __init__(self, channels: int):
        super().__init__()
        self.implicit = nn.Parameter(1 + torch.randn(1, channels, 1, 1) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.implicit


class IDetect(nn.Module):
    """YOLOv7's detection head: per level ImplicitA -> 1x1 conv (bias) -> ImplicitM.

    Training mode returns the raw maps, each (bs, na, ny, nx, nc + 5). Eval mode returns ``(decoded, raw)``
    with ``decoded`` (bs, N, nc + 5): box centre and size in input pixels, then objectness and class scores
    (sigmoids). ``reparameterize()`` folds both implicit layers into the convs.
    """

    def __init__(
        self,
        nc: int,
        channels: Sequence[int],
        anchors: Sequence[Sequence[float]] = ANCHORS,
        strides: Sequence[int] = STRIDES,
        deploy: bool = False,
    ):
        super().__init__()
        if len(anchors) != len(channels) or len(strides) != len(channels):
            raise ValueError(
                f"anchors ({len(anchors)} levels) and strides ({len(strides)}) must match channels ({len(channels)})"
            )
        self.nc, self.no, self.nl = nc, nc + 5, len(channels)
        self.na = len(anchors[0]) // 2
        self.register_buffer("anchors", torch.tensor(anchors, dtype=torch.float32).view(self.nl, self.na, 2))
        self.register_buffer("stride", torch.tensor(strides, dtype=torch.float32))
        self.m = nn.ModuleList(nn.Conv2d(c, self.no * self.na, 1) for c in channels)
        self.deploy = deploy
        if not deploy:
            self.ia = nn.ModuleList(ImplicitA(c) for c in channels)
            self.im = nn.ModuleList(ImplicitM(self.no * self.na) for _ in channels)
        self._init_biases()

    @torch.no_grad()
    def _init_biases(self, image_size: int = 640) -> None:
        # YOLOv5/7's prior: about 8 objects per 640x640 image for objectness, even class probabilities.
        for conv, stride in zip(self.m, self.stride.tolist(), strict=True):
            bias = conv.bias.view(self.na, -1)
            bias[:, 4] += torch.log(torch.tensor(8 / (image_size / stride) ** 2))
            bias[:, 5:] += torch.log(torch.tensor(0.6 / (self.nc - 0.99)))

    def forward(self, features: Sequence[torch.Tensor]):
        raw = []
        for i, x in enumerate(features):
            if self.deploy:
                x = self.m[i](x)
            else:
                x = self.im[i](self.m[i](self.ia[i](x)))
            bs, _, ny, nx = x.shape
            raw.append(x.view(bs, self.na, self.no, ny, nx).permute(0, 1, 3, 4, 2).contiguous())
        if self.training:
            return raw
        return torch.cat([self.decode(x, i) for i, x in enumerate(raw)], 1), raw

    def decode(self, raw: torch.Tensor, level: int) -> torch.Tensor:
        """Raw map of one level -> (bs, na*ny*nx, no): xywh in pixels, then sigmoid scores."""
        bs, na, ny, nx, no = raw.shape
        ys, xs = torch.meshgrid(torch.arange(ny, device=raw.device), torch.arange(nx, device=raw.device), indexing="ij")
        grid = torch.stack((xs, ys), -1).to(raw.dtype)
        y = raw.sigmoid()
        xy = (y[..., :2] * 2 - 0.5 + grid) * self.stride[level]
        wh = (y[..., 2:4] * 2) ** 2 * self.anchors[level].view(1, na, 1, 1, 2)
        return torch.cat((xy, wh, y[..., 4:]), -1).view(bs, -1, no)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold ImplicitA into each conv's bias (b += W a) and ImplicitM into weight and bias; drop both."""
        if self.deploy:
            return
        for conv, add, mul in zip(self.m, self.ia, self.im, strict=True):
            weight = conv.weight.double()
            bias = conv.bias.double() + (weight.flatten(1) @ add.implicit.double().flatten())
            scale = mul.implicit.double().flatten()
            conv.weight.copy_(weight * scale.view(-1, 1, 1, 1))
            conv.bias.copy_(bias * scale)
        del self.ia, self.im
        self.deploy = True


class YOLOv7Tiny(nn.Module):
    """YOLOv7-tiny (official layout) whose stride-1 3x3 convs are chosen by ``conv3x3``.

    Args:
        nc: number of classes.
        conv3x3: "plain", "repconv", "repconv_n", "qarepconv", "quantrepconv" or a ``block(c_in, c_out, s=1)``
            factory.
        deploy: build every block in its fused form, so that a deployed state_dict loads.
        in_channels: image channels.
        anchors: per level (w, h, w, h, ...) in pixels; the official anchors by default.
    Forward: training mode -> list of 3 raw maps (strides 8, 16, 32); eval mode -> ``(decoded, raw)``
    (see ``IDetect``).
    """

    def __init__(
        self,
        nc: int = 80,
        conv3x3: str | Callable[..., nn.Module] = "plain",
        deploy: bool = False,
        in_channels: int = 3,
        anchors: Sequence[Sequence[float]] = ANCHORS,
    ):
        super().__init__()
        if not isinstance(nc, int) or nc < 1:
            raise ValueError(f"nc={nc!r} is not allowed: it must be a positive integer")
        block = conv3x3_factory(conv3x3, deploy)
        c = partial(tiny_conv, deploy=deploy)
        self.nc, self.conv3x3 = nc, conv3x3 if isinstance(conv3x3, str) else "custom"
        self.stem = nn.Sequential(c(in_channels, 32, 3, 2), c(32, 64, 3, 2))  # 0-1
        self.stage1 = ELAN(64, 32, 64, block, deploy)  # 2-7
        self.stage2 = nn.Sequential(nn.MaxPool2d(2, 2), ELAN(64, 64, 128, block, deploy))  # 8-14, P3
        self.stage3 = nn.Sequential(nn.MaxPool2d(2, 2), ELAN(128, 128, 256, block, deploy))  # 15-21, P4
        self.stage4 = nn.Sequential(nn.MaxPool2d(2, 2), ELAN(256, 256, 512, block, deploy))  # 22-28, P5
        self.sppcsp = SPPCSP(512, 256, deploy)  # 29-37
        self.up_p4 = nn.Sequential(c(256, 128), nn.Upsample(scale_factor=2, mode="nearest"))  # 38-39
        self.lateral_p4 = c(256, 128)  # 40
        self.top_down_p4 = ELAN(256, 64, 128, block, deploy)  # 41-47
        self.up_p3 = nn.Sequential(c(128, 64), nn.Upsample(scale_factor=2, mode="nearest"))  # 48-49
        self.lateral_p3 = c(128, 64)  # 50
        self.top_down_p3 = ELAN(128, 32, 64, block, deploy)  # 51-57
        self.down_p4 = c(64, 128, 3, 2)  # 58
        self.bottom_up_p4 = ELAN(256, 64, 128, block, deploy)  # 59-65
        self.down_p5 = c(128, 256, 3, 2)  # 66
        self.bottom_up_p5 = ELAN(512, 128, 256, block, deploy)  # 67-73
        self.out_convs = nn.ModuleList((block(64, 128, s=1), block(128, 256, s=1), block(256, 512, s=1)))  # 74-76
        self.detect = IDetect(nc, (128, 256, 512), anchors, STRIDES, deploy)  # 77

    @property
    def stride(self) -> torch.Tensor:
        """Strides of the three output levels (8, 16, 32)."""
        return self.detect.stride

    def forward(self, x: torch.Tensor):
        p3 = self.stage2(self.stage1(self.stem(x)))
        p4 = self.stage3(p3)
        p5 = self.sppcsp(self.stage4(p4))
        t4 = self.top_down_p4(torch.cat((self.lateral_p4(p4), self.up_p4(p5)), 1))
        t3 = self.top_down_p3(torch.cat((self.lateral_p3(p3), self.up_p3(t4)), 1))
        b4 = self.bottom_up_p4(torch.cat((self.down_p4(t3), t4), 1))
        b5 = self.bottom_up_p5(torch.cat((self.down_p5(b4), p5), 1))
        return self.detect([conv(f) for conv, f in zip(self.out_convs, (t3, b4, b5), strict=True)])

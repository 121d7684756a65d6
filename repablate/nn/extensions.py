"""The extension blocks sketched by the article "YOLOv7's RepConv module: the structure magician of training and
inference" (its extensions and its outlook), built from RepConv and Conv.

They hold no fusion code of their own except CrossRepConv, whose shared dense branch and per-modality 1x1
branches fuse into one conv per modality; everything fuses through ``repablate.nn.reparameterize``.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from repablate.nn import fusion
from repablate.nn.blocks import Conv, RepConv, make_activation


class RepMobileBlock(nn.Module):
    """RepConv(c1, c2, stride s), then a depthwise 3x3 Conv + BN + SiLU."""

    def __init__(self, c1: int, c2: int, s: int = 1):
        super().__init__()
        self.rep = RepConv(c1, c2, 3, s)
        self.depthwise = Conv(c2, c2, 3, 1, g=c2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.depthwise(self.rep(x))


class RepAttention(nn.Module):
    """Spatial self-attention with k=1 RepConv projections and a residual connection.

    query, key: RepConv(C, C // 8, k=1); value: RepConv(C, C, k=1) (which has an identity branch). Projections
    are linear (no activation), as attention projections are. attention = softmax(q^T k / sqrt(C)) over the
    H*W positions; out = v attention^T + x.
    """

    def __init__(self, c: int):
        super().__init__()
        if c < 8:
            raise ValueError(f"c={c} is not allowed: RepAttention projects to c // 8 channels, so c must be >= 8")
        self.query = RepConv(c, c // 8, k=1, act=False)
        self.key = RepConv(c, c // 8, k=1, act=False)
        self.value = RepConv(c, c, k=1, act=False)
        self.scale = 1.0 / math.sqrt(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q = self.query(x).flatten(2)  # b, c/8, hw
        k = self.key(x).flatten(2)
        v = self.value(x).flatten(2)  # b, c, hw
        attention = torch.softmax(q.transpose(1, 2) @ k * self.scale, dim=-1)  # b, hw, hw
        return (v @ attention.transpose(1, 2)).reshape(b, c, h, w) + x


class RepCrossModal(nn.Module):
    """Image features through RepConv(img, txt), a text embedding through Linear(txt, txt) broadcast over H x W,
    summed, then RepConv(txt, txt)."""

    def __init__(self, img_channels: int, txt_channels: int):
        super().__init__()
        self.image = RepConv(img_channels, txt_channels)
        self.text = nn.Linear(txt_channels, txt_channels)
        self.fuse = RepConv(txt_channels, txt_channels)

    def forward(self, image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.fuse(self.image(image) + self.text(text)[:, :, None, None])


class CrossRepConv(nn.Module):
    """A k x k conv + BN shared by all modalities plus one 1x1 conv + BN per modality (e.g. rgb and depth).

    ``forward(x, modality)``. Deployed, each modality gets one fused k x k conv: shared kernel + its own 1x1.
    """

    def __init__(
        self,
        c1: int,
        c2: int,
        modalities: tuple[str, ...] | list[str] = ("rgb", "depth"),
        k: int = 3,
        s: int = 1,
        act: bool | None | nn.Module = True,
    ):
        super().__init__()
        if not modalities or len(set(modalities)) != len(modalities):
            raise ValueError(f"modalities={modalities!r} is not allowed: give one or more distinct names")
        # A plain RepConv (no 1x1, no identity) is exactly the shared dense branch, and fuses to its kernel.
        self.shared = RepConv(c1, c2, k, s, act=False, use_identity=False, use_1x1=False)
        self.per_modality = nn.ModuleDict(
            {name: RepConv(c1, c2, 1, s, act=False, use_identity=False) for name in modalities}
        )
        self.act = make_activation(act)
        self.modalities, self.k, self.deploy = tuple(modalities), k, False

    def forward(self, x: torch.Tensor, modality: str) -> torch.Tensor:
        if modality not in self.modalities:
            raise ValueError(f"modality={modality!r} is not one of {list(self.modalities)}")
        if self.deploy:
            return self.act(self.fused[modality](x))
        return self.act(self.shared(x) + self.per_modality[modality](x))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """One fused conv per modality; the shared and per-modality branches are dropped."""
        if self.deploy:
            return
        # The reparameterize() walk fuses children first, so both parts are single convs with bias by now.
        for part in (self.shared, *self.per_modality.values()):
            part.reparameterize()
        shared = self.shared.rbr_reparam
        fused = nn.ModuleDict()
        for name, branch in self.per_modality.items():
            conv = nn.Conv2d(
                shared.in_channels, shared.out_channels, self.k, shared.stride, shared.padding, bias=True
            ).to(shared.weight)
            conv.weight.copy_(shared.weight + fusion.pad_to_kernel(branch.rbr_reparam.weight, self.k))
            conv.bias.copy_(shared.bias + branch.rbr_reparam.bias)
            fused[name] = conv
        del self.shared, self.per_modality
        self.fused, self.deploy = fused, True

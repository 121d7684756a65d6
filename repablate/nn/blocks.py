"""The blocks under study: YOLOv7's RepConv (multi-branch in training, one conv when deployed) and the plain
Conv + BN + activation baseline. Both know how to fuse themselves (``reparameterize()``) and keep YOLOv7's
signatures and attribute names, so YOLOv7 code and checkpoints map onto them one to one.
"""

from __future__ import annotations

import torch
from torch import nn

from repablate.nn import fusion


def autopad(k: int, p: int | None = None, d: int = 1) -> int:
    """Padding that keeps the spatial size at stride 1 ("same" padding) unless ``p`` is given."""
    return d * (k // 2) if p is None else p


def make_activation(act: bool | None | nn.Module) -> nn.Module:
    """YOLOv7's convention: True -> SiLU, False or None -> no activation, a module -> that module."""
    if act is True:
        return nn.SiLU()
    if act is False or act is None:
        return nn.Identity()
    if isinstance(act, nn.Module):
        return act
    raise ValueError(f"act={act!r} is not allowed: use True (SiLU), False/None (no activation) or an nn.Module")


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}={value!r} is not allowed: it must be a positive integer")


def branch_geometry(
    block: str, c1: int, c2: int, k: int, s: int, p: int | None, g: int, d: int, use_identity: bool | None
) -> tuple[int, bool]:
    """Check a multi-branch block's shape arguments; return its padding and whether an identity branch fits.

    The branches are summed, so they must align on the kernel centre (odd ``k``, ``p >= d * (k // 2)``); an
    identity branch needs ``c1 == c2``, stride 1 and 'same' padding. Raises ValueError naming the bad value.
    """
    _check_positive(c1=c1, c2=c2, k=k, s=s, g=g, d=d)
    if k % 2 == 0:
        raise ValueError(f"k={k} is not allowed: {block} needs an odd kernel size so branches share a centre")
    if c1 % g or c2 % g:
        raise ValueError(f"g={g} is not allowed: it must divide both c1={c1} and c2={c2}")
    p = autopad(k, p, d)
    if p < d * (k // 2):
        raise ValueError(
            f"p={p} is not allowed for k={k}, d={d}: the branches align on the kernel centre, which needs "
            f"p >= d * (k // 2) = {d * (k // 2)}"
        )
    identity_possible = c1 == c2 and s == 1 and p == d * (k // 2)
    if use_identity and not identity_possible:
        raise ValueError(
            f"use_identity=True is impossible for c1={c1}, c2={c2}, s={s}, p={p}: an identity branch needs "
            f"c1 == c2, stride 1 and 'same' padding p={d * (k // 2)} so that output and input have one shape"
        )
    return p, identity_possible


def _conv_bn(c1: int, c2: int, k: int, s: int, p: int, d: int, g: int, eps: float, momentum: float) -> nn.Sequential:
    # nn.Sequential(conv, bn) keeps YOLOv7's state_dict keys: rbr_dense.0.weight, rbr_dense.1.running_mean, ...
    return nn.Sequential(
        nn.Conv2d(c1, c2, k, s, p, dilation=d, groups=g, bias=False),
        nn.BatchNorm2d(c2, eps=eps, momentum=momentum),
    )


class _FormCheck:
    """Refuses a state_dict of the other form (training vs deploy) with a message naming the module.

    Without this, ``load_state_dict(strict=False)`` would silently skip the block, and strict loading would only
    list key names. ``repablate.nn.load_state_dict`` adds the guarantee that nothing is loaded on failure.
    """

    _train_keys: tuple[str, ...]
    _deploy_keys: tuple[str, ...]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        given = [key[len(prefix) :] for key in state_dict if key.startswith(prefix)]
        where = prefix.rstrip(".") or "<root>"
        if self.deploy and any(key.startswith(self._train_keys) for key in given):  # type: ignore[attr-defined]
            raise RuntimeError(
                f"{type(self).__name__} at '{where}' is deployed (fused) but the state_dict holds its training "
                "form: build the model with deploy=False, load, then call repablate.nn.reparameterize"
            )
        if not self.deploy and any(key.startswith(self._deploy_keys) for key in given):  # type: ignore[attr-defined]
            raise RuntimeError(
                f"{type(self).__name__} at '{where}' is in training form but the state_dict holds its deploy "
                "(fused) form: build the model with deploy=True to load a fused checkpoint"
            )
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]


class RepConv(_FormCheck, nn.Module):
    """Re-parameterizable conv: k x k conv+BN, 1x1 conv+BN and identity BN, summed, then the activation.

    Args follow YOLOv7's ``RepConv(c1, c2, k=3, s=1, p=None, g=1, act=True, deploy=False)``; beyond it:
      d: dilation of the k x k conv (the 1x1 branch is aligned with its centre tap).
      use_identity: None keeps YOLOv7's rule (identity BN where c1 == c2 and s == 1); False drops it (YOLOv7's
        RepConvN); True demands it and raises ValueError where it cannot exist.
      use_1x1: False drops the 1x1 branch. With k == 1 there is no separate 1x1 branch.
      bn_eps, bn_momentum: of every BN (YOLOv7 trains with 1e-3 and 0.03).
    Any odd k, any groups dividing both channel counts (depthwise included), float and half dtypes.
    """

    _train_keys = ("rbr_dense.", "rbr_1x1.", "rbr_identity.")
    _deploy_keys = ("rbr_reparam.",)

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 3,
        s: int = 1,
        p: int | None = None,
        g: int = 1,
        act: bool | None | nn.Module = True,
        deploy: bool = False,
        *,
        d: int = 1,
        use_identity: bool | None = None,
        use_1x1: bool = True,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ):
        super().__init__()
        p, identity_possible = branch_geometry("RepConv", c1, c2, k, s, p, g, d, use_identity)
        self.c1, self.c2, self.k, self.s, self.p, self.g, self.d = c1, c2, k, s, p, g, d
        self.deploy = deploy
        self.act = make_activation(act)
        if deploy:
            self.rbr_reparam = nn.Conv2d(c1, c2, k, s, p, dilation=d, groups=g, bias=True)
            return
        self.rbr_identity = (
            nn.BatchNorm2d(c1, eps=bn_eps, momentum=bn_momentum)
            if identity_possible and use_identity is not False
            else None
        )
        self.rbr_dense = _conv_bn(c1, c2, k, s, p, d, g, bn_eps, bn_momentum)
        self.rbr_1x1 = (
            _conv_bn(c1, c2, 1, s, p - d * (k // 2), 1, g, bn_eps, bn_momentum) if use_1x1 and k > 1 else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.act(self.rbr_reparam(x))
        out = self.rbr_dense(x)
        if self.rbr_1x1 is not None:
            out = out + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.act(out)

    def branches(self) -> dict[str, nn.Module]:
        """The live training branches by name ('dense', '1x1', 'identity'); empty once deployed."""
        if self.deploy:
            return {}
        named = {"dense": self.rbr_dense, "1x1": self.rbr_1x1, "identity": self.rbr_identity}
        return {name: module for name, module in named.items() if module is not None}

    @torch.no_grad()
    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single k x k kernel and bias equal (in eval mode) to the sum of the branches.

        Computed in float64 (see ``fusion.fusion_dtype``) and returned in that precision.
        """
        weight = self.rbr_dense[0].weight
        dtype = fusion.fusion_dtype(weight.device)
        kernel, bias = fusion.fold_batch_norm(weight.to(dtype), self.rbr_dense[1])
        if self.rbr_1x1 is not None:
            k1, b1 = fusion.fold_batch_norm(self.rbr_1x1[0].weight.to(dtype), self.rbr_1x1[1])
            kernel, bias = kernel + fusion.pad_to_kernel(k1, self.k), bias + b1
        if self.rbr_identity is not None:
            eye = fusion.identity_kernel(self.c1, self.g, self.k, dtype, weight.device)
            ki, bi = fusion.fold_batch_norm(eye, self.rbr_identity)
            kernel, bias = kernel + ki, bias + bi
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fuse the branches into ``rbr_reparam`` in place and drop them. Does nothing when already deployed."""
        if self.deploy:
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        dense = self.rbr_dense[0]
        fused = nn.Conv2d(self.c1, self.c2, self.k, self.s, self.p, dilation=self.d, groups=self.g, bias=True)
        fused = fused.to(device=dense.weight.device, dtype=dense.weight.dtype)
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)
        for name in ("rbr_dense", "rbr_1x1", "rbr_identity"):
            delattr(self, name)
        self.rbr_reparam = fused
        self.deploy = True

    fuse_repvgg_block = reparameterize  # YOLOv7's name

    def extra_repr(self) -> str:
        parts = [f"{self.c1}, {self.c2}, k={self.k}, s={self.s}, p={self.p}, g={self.g}, d={self.d}"]
        parts.append("deploy=True" if self.deploy else f"branches={list(self.branches())}")
        return ", ".join(parts)


class RepConvN(RepConv):
    """RepConv without the identity branch (YOLOv7's RepConvN), for use inside residual or concat blocks."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("use_identity", False)
        super().__init__(*args, **kwargs)


class Conv(_FormCheck, nn.Module):
    """The plain baseline: conv + BN + activation, YOLOv7's ``Conv(c1, c2, k=1, s=1, p=None, g=1, act=True)``.

    ``reparameterize()`` folds the BN into the conv (which then gains a bias); ``deploy=True`` builds that
    folded form directly, for loading a deployed checkpoint.
    """

    _train_keys = ("bn.",)
    _deploy_keys = ("conv.bias",)

    def __init__(
        self,
        c1: int,
        c2: int,
        k: int = 1,
        s: int = 1,
        p: int | None = None,
        g: int = 1,
        act: bool | None | nn.Module = True,
        *,
        d: int = 1,
        deploy: bool = False,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ):
        super().__init__()
        _check_positive(c1=c1, c2=c2, k=k, s=s, g=g, d=d)
        if c1 % g or c2 % g:
            raise ValueError(f"g={g} is not allowed: it must divide both c1={c1} and c2={c2}")
        self.conv = nn.Conv2d(c1, c2, k, s, autopad(k, p, d), dilation=d, groups=g, bias=deploy)
        self.deploy = deploy  # a plain attribute: read on every forward, where hasattr() would cost ~1 us
        if not deploy:
            self.bn = nn.BatchNorm2d(c2, eps=bn_eps, momentum=bn_momentum)
        self.act = make_activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.act(self.conv(x))
        return self.act(self.bn(self.conv(x)))

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the BN into the conv in place and drop it. Does nothing when already folded."""
        if self.deploy:
            return
        weight = self.conv.weight
        dtype = fusion.fusion_dtype(weight.device)
        kernel, bias = fusion.fold_batch_norm(weight.to(dtype), self.bn)
        old = self.conv
        self.conv = nn.Conv2d(
            old.in_channels,
            old.out_channels,
            old.kernel_size,
            old.stride,
            old.padding,
            dilation=old.dilation,
            groups=old.groups,
            bias=True,
        ).to(device=weight.device, dtype=weight.dtype)
        self.conv.weight.copy_(kernel)
        self.conv.bias.copy_(bias)
        del self.bn
        self.deploy = True

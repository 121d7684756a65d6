"""Quantization-friendly re-parameterization: QARepVGG's block (``QARepConv``) and RepConv trained quantization-aware
for its deployed int8 conv (``QuantRepConv``). Both follow the protocol of ``RepConv``: ``reparameterize()`` fuses in
place (idempotently), ``deploy`` says whether it has, ``deploy=True`` builds the fused form, ``branches()`` names the
live branches for the gradient monitor. The equations are written out in docs/REPARAM.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from repablate.nn import fusion
from repablate.nn.blocks import RepConv, _conv_bn, _FormCheck, branch_geometry, make_activation


class QARepConv(_FormCheck, nn.Module):
    """QARepVGG's block (Chu et al., "Make RepVGG Greater Again: A Quantization-aware Approach", AAAI 2024):

        y = act( BN( BN_d(W_d * x) + (W_1 * x + b_1) + x ) )

    a k x k conv + BN, a 1x1 conv with bias and no BN, and the identity with no BN (where c1 == c2, stride 1 and
    'same' padding), summed, then one BN after the sum, then the activation. Removing the branch BNs and adding the
    post-sum BN is what makes the fused kernel quantize well (the paper's analysis); deployed it is one k x k conv
    with bias, like RepConv.

    Args as ``RepConv(c1, c2, k=3, s=1, p=None, g=1, act=True, deploy=False)``; beyond them:
      d: dilation of the k x k conv (the 1x1 branch is aligned with its centre tap).
      use_identity: None: identity where shapes allow; False: none; True: demanded (ValueError where impossible).
      use_1x1: False drops the 1x1 branch. With k == 1 there is no separate 1x1 branch.
      use_1x1_bias: the 1x1 conv's bias (super-gradients' default; QARepVGG's and YOLOv6's code build it without).
      bn_eps, bn_momentum: of both BNs (the dense branch's and the post-sum one).
    """

    _train_keys = ("rbr_dense.", "rbr_1x1.", "bn.")
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
        use_1x1_bias: bool = True,
        bn_eps: float = 1e-5,
        bn_momentum: float = 0.1,
    ):
        super().__init__()
        p, identity_possible = branch_geometry("QARepConv", c1, c2, k, s, p, g, d, use_identity)
        self.c1, self.c2, self.k, self.s, self.p, self.g, self.d = c1, c2, k, s, p, g, d
        self.deploy = deploy
        self.act = make_activation(act)
        if deploy:
            self.rbr_reparam = nn.Conv2d(c1, c2, k, s, p, dilation=d, groups=g, bias=True)
            return
        self.rbr_dense = _conv_bn(c1, c2, k, s, p, d, g, bn_eps, bn_momentum)
        self.rbr_1x1 = (
            nn.Conv2d(c1, c2, 1, s, p - d * (k // 2), groups=g, bias=use_1x1_bias) if use_1x1 and k > 1 else None
        )
        self.rbr_identity = nn.Identity() if identity_possible and use_identity is not False else None
        self.bn = nn.BatchNorm2d(c2, eps=bn_eps, momentum=bn_momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.act(self.rbr_reparam(x))
        out = self.rbr_dense(x)
        if self.rbr_1x1 is not None:
            out = out + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        return self.act(self.bn(out))

    def branches(self) -> dict[str, nn.Module]:
        """The live branches that have parameters, by name ('dense', '1x1'); empty once deployed.

        The identity has no parameters (its gradient share would always be 0) and the post-sum BN belongs to no
        branch, so neither is listed.
        """
        if self.deploy:
            return {}
        named = {"dense": self.rbr_dense, "1x1": self.rbr_1x1}
        return {name: module for name, module in named.items() if module is not None}

    @torch.no_grad()
    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The single k x k kernel and bias equal (in eval mode) to the block before its activation.

        Sum of the branches: W_s = W'_d + pad(W_1) + I,  b_s = b'_d + b_1  ((W'_d, b'_d): the dense BN folded into
        W_d); then the post-sum BN folded with b_s as the conv's bias: W = W_s t,  b = beta + (b_s - mean) t, with
        t = gamma / sqrt(var + eps). Computed in float64 (see ``fusion.fusion_dtype``) and returned in it.
        """
        weight = self.rbr_dense[0].weight
        dtype = fusion.fusion_dtype(weight.device)
        kernel, bias = fusion.fold_batch_norm(weight.to(dtype), self.rbr_dense[1])
        if self.rbr_1x1 is not None:
            kernel = kernel + fusion.pad_to_kernel(self.rbr_1x1.weight.to(dtype), self.k)
            if self.rbr_1x1.bias is not None:
                bias = bias + self.rbr_1x1.bias.to(dtype)
        if self.rbr_identity is not None:
            kernel = kernel + fusion.identity_kernel(self.c1, self.g, self.k, dtype, weight.device)
        return fusion.fold_batch_norm(kernel, self.bn, conv_bias=bias)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fuse the branches and the post-sum BN into ``rbr_reparam`` in place and drop them. No-op once deployed."""
        if self.deploy:
            return
        kernel, bias = self.get_equivalent_kernel_bias()
        dense = self.rbr_dense[0]
        fused = nn.Conv2d(self.c1, self.c2, self.k, self.s, self.p, dilation=self.d, groups=self.g, bias=True)
        fused = fused.to(device=dense.weight.device, dtype=dense.weight.dtype)
        fused.weight.copy_(kernel)
        fused.bias.copy_(bias)
        for name in ("rbr_dense", "rbr_1x1", "rbr_identity", "bn"):
            delattr(self, name)
        self.rbr_reparam = fused
        self.deploy = True

    def extra_repr(self) -> str:
        parts = [f"{self.c1}, {self.c2}, k={self.k}, s={self.s}, p={self.p}, g={self.g}, d={self.d}"]
        if self.deploy:
            parts.append("deploy=True")
        else:
            live = [*self.branches(), *(["identity"] if self.rbr_identity is not None else [])]
            parts.append(f"branches={live}, post_bn=True")
        return ", ".join(parts)


class QuantRepConv(RepConv):
    """RepConv trained quantization-aware for what is deployed: its fused k x k conv with int8 weights.

    The branches, their switches and their state_dict keys are RepConv's. What changes is the forward:
      - eval mode: one conv with the fake-quantized fused kernel,  y = act(conv(x, Q(W_R)) + b_R),  where
        (W_R, b_R) is RepConv's fusion (BNs folded with their running statistics), computed differentiably, and
        Q is symmetric per-output-channel fake quantization to ``bits`` bits (``fusion.fake_quantize_per_channel``)
        with a straight-through gradient. This is exactly the deployed conv.
      - train mode: the branches normalize with batch statistics, as in RepConv, and the output carries the error
        that quantizing the deployed kernel makes:  y = act(RepConv_train(x) + conv(x, Q(W_R) - W_R)).
        With the straight-through estimator this is the same function, value and gradient, as
        conv(x, Q(W_R)) + b_R + [RepConv_train(x) - conv(x, W_R) - b_R]: as PyTorch's
        ``torch.ao.nn.intrinsic.qat.ConvBn2d`` does for one conv-BN pair (Krishnamoorthi 2018), weights
        fake-quantized after folding with running statistics, normalization with batch statistics. Training costs
        one k x k conv more than RepConv; see docs/REPARAM.md for the choice and how it differs from ConvBn2d.
    ``reparameterize()`` gives a plain conv whose weights are exactly Q(W_R): per output channel, weight / s is an
    integer in [-(2^(bits-1) - 1), 2^(bits-1) - 1] with s = max |weight| / (2^(bits-1) - 1), so ONNX Runtime's
    per-channel symmetric int8 quantization of that conv recovers the same integers.

    Args as ``RepConv``, plus ``bits`` (8: int8).
    """

    def __init__(self, *args, bits: int = 8, **kwargs):
        super().__init__(*args, **kwargs)
        fusion.quantization_max(bits)  # raises ValueError for a bad bits
        self.bits = bits

    def _folded_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_R, b_R): RepConv's fusion with running statistics, differentiable, in the fusion dtype."""
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

    def quantized_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(Q(W_R), b_R) in the fusion dtype, differentiable to every branch parameter (straight-through in Q)."""
        kernel, bias = self._folded_kernel_bias()
        return fusion.fake_quantize_per_channel(kernel, self.bits), bias

    @torch.no_grad()
    def get_equivalent_kernel_bias(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The deployed kernel and bias: (Q(W_R), b_R) in float64 (``RepConv.reparameterize`` casts them once)."""
        return self.quantized_kernel_bias()

    def _conv(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        bias = None if bias is None else bias.to(x.dtype)
        return F.conv2d(x, weight.to(x.dtype), bias, self.s, self.p, self.d, self.g)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.deploy:
            return self.act(self.rbr_reparam(x))
        if not self.training:
            return self.act(self._conv(x, *self.quantized_kernel_bias()))
        out = self.rbr_dense(x)  # the branches with batch statistics, exactly as RepConv (running stats update)
        if self.rbr_1x1 is not None:
            out = out + self.rbr_1x1(x)
        if self.rbr_identity is not None:
            out = out + self.rbr_identity(x)
        with torch.no_grad():  # Q(W_R) - W_R has zero gradient under the straight-through estimator
            kernel, _ = self._folded_kernel_bias()
            error = fusion.fake_quantize_per_channel(kernel, self.bits) - kernel
        return self.act(out + self._conv(x, error, None))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, bits={self.bits}"

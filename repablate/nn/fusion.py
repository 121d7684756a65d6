"""Kernel algebra behind re-parameterization: BN folding, kernel padding, identity kernels.

Every function here is pure (tensors in, tensors out) so that each step of a fusion can be tested on its own.
The equations are written out in docs/REPARAM.md.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def fusion_dtype(device: torch.device) -> torch.dtype:
    """The dtype fused kernels are computed in before being cast back to the model's dtype.

    float64 wherever the device has it, so that folding adds no rounding beyond the final cast; half-precision
    models therefore get kernels rounded once, not after every multiply.
    """
    return torch.float32 if device.type == "mps" else torch.float64


def fold_batch_norm(
    weight: torch.Tensor, bn: nn.BatchNorm2d, conv_bias: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the conv that feeds it.

    With t = gamma / sqrt(running_var + eps):  W' = W * t (per output channel),  b' = beta + (b - running_mean) * t.
    Returns (W', b') in the dtype of ``weight``. Raises ValueError for a BN that keeps no running statistics,
    since its eval-mode output then depends on the batch and no fixed conv can reproduce it.
    """
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError(
            f"cannot fold {bn}: it keeps no running statistics (track_running_stats=False); "
            "only BatchNorm layers with running statistics can be fused"
        )
    channels = weight.shape[0]
    if bn.num_features != channels:
        raise ValueError(f"cannot fold {bn} into a conv with {channels} output channels")
    dtype = weight.dtype
    gamma = bn.weight.to(dtype) if bn.weight is not None else torch.ones(channels, dtype=dtype, device=weight.device)
    beta = bn.bias.to(dtype) if bn.bias is not None else torch.zeros(channels, dtype=dtype, device=weight.device)
    scale = gamma / torch.sqrt(bn.running_var.to(dtype) + bn.eps)
    bias = conv_bias.to(dtype) if conv_bias is not None else torch.zeros_like(beta)
    return weight * scale.reshape(-1, 1, 1, 1), beta + (bias - bn.running_mean.to(dtype)) * scale


def pad_to_kernel(kernel: torch.Tensor, k: int) -> torch.Tensor:
    """Zero-pad a square kernel (e.g. 1x1) to k x k, keeping it at the centre. k and the kernel size must be odd."""
    size = kernel.shape[-1]
    if size == k:
        return kernel
    if size > k or (k - size) % 2:
        raise ValueError(f"cannot centre a {size}x{size} kernel in a {k}x{k} one: both must be odd and {size} <= {k}")
    margin = (k - size) // 2
    return F.pad(kernel, [margin] * 4)


def identity_kernel(
    channels: int, groups: int, k: int, dtype: torch.dtype = torch.float32, device: torch.device | None = None
) -> torch.Tensor:
    """The k x k kernel of a grouped conv that returns its input unchanged.

    Output channel i lives in group i // (channels / groups) and sees that group's inputs, indexed from 0; its
    own input is therefore in-group channel i mod (channels / groups). The single 1 sits at the kernel centre.
    """
    if channels % groups:
        raise ValueError(f"channels={channels} is not divisible by groups={groups}")
    per_group = channels // groups
    kernel = torch.zeros(channels, per_group, k, k, dtype=dtype, device=device)
    index = torch.arange(channels, device=device)
    kernel[index, index % per_group, k // 2, k // 2] = 1
    return kernel

"""Kernel algebra behind re-parameterization: BN folding, kernel padding, identity kernels, and the symmetric
per-channel fake quantization of a fused kernel (QuantRepConv).

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


def quantization_max(bits: int) -> int:
    """The largest integer of symmetric signed ``bits``-bit quantization: q_max = 2^(bits-1) - 1 (127 for int8), so
    that q lies in [-q_max, q_max] and 0 is exact. Raises ValueError outside 2..16 bits."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 16:
        raise ValueError(f"bits={bits!r} is not allowed: symmetric quantization needs an integer from 2 to 16")
    return 2 ** (bits - 1) - 1


def symmetric_scale(weight: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Per-output-channel scale of symmetric signed quantization to ``bits`` bits (no zero point).

    With q_max = 2^(bits-1) - 1 (127 for int8):  s_c = max_j |W[c, j]| / q_max,  and s_c = 1 where channel c is all
    zero (ONNX Runtime's rule for an empty range). W[c] / s_c then spans [-q_max, q_max], the symmetric int8 range
    ONNX Runtime's static quantization uses for weights (per_channel=True, symmetric weights). Returns shape (C,) in
    the dtype of ``weight``, detached: the scale is an observed statistic and carries no gradient (as PyTorch's
    observers).
    """
    q_max = quantization_max(bits)
    absmax = weight.detach().abs().flatten(1).amax(1)
    return torch.where(absmax > 0, absmax / q_max, torch.ones_like(absmax))


def fake_quantize_per_channel(weight: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Symmetric per-output-channel fake quantization with a straight-through gradient.

    Q(W)[c] = s_c * clamp(round(W[c] / s_c), -q_max, q_max) with s = ``symmetric_scale(W, bits)``; round is to
    nearest, ties to even (as torch.round, numpy and ONNX Runtime round). The forward value is exactly that product
    (W / s is integral up to its rounding in the dtype); the gradient is the straight-through estimator
    dQ/dW = 1 (Bengio et al. 2013, as in Jacob et al. 2018): the clamp never binds, since |W[c] / s_c| <= q_max.
    """
    q_max = quantization_max(bits)
    scale = symmetric_scale(weight, bits).reshape(-1, *([1] * (weight.dim() - 1)))
    quantized = torch.clamp(torch.round(weight.detach() / scale), -q_max, q_max) * scale
    return quantized + (weight - weight.detach())  # value: exactly `quantized` (w - w is 0); gradient: 1

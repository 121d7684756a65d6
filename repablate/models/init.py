"""Initialization schemes, applied in place to a built model: ``scheme(model)``, returning the model.

The config group ``init`` passes one of these as a partial, so a scheme is an ablation axis like any other.
"""

from __future__ import annotations

from torch import nn

from repablate.nn import RepConv


def default_init(model: nn.Module) -> nn.Module:
    """PyTorch's own initialization, which every layer already received when it was built: changes nothing.

    (Conv2d and Linear: Kaiming-uniform with a = sqrt(5); BatchNorm: gamma 1, beta 0.)
    """
    return model


def article_init(model: nn.Module, dense_nonlinearity: str = "relu", std_1x1: float = 0.001) -> nn.Module:
    """The RepConv initialization the article "YOLOv7's RepConv module: the structure magician of training and
    inference" recommends in its practical advice, applied to every RepConv.

    - k x k conv of the dense branch: Kaiming-normal, mode fan_out (std = gain / sqrt(c_out * k * k), as torch
      computes fan_out, gain sqrt(2) for ``dense_nonlinearity="relu"``, any name ``torch.nn.init.calculate_gain``
      knows);
    - 1x1 conv: normal, mean 0, std ``std_1x1``;
    - identity BN: gamma 0 (its beta, and every other BN, untouched), so the block starts as dense + 1x1.
    Deployed (fused) RepConvs are skipped: their kernel is a sum of branches and has no branch to initialize.
    Plain ``Conv`` blocks, the head and all other layers keep PyTorch's defaults: the article prescribes this
    scheme for RepConv only, so with it a plain baseline is identical to ``default_init``.
    """
    if not (std_1x1 >= 0):
        raise ValueError(f"std_1x1={std_1x1!r} is not allowed: it must be a non-negative number")
    for module in model.modules():
        if not isinstance(module, RepConv) or module.deploy:
            continue
        nn.init.kaiming_normal_(module.rbr_dense[0].weight, mode="fan_out", nonlinearity=dense_nonlinearity)
        if module.rbr_1x1 is not None:
            nn.init.normal_(module.rbr_1x1[0].weight, mean=0.0, std=std_1x1)
        if module.rbr_identity is not None:
            nn.init.zeros_(module.rbr_identity.weight)
    return model

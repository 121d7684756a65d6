"""Static costs of one forward pass: parameters, FLOPs and an analytic estimate of memory traffic.

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode``, which counts 2 FLOPs per multiply-add and covers
convolutions and matrix products only: batch norm, additions and activations count as zero FLOPs. Memory
traffic is what no library counts, so ``MemoryAccessCounter`` adds up, for every aten op a forward dispatches,
the bytes of each tensor it reads and each tensor it writes. It is an analytic estimate: caches, fused kernels
and the allocator are not modelled, and a tensor read by two ops counts twice.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import FlopCounterMode


def _as_args(inputs: Any) -> tuple:
    return inputs if isinstance(inputs, tuple) else (inputs,)


def count_params(model: nn.Module) -> int:
    """Number of parameter elements (buffers such as BN running statistics are not parameters)."""
    return sum(parameter.numel() for parameter in model.parameters())


@torch.no_grad()
def count_flops(model: nn.Module, inputs: Any) -> int:
    """FLOPs of one forward of ``model`` on ``inputs`` (a tensor or a tuple of arguments), 2 per multiply-add.

    Counted by ``torch.utils.flop_counter``: convolutions and matrix products; elementwise ops count zero.
    """
    counter = FlopCounterMode(display=False)
    with counter:
        model(*_as_args(inputs))
    return counter.get_total_flops()


def _tensor_bytes(tree: Any) -> int:
    return sum(leaf.numel() * leaf.element_size() for leaf in tree_leaves(tree) if isinstance(leaf, torch.Tensor))


class MemoryAccessCounter(TorchDispatchMode):
    """While active, adds up bytes read (tensor inputs) and written (tensor outputs) by every aten op.

    View ops (``func.is_view``: reshape, transpose, detach...) move no data and are skipped. ``by_op`` holds the
    bytes per op name (e.g. ``aten.convolution``); ``total`` their sum.
    """

    def __init__(self):
        super().__init__()
        self.by_op: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not func.is_view:
            self.by_op[str(func.overloadpacket)] += _tensor_bytes((args, kwargs)) + _tensor_bytes(out)
        return out

    @property
    def total(self) -> int:
        """Bytes read plus bytes written by all ops seen so far."""
        return sum(self.by_op.values())


@torch.no_grad()
def memory_access(model: nn.Module, inputs: Any) -> int:
    """Analytic estimate of the bytes one forward reads and writes (see ``MemoryAccessCounter``)."""
    counter = MemoryAccessCounter()
    with counter:
        model(*_as_args(inputs))
    return counter.total

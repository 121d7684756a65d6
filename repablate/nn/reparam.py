"""Model-wide re-parameterization: one entry point for any module tree, plus the checks that go with it.

A module takes part by defining ``reparameterize()`` (fuse itself in place, idempotently) and a boolean
``deploy`` (True once fused) -- the protocol RepConv, Conv and every extension block follow. Third-party blocks
join by implementing the same two members; nothing is registered.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn


def reparameterizable_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every (name, module) in ``model`` that follows the reparameterize/deploy protocol, root included."""
    for name, module in model.named_modules():
        if callable(getattr(module, "reparameterize", None)) and hasattr(module, "deploy"):
            yield name, module


def reparameterize(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Turn ``model`` into its deploy form: every RepConv fused, every Conv's BN folded, wherever they are nested.

    Returns the deployed model in eval mode (a deep copy unless ``inplace``). Idempotent. Fused parameters are
    new leaves with no gradient and no autograd history. Works in the model's own dtype and device.
    """
    if not inplace:
        model = copy.deepcopy(model)
    # Children before parents: a block that fuses its own children (e.g. a detection head) sees them fused.
    for _, module in reversed(list(reparameterizable_modules(model))):
        module.reparameterize()
    for parameter in model.parameters():
        parameter.grad = None
    return model.eval()


def is_deployed(model: nn.Module) -> bool:
    """True when no block of ``model`` is left in its multi-branch (training) form."""
    return all(module.deploy for _, module in reparameterizable_modules(model))


class Equivalence(NamedTuple):
    """How far two models' outputs are apart: max |a - b| and that divided by max |a| (a: the training form)."""

    max_abs: float
    max_rel: float


def _leaves(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [leaf for key in sorted(output) for leaf in _leaves(output[key])]
    if isinstance(output, (list, tuple)):
        return [leaf for item in output for leaf in _leaves(item)]
    return []


@torch.no_grad()
def equivalence_error(train_model: nn.Module, deploy_model: nn.Module, inputs: Any) -> Equivalence:
    """Compare two models on the same inputs, both in eval mode (their modes are restored afterwards).

    ``inputs`` is a tensor or a tuple of positional arguments. Outputs may be tensors or nested
    tuples/lists/dicts of them; all must have matching shapes. The relative error is normwise:
    max |a - b| / max |a|, which stays meaningful where single outputs are near zero.

    A NaN or an infinity anywhere in either model's outputs makes both ``max_abs`` and ``max_rel`` ``inf`` --
    even where the two models agree on it -- so a check written ``not error.max_rel <= tol`` (or
    ``error.max_rel < tol``) fails for every tolerance, and ``max()`` over several batches keeps it.
    """
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    modes = [(module, module.training) for model in (train_model, deploy_model) for module in model.modules()]
    try:
        train_model.eval()
        deploy_model.eval()
        expected, actual = _leaves(train_model(*args)), _leaves(deploy_model(*args))
    finally:
        for module, training in modes:
            module.training = training
    if len(expected) != len(actual) or not expected:
        raise ValueError(f"the models return different structures: {len(expected)} vs {len(actual)} tensors")
    max_abs, scale, finite = 0.0, 0.0, True
    for a, b in zip(expected, actual, strict=True):
        if a.shape != b.shape:
            raise ValueError(f"output shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
        if not a.numel():
            continue
        a64, b64 = a.double(), b.double()
        # NaN compares false, so max() would drop it (and inf - inf is NaN): a NaN model would "equal" any model.
        finite = finite and bool(torch.isfinite(a64).all()) and bool(torch.isfinite(b64).all())
        max_abs = max(max_abs, (a64 - b64).abs().max().item())
        scale = max(scale, a64.abs().max().item())
    if not finite:
        return Equivalence(math.inf, math.inf)
    return Equivalence(max_abs, max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf))


def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Load ``state_dict`` into ``model`` all or nothing.

    Before copying anything, compares keys and shapes; on a mismatch raises RuntimeError naming the blocks whose
    form (training vs deploy) differs, or the keys that are missing or unexpected, and leaves the model as it was.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    if missing or unexpected:
        wrong_form = sorted(
            name or "<root>"
            for name, module in reparameterizable_modules(model)
            if any(key.startswith(f"{name}." if name else "") for key in missing)
        )
        hint = (
            f"blocks {wrong_form[:5]} differ in form (training vs deploy): checkpoint and model must both be "
            "fused or both unfused; "
            if wrong_form
            else ""
        )
        raise RuntimeError(
            f"state_dict does not match the model: {hint}missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, tensor in state_dict.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise RuntimeError(
                f"state_dict '{key}' has shape {tuple(tensor.shape)}, the model {tuple(expected[key].shape)}"
            )
    model.load_state_dict(state_dict, strict=True)

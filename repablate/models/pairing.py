"""Paired initialization: variants of one seed start alike where they have the same layers
(docs/CONFIGURATION.md#paired-runs).

``build_paired`` builds a model and applies an init scheme so that every Conv2d and Linear draws its default init
from a generator seeded by (seed, its name; ``paired_name``), whatever else the model builds around it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.module import register_module_module_registration_hook

# RepConv's dense branch is the plain Conv's conv (YOLOv7's attribute names rbr_dense.0 and conv): one layer of the
# network, under one name, so both draw the same initial 3x3 kernel.
PAIRED_NAMES = {"rbr_dense.0": "conv"}


def paired_name(name: str) -> str:
    """The name under which the layer ``name`` (a ``named_modules`` name) draws its initialization."""
    for suffix, alias in PAIRED_NAMES.items():
        if name == suffix or name.endswith(f".{suffix}"):
            return name[: -len(suffix)] + alias
    return name


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed for the layer ``name`` of a run with ``seed``: independent of every other layer."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


@contextmanager
def _record_layers_as_built(built: dict[int, dict[str, Any]]) -> Iterator[None]:
    """While active, copies the parameters of each Conv2d and Linear as it joins its parent module: the default
    init its constructor drew, before the model may change it (a detection head's bias prior)."""

    def record(parent, name: str, module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)) and id(module) not in built:
            built[id(module)] = {key: p.detach().clone() for key, p in module.named_parameters(recurse=False)}

    handle = register_module_module_registration_hook(record)
    try:
        yield
    finally:
        handle.remove()


def build_paired(build: Callable[[], nn.Module], init: Callable[[nn.Module], Any], seed: int) -> nn.Module:
    """``build()`` the model and apply the init scheme ``init(model)``, paired across variants.

    Every Conv2d and Linear draws PyTorch's default init again (``reset_parameters``) from a generator seeded by
    (seed, its name; ``paired_name``), so the layers two variants share (stem, head, the 3x3 kernel of the plain
    conv and of RepConv's dense branch) start identical for one seed, whatever else either variant builds. A
    parameter the model changed after its constructor drew it is kept as the model set it. The init scheme then
    draws from a generator seeded by the seed alone. All of it runs on a fork of torch's global generator, which
    is left as ``seed_everything`` set it: building another model never shifts what is drawn later.
    """
    built: dict[int, dict[str, Any]] = {}
    with torch.random.fork_rng(devices=[]):
        with _record_layers_as_built(built):
            model = build()
        for name, module in model.named_modules():
            if id(module) not in built:
                continue
            parameters = dict(module.named_parameters(recurse=False))
            kept = {
                key: p.detach().clone() for key, p in parameters.items() if not torch.equal(p, built[id(module)][key])
            }
            torch.random.default_generator.manual_seed(layer_seed(seed, paired_name(name)))
            module.reset_parameters()
            with torch.no_grad():
                for key, value in kept.items():
                    parameters[key].copy_(value)
        torch.random.default_generator.manual_seed(layer_seed(seed, "init"))
        init(model)
    return model

"""A one-minute demonstration of the promise repablate stands on: a stack of RepConv blocks, fused into one
conv each, computes the same function. ``python -m repablate.demo``."""

from __future__ import annotations

import argparse

import torch
from torch import nn

from repablate.nn import RepConv, equivalence_error, is_deployed, reparameterize


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (buffers such as BN running statistics excluded)."""
    return sum(p.numel() for p in model.parameters())


def randomize_batch_norms(model: nn.Module, generator: torch.Generator) -> None:
    """Give every BN non-trivial statistics and affine parameters, as after training."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            n = module.num_features
            module.running_mean.copy_(torch.randn(n, generator=generator))
            module.running_var.copy_(torch.rand(n, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(n, generator=generator) + 0.5)
            module.bias.data.copy_(torch.randn(n, generator=generator))


def main(argv: list[str] | None = None) -> None:
    """Build, fuse and check a small RepConv stack, then print the error and both parameter counts."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    layers = [RepConv(3, args.channels, s=2)]
    layers += [RepConv(args.channels, args.channels) for _ in range(args.depth - 1)]
    model = nn.Sequential(*layers)
    with torch.no_grad():
        randomize_batch_norms(model, generator)
    deployed = reparameterize(model)
    inputs = torch.randn(4, 3, 32, 32, generator=generator)
    error = equivalence_error(model, deployed, inputs)
    print(f"RepConv stack: 3 -> {args.channels} channels, {args.depth} blocks, input {tuple(inputs.shape)}")
    print(f"training form: {count_parameters(model):,} parameters, deployed: {is_deployed(model)}")
    print(f"deploy form:   {count_parameters(deployed):,} parameters, deployed: {is_deployed(deployed)}")
    print(f"equivalence:   max abs error {error.max_abs:.3e}, max rel error {error.max_rel:.3e} (float32)")


if __name__ == "__main__":
    main()

"""Parameters and FLOPs of YOLOv7-tiny's rows, trained and deployed, at the article's setting (80 classes,
640x640, batch 1) -- the size columns of the article's table, counted rather than copied.

    python benchmarks/detect_sizes.py [--classes 80] [--size 640] [--latency --threads 2 --rounds 10]

FLOPs from torch.utils.flop_counter on the meta device (2 FLOPs per multiply-add; convolutions only, as thop).
With --latency, also the median latency (ms, batch 1, float32, CPU) of each row's two forms, measured together
by repablate.bench.measure_forms.
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.flop_counter import FlopCounterMode

from repablate.models.yolov7_tiny import CONV3X3_CHOICES, YOLOv7Tiny
from repablate.nn import reparameterize


def size_of(model: torch.nn.Module, image_size: int) -> tuple[int, int]:
    """(parameters, FLOPs of one forward at image_size x image_size)."""
    params = sum(p.numel() for p in model.parameters())
    model = model.to("meta").eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    return params, counter.get_total_flops()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", type=int, default=80)
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--latency", action="store_true", help="also time both forms (slow on a CPU)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="interleaved timing rounds per pair of forms")
    args = parser.parse_args()
    latency_heading = " train ms | deployed ms |" if args.latency else ""
    print(f"| row (conv3x3) | train params | train GFLOPs | deployed params | deployed GFLOPs |{latency_heading}")
    print("|---|---|---|---|---|" + ("---|---|" if args.latency else ""))
    for variant in CONV3X3_CHOICES:
        model = YOLOv7Tiny(nc=args.classes, conv3x3=variant).eval()
        deployed = reparameterize(model)
        cells = ""
        if args.latency:
            from repablate.bench import measure_forms

            example = torch.rand(1, 3, args.size, args.size)
            report = measure_forms(model, deployed, example, threads=args.threads, rounds=args.rounds).as_dict()
            cells = f" {report['train_form/latency_ms']:.1f} | {report['deploy_form/latency_ms']:.1f} |"
        train_params, train_flops = size_of(model, args.size)
        deploy_params, deploy_flops = size_of(deployed, args.size)
        print(
            f"| {variant} | {train_params:,} | {train_flops / 1e9:.2f} | {deploy_params:,} | "
            f"{deploy_flops / 1e9:.2f} |{cells}"
        )
    print(
        f"\n{args.classes} classes, {args.size}x{args.size}, batch 1"
        + (f", {args.threads} threads, median of {args.rounds} rounds" if args.latency else "")
    )


if __name__ == "__main__":
    main()

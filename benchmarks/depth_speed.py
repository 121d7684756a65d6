"""Training speed on the depth benchmark: the harness against a bare PyTorch loop, on one thread and on two.

    python benchmarks/depth_speed.py [--rounds 3] [--epochs 2] [--variant repconv] [--threads 1 2]
        [--workload NAME=OVERRIDES ...]

Workloads (default): ``deep_shapes`` (+experiment=deep_shapes: the depth sweep's deepest cell, 20 blocks at half
width on 3x32x32 shapes), ``deep_shapes_w1`` (the same at full width) and ``digits`` (the default job). Each is
trained, in every round and for every thread count, once through the harness and once in the bare loop of
benchmarks/bare_loop.py (same model, data order, optimizer and schedule; validation excluded); workloads and
thread counts interleaved, harness and bare loop taking turns to go first, so that a busy spell of a shared
machine hits all of them. Per cell: images/s of the median epoch by wall clock and by this process's CPU time
(all its threads), the harness / bare ratio, and the load average (1 minute) over the cell's epochs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from bare_loop import bare_images_per_s, compose_run, harness_images_per_s

WORKLOADS = {
    "deep_shapes": "+experiment=deep_shapes",
    "deep_shapes_w1": "+experiment=deep_shapes model.width_multiplier=1.0",
    "digits": "",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="repconv")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument(
        "--workload",
        nargs="+",
        metavar="NAME[=OVERRIDES]",
        default=list(WORKLOADS),
        help="a named workload, or NAME='override override ...'",
    )
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    workloads = {}
    for item in args.workload:
        name, _, overrides = item.partition("=")
        workloads[name] = (overrides if overrides else WORKLOADS[name]).split()
    epochs = defaultdict(list)  # (workload, threads, loop) -> [(wall images/s, cpu images/s), ...]
    loads = defaultdict(list)
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for name, overrides in workloads.items():
                for threads in args.threads:
                    run = [f"+variant={args.variant}", f"trainer.max_epochs={args.epochs}", f"threads={threads}"]
                    cfg = compose_run([*overrides, *run], Path(tmp) / f"{name}_t{threads}_r{round_}")
                    loads[name, threads].append(os.getloadavg()[0])
                    loops = (("harness", harness_images_per_s), ("bare", bare_images_per_s))
                    for loop, train in loops[:: 1 if round_ % 2 == 0 else -1]:  # who goes first alternates
                        epochs[name, threads, loop] += train(cfg)
                    loads[name, threads].append(os.getloadavg()[0])
                    print(f"round {round_} {name} threads={threads} done", flush=True)
    print(
        f"\nvariant={args.variant} epochs={args.epochs} rounds={args.rounds} torch={torch.__version__} "
        f"machine={platform.machine()} cpus={os.cpu_count()}\n"
    )
    print("| workload | threads | harness img/s wall (CPU) | bare loop img/s wall (CPU) | harness / bare | load avg |")
    print("|---|---:|---|---|---:|---|")
    for name in workloads:
        for threads in args.threads:
            h = epochs[name, threads, "harness"]
            b = epochs[name, threads, "bare"]
            hw, hc = statistics.median(e[0] for e in h), statistics.median(e[1] for e in h)
            bw, bc = statistics.median(e[0] for e in b), statistics.median(e[1] for e in b)
            load = loads[name, threads]
            print(
                f"| {name} | {threads} | {hw:,.0f} ({hc:,.0f}) | {bw:,.0f} ({bc:,.0f}) | {hw / bw:.3f} "
                f"| {min(load):.1f}-{max(load):.1f} |"
            )


if __name__ == "__main__":
    main()

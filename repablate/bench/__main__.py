"""``python -m repablate.bench``: the article's table (FLOPs, memory access, latency; multi-branch vs single conv)
measured over a grid of channel widths and resolutions and for whole networks, with a deployed RepConv beside a
plain conv of the same shape, and each deployed network in PyTorch eager beside inference engines running its ONNX
graph (ONNX Runtime; OpenVINO, CUDA and TensorRT providers where present). Markdown to stdout, CSV with ``--out``.
"""

from __future__ import annotations

import argparse
import csv
import io
import sys
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from repablate.bench import grid
from repablate.bench.engines import ENGINES, EngineReport, markdown_engines, measure_engines
from repablate.bench.forms import describe_machine, resolve_device, resolve_dtype
from repablate.nn import Conv, reparameterize
from repablate.results import write_atomically

QUICK = {
    "widths": [8, 16],
    "resolutions": [8, 16],
    "model_resolutions": [32],
    "rounds": 1,
    "min_run_time": 0.01,
    "warmup": 1,
    "engines": ["onnxruntime"],
}
FULL = {
    "widths": [16, 32, 64, 128, 256],
    "resolutions": [14, 28, 56],
    "model_resolutions": [64, 224],
    "rounds": 20,
    "min_run_time": 0.05,
    "warmup": 10,
    "engines": list(ENGINES),
}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; the grid defaults come from the full mode, or the quick mode with --quick."""
    parser = argparse.ArgumentParser(prog="python -m repablate.bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tiny grid in seconds (tests, smoke checks)")
    parser.add_argument("--widths", type=int, nargs="+", help="channel widths C of the C->C blocks")
    parser.add_argument("--resolutions", type=int, nargs="+", help="input heights = widths of the blocks")
    parser.add_argument("--model-resolutions", type=int, nargs="+", help="image sizes for the whole networks")
    parser.add_argument("--no-models", action="store_true", help="blocks only")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="CPU threads while timing (default: torch's)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="float32", help="float32, bfloat16, float16, ...")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="time torch.compile'd models")
    parser.add_argument("--rounds", type=int, help="interleaved timing rounds per case")
    parser.add_argument("--min-run-time", type=float, help="seconds of timed calls per model and round")
    parser.add_argument("--warmup", type=int, help="untimed calls per model before timing")
    parser.add_argument(
        "--engines",
        nargs="+",
        choices=ENGINES,
        help="engines timed beside PyTorch eager on each deployed network's ONNX graph (default: all, skipped where "
        "missing; quick mode: onnxruntime)",
    )
    parser.add_argument("--no-engines", action="store_true", help="no engine comparison")
    parser.add_argument("--out", type=Path, help="write every measured figure to this CSV file")
    args = parser.parse_args(argv)
    for key, value in (QUICK if args.quick else FULL).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key in ("widths", "resolutions", "model_resolutions"):
        if any(v < 1 for v in getattr(args, key)):
            parser.error(f"--{key.replace('_', '-')} {getattr(args, key)} is not allowed: sizes must be positive")
    if args.batch_size < 1:
        parser.error(f"--batch-size {args.batch_size} is not allowed: it must be positive")
    return args


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    """All rows (the union of their keys as columns) to ``path``, written atomically."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_atomically(path, text.getvalue())


def network_cases(resolution: int, batch_size: int, quick: bool) -> list[grid.Case]:
    """The minimal stack, and in full mode RepVGG-A0 (train form vs the same net of plain convs) if available."""
    cases = [grid.stack_case(resolution, batch_size)]
    if quick:
        return cases
    try:  # the CLI may look sideways at repablate.models; the library in repablate.bench does not
        from repablate.models import repvgg_a0
    except ImportError:
        return cases
    plain = repvgg_a0(block=partial(Conv, k=3, act=nn.ReLU()))
    image = torch.randn(batch_size, 3, resolution, resolution)
    cases.append(grid.Case("model", f"repvgg_a0_r{resolution}", repvgg_a0(), plain, image, resolution=resolution))
    return cases


def engine_report(case: grid.Case, threads: int, args: argparse.Namespace) -> EngineReport:
    """The deployed network of ``case`` in PyTorch eager (CPU, float32) and in ``args.engines`` on its ONNX graph,
    interleaved with the grid's timing settings."""
    from repablate.export import export_onnx  # the CLI may look sideways; the library in repablate.bench does not

    deployed = reparameterize(case.train)
    return measure_engines(
        deployed,
        export_onnx(deployed, case.example_input),
        case.example_input,
        engines=args.engines,
        threads=threads,
        warmup=args.warmup,
        min_run_time=args.min_run_time,
        rounds=args.rounds,
    )


def print_report(args, argv, device, dtype, threads, block_rows, model_rows, overheads, engines) -> None:
    """The markdown report: settings and method, the block grid with the article's claims, networks, overhead."""
    print("# repablate.bench\n")
    print(
        f"- machine: {describe_machine(device)}; device {device}; {threads} thread(s); {str(dtype)[6:]}; "
        f"batch {args.batch_size}; channels_last {args.channels_last}; compile {args.compile}; "
        f"torch {torch.__version__}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC"
    )
    print(f"- command: python -m repablate.bench {' '.join(argv if argv is not None else sys.argv[1:])}")
    print(
        "- FLOPs: torch.utils.flop_counter, 2 per multiply-add, convolutions and matmuls only; memory: analytic "
        "estimate (bytes of every aten op's tensor inputs and outputs); latency: median (IQR) in ms over "
        f"{args.rounds} interleaved round(s) of torch.utils.benchmark blocks\n"
    )
    print("## Blocks: RepConv(C, C) with identity, training form vs deployed vs plain Conv(C, C, 3) folded\n")
    print(grid.markdown_rows(block_rows) + "\n")
    print(grid.markdown_summary(block_rows) + "\n")
    if model_rows:
        print("## Whole networks: training form vs deployed vs the same network of plain convs\n")
        print(grid.markdown_rows(model_rows) + "\n")
    if engines:
        print(
            "## Engines: each deployed network in PyTorch eager vs inference engines on its ONNX graph (float32, "
            f"{threads} thread(s) in every engine, interleaved)\n"
        )
        print(markdown_engines(engines) + "\n")
    elif model_rows and not args.no_engines:
        print("## Engines: not measured (the engines run float32 graphs beside eager on the CPU, without --compile)\n")
    print("## Harness overhead: measure_latency vs a hand-written torch.utils.benchmark.Timer loop\n")
    print("| case | harness ms | hand-written ms | harness / hand-written - 1 (median of per-round ratios) |")
    print("|---|---:|---:|---:|")
    for check in overheads:
        print(
            f"| {check['case']} | {check['harness_ms']:.4g} | {check['hand_written_ms']:.4g} | "
            f"{check['overhead']:+.2%} |"
        )


def main(argv: list[str] | None = None) -> int:
    """Run the grid, print markdown, optionally write CSV. Returns the exit status."""
    args = parse_args(argv)
    try:
        device, dtype = resolve_device(args.device), resolve_dtype(args.dtype)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    threads = args.threads if args.threads is not None else torch.get_num_threads()
    settings = {
        "device": device,
        "dtype": dtype,
        "channels_last": args.channels_last,
        "compile": args.compile,
        "threads": threads,
        "warmup": args.warmup,
        "min_run_time": args.min_run_time,
        "rounds": args.rounds,
    }
    torch.manual_seed(0)
    block_rows = [
        grid.run_case(grid.block_case(width, resolution, args.batch_size), **settings)
        for width in args.widths
        for resolution in args.resolutions
    ]
    cases = (
        []
        if args.no_models
        else [
            case
            for resolution in args.model_resolutions
            for case in network_cases(resolution, args.batch_size, args.quick)
        ]
    )
    model_rows = [grid.run_case(case, **settings) for case in cases]
    # Engines run the float32 graph on the CPU (GPU providers where present): beside eager on the CPU only.
    engines = []
    if not args.no_engines and device.type == "cpu" and dtype == torch.float32 and not args.compile:
        for case, row in zip(cases, model_rows, strict=True):
            report = engine_report(case, threads, args)
            row.update(report.as_dict())
            engines.append((case.name, report))
    # Where a harness's own cost would show most (the smallest case) and where it matters least (the largest).
    sizes = dict.fromkeys([(min(args.widths), min(args.resolutions)), (max(args.widths), max(args.resolutions))])
    overheads = [
        grid.overhead_check(
            width, resolution, threads=threads, device=device, min_run_time=args.min_run_time, rounds=args.rounds
        )
        for width, resolution in sizes
    ]
    print_report(args, argv, device, dtype, threads, block_rows, model_rows, overheads, engines)
    if args.out:
        write_csv(block_rows + model_rows, args.out)
        print(f"\nCSV: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

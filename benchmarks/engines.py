"""Deployed networks in PyTorch eager beside ONNX Runtime FP32, ONNX Runtime INT8 and OpenVINO (where installed).

    python benchmarks/engines.py [--threads 1] [--rounds 10] [--cases small repvgg_a0_b1 ...] [--out engines.csv]

Cases (the performance bar of docs/BENCHMARKS.md): small at 8x8 with 1 channel, batch 32; RepVGG-A0 at 224, batch
1 and 8; YOLOv7-tiny (RepConv 3x3 blocks) at 320, batch 1. Each network is built in its training form with
non-trivial BN statistics, fused (repablate.nn.reparameterize), exported (repablate.export.export_onnx), checked
against eager, quantized (repablate.export.quantize_int8, calibrated on --calibration-batches synthetic N(0, 1)
batches: latency only, not accuracy) and timed with repablate.bench.measure_engines: every engine on the same
input, the same thread count, interleaved round by round. Prints the machine, load, a markdown table and the bar's
verdicts; --out writes every figure as CSV (atomically).
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import platform
from datetime import datetime, timezone
from pathlib import Path

import onnxruntime
import torch
from torch import nn

from repablate.bench.engines import ENGINES, INT8, measure_engines
from repablate.bench.forms import describe_machine
from repablate.export import export_onnx, quantize_int8
from repablate.models import YOLOv7Tiny, repvgg_a0, small
from repablate.nn import reparameterize
from repablate.results import write_atomically

BAR = 1.10  # ONNX Runtime FP32 may be at most 10% slower than eager
CASES = {  # name -> (model factory, input shape)
    "small_8x8_b32": (lambda: small(), (32, 1, 8, 8)),
    "repvgg_a0_224_b1": (lambda: repvgg_a0(), (1, 3, 224, 224)),
    "repvgg_a0_224_b8": (lambda: repvgg_a0(), (8, 3, 224, 224)),
    "yolov7_tiny_320_b1": (lambda: YOLOv7Tiny(nc=80, conv3x3="repconv"), (1, 3, 320, 320)),
}


def trained_looking(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics and affine parameters as after training, so that the fused kernels are not trivial."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5, generator=generator)
                module.running_var.uniform_(0.5, 2, generator=generator)
                module.weight.uniform_(0.5, 1.5, generator=generator)
                module.bias.uniform_(-0.2, 0.2, generator=generator)
    return model


def cpu_flags() -> str:
    """The SIMD flags that decide INT8 kernels: AVX2, AVX-512 (F, BW, VL), VNNI (AVX-512 or AVX), BF16, AMX."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = next(line.split(":", 1)[1].split() for line in cpuinfo if line.startswith("flags"))
    except (OSError, StopIteration):
        return "unknown"
    wanted = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8")
    return ", ".join(f"{flag} {'yes' if flag in flags else 'no'}" for flag in wanted)


def run_case(name: str, args: argparse.Namespace) -> dict:
    factory, shape = CASES[name]
    torch.manual_seed(0)
    deployed = reparameterize(trained_looking(factory()))
    x = torch.randn(shape)
    fp32 = export_onnx(deployed, x)
    calibration = [torch.randn(shape) for _ in range(args.calibration_batches)]
    int8 = quantize_int8(fp32, calibration, num_batches=args.calibration_batches)
    report = measure_engines(
        deployed,
        fp32,
        x,
        engines=args.engines,
        int8_model=int8,
        threads=args.threads,
        warmup=args.warmup,
        min_run_time=args.min_run_time,
        rounds=args.rounds,
    )
    row = {"case": name, "input": "x".join(map(str, shape)), **report.as_dict()}
    row["ratio/ort_vs_eager"] = report.latency_vs("onnxruntime")
    row["ratio/int8_vs_fp32"] = report.latency_vs(INT8, "onnxruntime")
    row["report"] = report
    return row


def markdown(rows: list[dict]) -> str:
    engines = [
        name for name in ("torch", "onnxruntime", INT8, *ENGINES) if any(name in r["report"].latencies for r in rows)
    ]
    engines = list(dict.fromkeys(engines))
    header = "| case | input | " + " | ".join(f"{name} ms (IQR)" for name in engines)
    header += " | ORT FP32 / eager | INT8 / FP32 | ORT FP32 max rel error | INT8 max rel error |"
    lines = [header, "|---|---|" + "---|" * len(engines) + "---:|---:|---:|---:|"]
    for row in rows:
        report = row["report"]
        cells = [
            f"{report.latencies[name].median_ms:.4g} ({report.latencies[name].iqr_ms:.2g})"
            if name in report.latencies
            else "-"
            for name in engines
        ]
        lines.append(
            f"| {row['case']} | {row['input']} | {' | '.join(cells)} | {row['ratio/ort_vs_eager']:.3f} | "
            f"{row['ratio/int8_vs_fp32']:.3f} | {report.errors['onnxruntime']:.2g} | {report.errors[INT8]:.2g} |"
        )
    return "\n".join(lines)


def write_csv(rows: list[dict], path: Path) -> None:
    records = [{key: value for key, value in row.items() if key != "report"} for row in rows]
    columns = list(dict.fromkeys(key for record in records for key in record))
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(records)
    write_atomically(path, text.getvalue())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", choices=list(CASES), default=list(CASES))
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--engines", nargs="+", choices=ENGINES, default=list(ENGINES))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--min-run-time", type=float, default=0.2)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--calibration-batches", type=int, default=4)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    started = datetime.now(timezone.utc)
    load = os.getloadavg()
    rows = [run_case(name, args) for name in args.cases]
    print(
        f"- machine: {describe_machine(torch.device('cpu'))}, {platform.machine()}; {cpu_flags()}\n"
        f"- torch {torch.__version__}, onnxruntime {onnxruntime.__version__}; {args.threads} thread(s) in every "
        f"engine; {args.rounds} interleaved rounds of {args.min_run_time} s, {args.warmup} warm-up calls\n"
        f"- load average at start {load[0]:.2f}, at end {os.getloadavg()[0]:.2f}; "
        f"{started:%Y-%m-%d %H:%M} UTC, {(datetime.now(timezone.utc) - started).total_seconds():.0f} s\n"
    )
    print(markdown(rows) + "\n")
    for row in rows:
        ratio = row["ratio/ort_vs_eager"]
        verdict = "met" if ratio <= BAR else "NOT met"
        print(f"- {row['case']}: ONNX Runtime FP32 / eager = {ratio:.3f} (bar <= {BAR}): {verdict}")
    skipped = {name: reason for row in rows for name, reason in row["report"].skipped.items()}
    if skipped:
        print("- skipped: " + "; ".join(f"{name} ({reason})" for name, reason in skipped.items()))
    if args.out:
        write_csv(rows, args.out)
        print(f"\nCSV: {args.out}")


if __name__ == "__main__":
    main()

"""The GPU benchmark, one command: latency of the training form against the deployed form, training throughput,
and GPU memory, written as a markdown section for docs/BENCHMARKS.md.

    python benchmarks/gpu.py [--out gpu.md]          # on a CUDA machine; sized for about 5 minutes on one H200
    python benchmarks/gpu.py --device cpu --quick    # the same code path on a CPU, tiny sizes (CI, smoke checks)

Without CUDA (and without --device cpu) it prints one line and exits 0. Parts, top to bottom:

(a) Latency, eager PyTorch, float32, eval mode, no grad (repablate.bench: torch.utils.benchmark blocks, forms
    interleaved round by round, median and IQR): the block grid (RepConv(C, C) in training form, deployed, and a
    plain Conv(C, C, 3) with its BN folded), RepVGG-A0, YOLOv7-tiny (RepConv 3x3 blocks) and RepVGG-B0 (RepVGG's
    own anchor: the paper reports the training-time RepVGG-B0 1.71x slower than the deployed one on a GPU). Then
    the deployed and the training form of some networks exported to ONNX (repablate.export.export_onnx) and run
    in ONNX Runtime's CUDA and TensorRT execution providers beside eager, each skipped with its reason where this
    machine lacks it. With --device cpu the CPU provider runs instead, and is labelled as such.
(b) Training throughput (images/s) of the default job (digits) and of data=shapes, through the main job's own
    assembly (benchmarks/bare_loop.py's compose_run and EpochThroughput; repablate.train.main.assemble, then
    trainer.fit), in fp32, bf16-mixed, channels_last and compile.
(c) GPU memory: torch.cuda.max_memory_allocated, its peak reset before every measurement. For latency it is the
    forward's activations and workspace above the resident weights and input; for training, the whole fit's peak.

Progress lines go to stderr; the markdown goes to --out (rewritten after each part, so a run cut short keeps
what it measured) or, without --out, to stdout at the end. A measurement that fails is recorded with its error
and the run goes on: a GPU session is one try.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path

import lightning
import numpy as np
import onnxruntime
import torch
from bare_loop import EpochThroughput, compose_run
from engines import trained_looking
from torch import nn

import repablate.models
from repablate.bench import grid
from repablate.bench.engines import (
    ORT_PROVIDERS,
    EngineUnavailable,
    max_rel_error,
    ort_session,
    output_leaves,
    paired_ratio,
)
from repablate.bench.forms import describe_machine, measure_models
from repablate.bench.latency import measure_latencies
from repablate.export import export_onnx
from repablate.models import YOLOv7Tiny, repvgg_a0
from repablate.nn import RepConv, reparameterize
from repablate.results import write_atomically
from repablate.train.callbacks import TrainingThroughput
from repablate.train.main import assemble, git_commit

STARTED = time.perf_counter()
MIB = 2**20
# RepVGG (Ding et al., CVPR 2021): the training-time RepVGG-B0 runs 1.71x slower than its deployed form on a GPU.
REPVGG_PAPER_B0_RATIO = 1.71

# Sizes of a run. "cuda": the default GPU run (sized for about 5 minutes on an H200, not yet timed on one);
# "quick": seconds-scale, for CI on a CPU.
SIZES = {
    "cuda": {
        "widths": (16, 32, 64, 128, 256),
        "resolutions": (14, 28, 56),
        "block_batch": 32,
        "image": {"repvgg": 224, "yolo": 640},
        "networks": (("repvgg_a0", 1), ("repvgg_a0", 32), ("yolov7_tiny", 1), ("yolov7_tiny", 32), ("repvgg_b0", 128)),
        "engine_cases": (("repvgg_a0", 1), ("yolov7_tiny", 1)),
        "rounds": 5,
        "min_run_time": 0.05,
        "warmup": 10,
        "epochs": {"digits": 10, "shapes": 3},  # digits: the default job's 10 epochs
        "train_overrides": (),
    },
    "quick": {
        "widths": (8, 16),
        "resolutions": (8, 16),
        "block_batch": 1,
        "image": {"repvgg": 32, "yolo": 64},
        "networks": (("repvgg_a0", 1), ("yolov7_tiny", 1), ("repvgg_b0", 2)),
        "engine_cases": (("repconv_stack", 1),),  # exports in seconds; the networks' own export takes longer
        "rounds": 2,
        "min_run_time": 0.01,
        "warmup": 1,
        "epochs": {"digits": 1, "shapes": 1},
        "train_overrides": ("trainer.limit_train_batches=4",),
    },
}
WORKLOADS = {  # name -> Hydra overrides of the main job
    "digits": (),
    "shapes": ("data=shapes",),
}
QUICK_DATA = {"shapes": ("data.train_size=256", "data.val_size=64", "data.test_size=64")}
MODES = {  # name -> the overrides of the mode
    "fp32": (),
    "bf16-mixed": ("trainer.precision=bf16-mixed",),
    "channels_last": ("channels_last=true",),
    "compile": ("compile=true",),
}


def log(message: str) -> None:
    """A progress line on stderr, with the seconds since the start."""
    print(f"[gpu.py {time.perf_counter() - STARTED:6.1f} s] {message}", file=sys.stderr, flush=True)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:N, or cpu to check the code path")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few iterations (CI)")
    parser.add_argument("--out", type=Path, help="write the markdown here (default: print it to stdout)")
    parser.add_argument(
        "--parts", nargs="+", choices=("latency", "engines", "training"), help="measure only these (default: all)"
    )
    parser.add_argument("--engine-budget-s", type=float, default=120, help="engine cases start only within this")
    return parser.parse_args()


# --- the machine -------------------------------------------------------------------------------------------------


def driver_version() -> str:
    """The NVIDIA driver version from nvidia-smi, or why it is unknown."""
    if shutil.which("nvidia-smi") is None:
        return "unknown (no nvidia-smi)"
    try:
        query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
        return subprocess.run(query, capture_output=True, text=True, timeout=20, check=True).stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return "unknown (nvidia-smi failed)"


def machine_lines(device: torch.device) -> list[str]:
    """What every figure was measured on: GPU, driver, CUDA, cuDNN, libraries, CPU, time and commit."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        gpu = (
            f"{props.name} ({props.total_memory / 2**30:.0f} GiB, compute capability {props.major}.{props.minor}), "
            f"driver {driver_version()}, CUDA {torch.version.cuda} (torch's), cuDNN {torch.backends.cudnn.version()}"
        )
    else:
        gpu = "none: measured on the CPU (--device cpu), so no figure below is a GPU figure"
    return [
        f"- GPU: {gpu}",
        f"- CPU: {describe_machine(torch.device('cpu'))}, {platform.machine()}; "
        f"torch threads {torch.get_num_threads()}",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, "
        f"Lightning {lightning.__version__}, onnxruntime {onnxruntime.__version__} "
        f"(providers: {', '.join(onnxruntime.get_available_providers())})",
        f"- settings: float32 latency; cudnn.benchmark {torch.backends.cudnn.benchmark}; TF32 in convolutions "
        f"{torch.backends.cudnn.allow_tf32}, in matmuls {torch.backends.cuda.matmul.allow_tf32}",
        f"- {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, commit {git_commit(Path(__file__).parent) or 'unknown'}",
    ]


# --- (a) latency: blocks and networks ----------------------------------------------------------------------------


def timing(sizes: dict, device: torch.device) -> dict:
    """measure_models's timing keywords for this run."""
    return {
        "device": device,
        "rounds": sizes["rounds"],
        "min_run_time": sizes["min_run_time"],
        "warmup": sizes["warmup"],
    }


def mib(value: float | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f}"


def ms(row: dict, prefix: str) -> str:
    return f"{row[f'{prefix}/latency_ms']:.4g} ({row[f'{prefix}/latency_iqr_ms']:.2g})"


def block_rows(sizes: dict, device: torch.device, notes: list[str]) -> list[dict]:
    """The block grid: per width and resolution, RepConv training form vs deployed vs plain conv (grid.run_case)."""
    rows = []
    for width in sizes["widths"]:
        for resolution in sizes["resolutions"]:
            case = grid.block_case(width, resolution, sizes["block_batch"])
            row = attempt(notes, case.name, grid.run_case, case, **timing(sizes, device))
            if row is not None:
                rows.append(row)
            log(f"block {case.name} done")
    return rows


def blocks_table(rows: list[dict]) -> str:
    lines = [
        "| case | ms train (IQR) | ms deploy (IQR) | ms plain conv (IQR) | train / deploy | deploy / plain, paired | "
        "peak MiB train / deploy / plain |",
        "|---|---|---|---|---:|---:|---|",
    ]
    for row in rows:
        peaks = " / ".join(mib(row.get(f"{form}/peak_mem_bytes")) for form in ("train_form", "deploy_form", "plain"))
        lines.append(
            f"| {row['name']} | {ms(row, 'train_form')} | {ms(row, 'deploy_form')} | {ms(row, 'plain')} | "
            f"{row['ratio/latency_ms']:.3g} | {row['ratio/deploy_vs_plain_latency']:.4g} | {peaks} |"
        )
    return "\n".join(lines)


def build_network(name: str) -> nn.Module | None:
    """A network in its training form with trained-looking BN statistics; None if repablate.models lacks it."""
    torch.manual_seed(0)
    if name == "yolov7_tiny":
        return trained_looking(YOLOv7Tiny(nc=80, conv3x3="repconv"))
    if name == "repconv_stack":  # the article-style minimal network of the block grid
        return trained_looking(grid.repconv_stack(RepConv))
    factory = {"repvgg_a0": repvgg_a0}.get(name, getattr(repablate.models, name, None))
    return None if factory is None else trained_looking(factory())


def network_input(name: str, batch: int, sizes: dict) -> torch.Tensor:
    side = sizes["image"]["yolo" if name.startswith("yolo") else "repvgg"]
    return torch.randn(batch, 3, side, side)


def network_rows(sizes: dict, device: torch.device, notes: list[str]) -> list[dict]:
    """Each network's training form vs its deployed form, eager, measured together (measure_models)."""
    rows = []
    for name, batch in sizes["networks"]:
        train = build_network(name)
        if train is None:
            notes.append(f"{name}: not in repablate.models, not measured")
            continue
        x = network_input(name, batch, sizes)
        models = {"train": train, "deploy": reparameterize(train)}
        result = attempt(notes, f"{name} b{batch}", measure_models, models, x, **timing(sizes, device))
        if result is not None:
            costs, _ = result
            rows.append({"name": name, "input": "x".join(map(str, x.shape)), **costs})
        log(f"network {name} batch {batch} done")
    return rows


def networks_table(rows: list[dict]) -> str:
    lines = [
        "| network | input | params train / deploy | GFLOPs train / deploy | ms train (IQR) | ms deploy (IQR) | "
        "train / deploy | images/s deploy | peak MiB train / deploy |",
        "|---|---|---|---|---|---|---:|---:|---|",
    ]
    for row in rows:
        train, deploy = row["train"], row["deploy"]
        lines.append(
            f"| {row['name']} | {row['input']} | {train.params:,} / {deploy.params:,} | "
            f"{train.flops / 1e9:.3g} / {deploy.flops / 1e9:.3g} | "
            f"{train.latency.median_ms:.4g} ({train.latency.iqr_ms:.2g}) | "
            f"{deploy.latency.median_ms:.4g} ({deploy.latency.iqr_ms:.2g}) | "
            f"{paired_ratio(train.latency, deploy.latency):.3g} | "
            f"{deploy.batch_size / (deploy.latency.median_ms / 1e3):,.0f} | "
            f"{mib(train.latency.peak_mem_bytes)} / {mib(deploy.latency.peak_mem_bytes)} |"
        )
    return "\n".join(lines)


def anchor_table(rows: list[dict], device: torch.device) -> str:
    """RepVGG's own figure beside the RepVGG-B0 ratio measured here."""
    lines = ["| RepVGG-B0, training form / deployed form latency | ratio |", "|---|---:|"]
    lines.append(f"| RepVGG paper (Ding et al., CVPR 2021), on a GPU | {REPVGG_PAPER_B0_RATIO}x |")
    for row in rows:
        if row["name"] == "repvgg_b0":
            ratio = paired_ratio(row["train"].latency, row["deploy"].latency)
            lines.append(f"| measured here: eager, {device.type}, float32, input {row['input']} | {ratio:.3g}x |")
    if len(lines) == 3:
        lines.append("| measured here | not measured (see the notes) |")
    return "\n".join(lines)


# --- (a) latency: engines ----------------------------------------------------------------------------------------


def ort_call(graph, x: torch.Tensor, engine: str):
    """(run, fetch) for ``graph`` in ONNX Runtime's ``engine`` provider on ``x``: ``run(*_)`` one inference (on a
    GPU through I/O binding, input and outputs on the device: no host copies timed), ``fetch()`` one inference's
    outputs as arrays. Raises EngineUnavailable when the provider is missing or fails to load."""
    session = ort_session(graph, threads=torch.get_num_threads(), engine=engine)
    name = session.get_inputs()[0].name
    if x.device.type == "cpu":
        feed = {name: x.numpy()}
        return (lambda *_: session.run(None, feed)), (lambda: session.run(None, feed))
    index = x.device.index or 0
    binding = session.io_binding()
    binding.bind_input(name, "cuda", index, np.float32, list(x.shape), x.data_ptr())
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda", index)

    def fetch():
        session.run_with_iobinding(binding)
        return binding.copy_outputs_to_cpu()

    return (lambda *_: session.run_with_iobinding(binding)), fetch


def engines_for(device: torch.device) -> tuple[list[str], dict[str, str]]:
    """The ONNX Runtime engines of this run (GPU providers on CUDA, the CPU provider on a CPU) that this build has,
    and the others with the reason they are skipped."""
    wanted = ("onnxruntime-cuda", "onnxruntime-tensorrt") if device.type == "cuda" else ("onnxruntime",)
    available = onnxruntime.get_available_providers()
    here = [engine for engine in wanted if ORT_PROVIDERS[engine] in available]
    skipped = {
        engine: f"{ORT_PROVIDERS[engine]} is not in this onnxruntime build (it has {', '.join(available)})"
        for engine in wanted
        if engine not in here
    }
    return here, skipped


def engine_report(name: str, batch: int, sizes: dict, device: torch.device, engines: list[str]) -> dict:
    """Both forms of one network, eager and in each of ``engines``, timed together on one input."""
    train = build_network(name).to(device).eval()
    deploy = reparameterize(train)
    x_cpu = network_input(name, batch, sizes)
    x = x_cpu.to(device).contiguous()
    forms = {"train": train, "deploy": deploy}
    with torch.no_grad():
        expected = {form: output_leaves(model(x)) for form, model in forms.items()}
    calls = {f"torch/{form}": model for form, model in forms.items()}
    errors, skipped = {}, {}
    graphs = {form: export_onnx(model, x_cpu) for form, model in forms.items()}
    for engine in engines:
        try:
            runs = {}
            for form, graph in graphs.items():
                run, fetch = ort_call(graph, x, engine)
                errors[engine, form] = max_rel_error(expected[form], fetch())
                runs[f"{engine}/{form}"] = run
            calls.update(runs)  # both forms, or neither
        except EngineUnavailable as reason:
            skipped[engine] = str(reason)
        except Exception as error:  # noqa: BLE001 -- a provider that loads but fails (e.g. TensorRT's build)
            traceback.print_exc(file=sys.stderr)
            skipped[engine] = f"failed: {type(error).__name__}: {str(error)[:300]}"
    latencies = measure_latencies(
        calls, (x,), warmup=sizes["warmup"], min_run_time=sizes["min_run_time"], rounds=sizes["rounds"]
    )
    return {
        "name": name,
        "input": "x".join(map(str, x.shape)),
        "latencies": latencies,
        "errors": errors,
        "skipped": skipped,
    }


def engine_reports(sizes: dict, device: torch.device, budget_s: float, notes: list[str]) -> tuple[list, dict]:
    """An engine report per engine case while the budget lasts; and the engines skipped, with why. Nothing is
    exported when no engine of the run is installed (eager latency is in the networks table)."""
    engines, skipped = engines_for(device)
    start, reports = time.perf_counter(), []
    for name, batch in sizes["engine_cases"] if engines else ():
        if time.perf_counter() - start > budget_s:
            notes.append(f"engines, {name} b{batch}: not started, the engine budget ({budget_s:.0f} s) was spent")
            continue
        report = attempt(notes, f"engines, {name} b{batch}", engine_report, name, batch, sizes, device, engines)
        if report is not None:
            reports.append(report)
            skipped.update(report["skipped"])
        log(f"engines {name} batch {batch} done")
    return reports, skipped


def engines_table(reports: list[dict], skipped: dict[str, str], device: torch.device) -> str:
    lines = [
        "| network | input | engine (provider) | device | ms train (IQR) | ms deploy (IQR) | train / deploy, paired | "
        "deploy / eager deploy, paired | max rel error vs eager train / deploy |",
        "|---|---|---|---|---|---|---:|---:|---|",
    ]
    for report in reports:
        lat, errors = report["latencies"], report["errors"]
        engines = sorted({key.split("/")[0] for key in lat}, key=lambda e: e != "torch")
        for engine in engines:
            train, deploy = lat[f"{engine}/train"], lat[f"{engine}/deploy"]
            label = "torch (eager)" if engine == "torch" else f"{engine} ({ORT_PROVIDERS[engine]})"
            on = "CPU" if engine == "onnxruntime" else device.type.upper()
            error = "-" if engine == "torch" else f"{errors[engine, 'train']:.2g} / {errors[engine, 'deploy']:.2g}"
            lines.append(
                f"| {report['name']} | {report['input']} | {label} | {on} | "
                f"{train.median_ms:.4g} ({train.iqr_ms:.2g}) | {deploy.median_ms:.4g} ({deploy.iqr_ms:.2g}) | "
                f"{paired_ratio(train, deploy):.3g} | "
                f"{paired_ratio(deploy, lat['torch/deploy']):.3g} | {error} |"
            )
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{engine} ({reason})" for engine, reason in skipped.items()) + "."]
    return "\n".join(lines)


# --- (b) training throughput -------------------------------------------------------------------------------------


class SyncedEpochThroughput(EpochThroughput):
    """EpochThroughput whose epochs start and end with the device idle: CUDA runs behind the Python loop, so the
    clock is read after a synchronize at each epoch's start and after its last batch (not after every batch,
    which would stop the host from queueing the next step while the device runs this one)."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        synchronize(pl_module.device)
        super().on_train_epoch_start(trainer, pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            synchronize(pl_module.device)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_once(workload: str, mode: str, sizes: dict, args, device: torch.device, run_dir: Path, cache: dict) -> dict:
    """One fit of the main job's assembly; images/s per epoch (as results.json's train/images_per_s), peak memory.

    The generated data splits are built once per workload and reused by its later modes (the same function of
    the data seed each time; generating shapes takes seconds of one CPU thread, not measured either way).
    """
    overrides = [*WORKLOADS[workload], f"trainer.max_epochs={sizes['epochs'][workload]}", *sizes["train_overrides"]]
    overrides += [*QUICK_DATA.get(workload, ())] if args.quick else []
    overrides += ["trainer.accelerator=gpu" if device.type == "cuda" else "trainer.accelerator=cpu"]
    # Validation is excluded from images/s; skipping it also spares compile a second graph. No wandb: CSV only.
    overrides += ["trainer.limit_val_batches=0", "~logger.wandb", *MODES[mode]]
    cfg = compose_run(overrides, run_dir)
    parts = assemble(cfg)
    if workload in cache and hasattr(parts.datamodule, "splits"):
        parts.datamodule.splits = cache[workload]
    throughput = SyncedEpochThroughput()  # in place of the harness's TrainingThroughput, which it extends
    callbacks = parts.trainer.callbacks
    callbacks[:] = [throughput if isinstance(c, TrainingThroughput) else c for c in callbacks]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    parts.trainer.fit(parts.module, datamodule=parts.datamodule)
    fit_s = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    cache.setdefault(workload, getattr(parts.datamodule, "splits", None))
    wall = [epoch[0] for epoch in throughput.per_epoch]
    return {
        "workload": workload,
        "mode": mode,
        "overrides": " ".join(MODES[mode]) or "(none)",
        "epochs": wall,
        "peak": peak,
        "fit_s": fit_s,
    }


def training_rows(sizes: dict, args, device: torch.device, notes: list[str]) -> tuple[list[dict], dict[str, str]]:
    rows, cache = [], {}
    with tempfile.TemporaryDirectory(prefix="repablate-gpu-") as folder:
        tmp = Path(folder)
        skipped = {}
        if args.quick and device.type == "cpu":
            skipped["compile"] = "not attempted with --quick on a CPU (inductor's C++ build takes minutes)"
        for workload in WORKLOADS:
            for mode in MODES:
                if mode in skipped:
                    continue
                label = f"training {workload} {mode}"
                row = attempt(
                    notes, label, train_once, workload, mode, sizes, args, device, tmp / f"{workload}-{mode}", cache
                )
                if row is not None:
                    rows.append(row)
                gc.collect()
                if mode == "compile":
                    torch._dynamo.reset()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                log(f"{label} done")
    return rows, skipped


def training_table(rows: list[dict], device: torch.device) -> str:
    lines = [
        "| workload | mode | mode's overrides | epochs | images/s, first epoch | images/s, median of later epochs | "
        "peak GPU MiB | fit s |",
        "|---|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        epochs = row["epochs"]
        later = f"{float(np.median(epochs[1:])):,.0f}" if len(epochs) > 1 else "-"
        lines.append(
            f"| {row['workload']} | {row['mode']} | `{row['overrides']}` | {len(epochs)} | {epochs[0]:,.0f} | "
            f"{later} | {mib(row['peak'])} | {row['fit_s']:.1f} |"
        )
    return "\n".join(lines)


# --- running it --------------------------------------------------------------------------------------------------


def attempt(notes: list[str], label: str, function, *args, **kwargs):
    """``function(*args, **kwargs)``, or None with the error noted (and its traceback on stderr)."""
    try:
        return function(*args, **kwargs)
    except Exception as error:  # noqa: BLE001 -- one failed measurement must not end a one-try GPU session
        traceback.print_exc(file=sys.stderr)
        notes.append(
            f"{label}: failed ({type(error).__name__}: {str(error).splitlines()[0][:300] if str(error) else ''})"
        )
        return None


def emit(sections: list[str], args) -> None:
    """The markdown so far: to --out (atomically), else nothing until the end."""
    if args.out is not None:
        write_atomically(args.out, "\n\n".join(sections) + "\n")


def main() -> int:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available: nothing measured (check the code path on a CPU with --device cpu --quick)")
        return 0
    sizes = SIZES["quick" if args.quick else "cuda"]
    parts = args.parts or ["latency", "engines", "training"]
    torch.backends.cudnn.benchmark = device.type == "cuda"  # the fastest algorithms, for both forms alike
    if device.type == "cpu":  # one thread, as the CPU records of docs/BENCHMARKS.md (and no OpenMP barrier stalls)
        torch.set_num_threads(1)
    command = "python benchmarks/gpu.py " + " ".join(sys.argv[1:])
    title = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU stand-in (--device cpu)"
    sections = [f"### GPU: {title}", f"Command: `{command.strip()}`.\n\n" + "\n".join(machine_lines(device))]
    notes: list[str] = []
    log(f"measuring on {title}: {', '.join(parts)}")
    if "latency" in parts:
        rows = block_rows(sizes, device, notes)
        sections += [
            f"#### Blocks: RepConv(C, C) with identity, training form vs deployed vs plain Conv(C, C, 3) folded, "
            f"batch {sizes['block_batch']}, eager\n\n{sizes['rounds']} interleaved rounds of "
            f"{sizes['min_run_time']} s blocks after {sizes['warmup']} warm-up calls; peak: "
            "torch.cuda.max_memory_allocated above the resident weights and input, reset before each timed block.",
            blocks_table(rows),
            grid.markdown_summary(rows),
        ]
        emit(sections, args)
        networks = network_rows(sizes, device, notes)
        sections += [
            "#### Networks: training form vs deployed form, eager, float32",
            networks_table(networks),
            anchor_table(networks, device),
        ]
        emit(sections, args)
    if "engines" in parts:
        reports, skipped = engine_reports(sizes, device, args.engine_budget_s, notes)
        sections += [
            "#### Engines: both forms exported to ONNX (opset 18), beside eager on the same input\n\n"
            "Ratios are medians over rounds of per-round ratios; the error is normwise against eager's outputs. "
            + ("GPU providers get input and outputs bound on the device." if device.type == "cuda" else "CPU run."),
            engines_table(reports, skipped, device)
            if reports
            else "No engine measured. Skipped: " + ("; ".join(f"{e} ({why})" for e, why in skipped.items()) or "-"),
        ]
        emit(sections, args)
    if "training" in parts:
        rows, skipped = training_rows(sizes, args, device, notes)
        text = (
            "#### Training throughput: the main job's assembly (Trainer, default callbacks, CSV logger; no deploy "
            "check, no validation)\n\nimages/s from each epoch's start to its last batch, as results.json's "
            "`train/images_per_s`; the first epoch includes cuDNN's autotuning and, with compile, the compilation."
        )
        sections += [text, training_table(rows, device) if rows else "No training measured (see the notes)."]
        if skipped:
            sections.append("Skipped modes: " + "; ".join(f"{mode} ({why})" for mode, why in skipped.items()) + ".")
        emit(sections, args)
    if notes:
        sections.append("Notes:\n\n" + "\n".join(f"- {note}" for note in notes))
    sections.append(f"Wall time of the run (after the imports): {time.perf_counter() - STARTED:.0f} s.")
    emit(sections, args)
    if args.out is None:
        print("\n\n".join(sections))
    log(f"done{f', markdown in {args.out}' if args.out else ''}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("WANDB_MODE", "disabled")
    sys.exit(main())

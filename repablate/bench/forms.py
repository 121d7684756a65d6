"""One call that measures models (typically a training form and its deployed form) under the same settings.

Every model is measured on a copy moved to the requested device, dtype and memory format, in eval mode and
without gradients: the cost of running it for inference. Counts (params, FLOPs, memory access) are taken in
eager mode; with ``compile=True`` only the latency is measured on the ``torch.compile``d copy.
"""

from __future__ import annotations

import copy
import os
import platform
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from repablate.bench.counting import count_flops, count_params, memory_access
from repablate.bench.latency import Latency, measure_latencies

RATIO_METRICS = ("params", "flops", "mem_bytes", "latency_ms", "throughput", "peak_mem_bytes")


def describe_machine(device: torch.device) -> str:
    """A human-readable name of the device measured on, e.g. 'AMD EPYC (2 cores)' or 'NVIDIA H100 80GB HBM3'."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            name = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} cores)"


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """A floating dtype from a torch.dtype or its name ('float32', 'bfloat16', 'float16', ...)."""
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise ValueError(f"dtype={dtype!r} is not allowed: give a floating torch dtype such as 'float32' or 'bfloat16'")
    return resolved


def resolve_device(device: torch.device | str) -> torch.device:
    """A torch.device that exists on this machine; a clear error for CUDA without a GPU."""
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"device={device!r} is not allowed: give 'cpu', 'cuda' or 'cuda:N'") from error
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} is not available: this machine has no CUDA GPU; use device='cpu'")
    return resolved


@dataclass(frozen=True)
class BenchSettings:
    """What every figure of a report was measured under."""

    batch_size: int
    device: str
    machine: str
    dtype: str
    threads: int
    channels_last: bool
    compile: bool
    torch: str

    def as_dict(self) -> dict[str, Any]:
        """Flat ``bench/<setting>`` entries."""
        return {f"bench/{key}": value for key, value in vars(self).items()}


@dataclass(frozen=True)
class ModelCost:
    """Costs of one model on one batch; ``latency`` is None when latency was not measured."""

    params: int
    flops: int
    mem_bytes: int
    batch_size: int
    latency: Latency | None = None

    def as_dict(self) -> dict[str, float | int]:
        """params, flops, mem_bytes and, when measured, latency_ms, latency_iqr_ms, throughput (images/s) and
        peak_mem_bytes (where the device reports it)."""
        record: dict[str, float | int] = {"params": self.params, "flops": self.flops, "mem_bytes": self.mem_bytes}
        if self.latency is not None:
            record["latency_ms"] = self.latency.median_ms
            record["latency_iqr_ms"] = self.latency.iqr_ms
            record["throughput"] = self.batch_size / (self.latency.median_ms / 1e3)
            if self.latency.peak_mem_bytes is not None:
                record["peak_mem_bytes"] = self.latency.peak_mem_bytes
        return record


@dataclass(frozen=True)
class FormsReport:
    """A training form and a deployed form measured together; ``as_dict()`` is the flat record of the contract."""

    train: ModelCost
    deploy: ModelCost
    settings: BenchSettings

    def as_dict(self) -> dict[str, Any]:
        """``train_form/<metric>``, ``deploy_form/<metric>``, ``ratio/<metric>`` (train / deploy), ``bench/*``."""
        train, deploy = self.train.as_dict(), self.deploy.as_dict()
        record: dict[str, Any] = {f"train_form/{key}": value for key, value in train.items()}
        record.update({f"deploy_form/{key}": value for key, value in deploy.items()})
        for metric in RATIO_METRICS:
            if metric in train and metric in deploy:
                record[f"ratio/{metric}"] = train[metric] / deploy[metric] if deploy[metric] else None
        record.update(self.settings.as_dict())
        return record


def _prepare(model: nn.Module, device: torch.device, dtype: torch.dtype, channels_last: bool) -> nn.Module:
    prepared = copy.deepcopy(model).to(device=device, dtype=dtype).eval()
    return prepared.to(memory_format=torch.channels_last) if channels_last else prepared


def measure_models(
    models: Mapping[str, nn.Module],
    example_input: torch.Tensor,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype | str = torch.float32,
    channels_last: bool = False,
    compile: bool = False,
    threads: int | None = None,
    warmup: int = 10,
    min_run_time: float = 0.2,
    rounds: int = 1,
    latency: bool = True,
) -> tuple[dict[str, ModelCost], BenchSettings]:
    """Measure several models on one batch (``example_input``, first dim = batch size) under one setting.

    Latencies are interleaved over ``rounds`` (see ``measure_latencies``). Returns the costs by name and the
    settings. The models themselves are left untouched (each is measured on a copy).
    """
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise ValueError("example_input must be a batch tensor whose first dimension is the batch size")
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if channels_last and example_input.dim() != 4:
        raise ValueError(f"channels_last=True needs a 4-d NCHW input, not shape {tuple(example_input.shape)}")
    inputs = example_input.to(device=device, dtype=dtype)
    if channels_last:
        inputs = inputs.contiguous(memory_format=torch.channels_last)
    prepared = {name: _prepare(model, device, dtype, channels_last) for name, model in models.items()}
    timings: dict[str, Latency | None] = dict.fromkeys(prepared)
    if latency:
        runners = {name: torch.compile(model) if compile else model for name, model in prepared.items()}
        timings.update(
            measure_latencies(runners, inputs, threads=threads, warmup=warmup, min_run_time=min_run_time, rounds=rounds)
        )
    costs = {
        name: ModelCost(
            params=count_params(model),
            flops=count_flops(model, inputs),
            mem_bytes=memory_access(model, inputs),
            batch_size=inputs.shape[0],
            latency=timings[name],
        )
        for name, model in prepared.items()
    }
    settings = BenchSettings(
        batch_size=inputs.shape[0],
        device=str(device),
        machine=describe_machine(device),
        dtype=str(dtype).removeprefix("torch."),
        threads=threads if threads is not None else torch.get_num_threads(),
        channels_last=channels_last,
        compile=compile,
        torch=torch.__version__,
    )
    return costs, settings


def measure_model(model: nn.Module, example_input: torch.Tensor, **settings: Any) -> dict[str, Any]:
    """Flat record of one model: params, flops, mem_bytes, latency_ms, ... plus ``bench/*``.

    ``settings`` are ``measure_models``'s keywords (device, dtype, channels_last, compile, threads, warmup,
    min_run_time, rounds, latency); an unknown one is a TypeError.
    """
    costs, used = measure_models({"model": model}, example_input, **settings)
    return {**costs["model"].as_dict(), **used.as_dict()}


def measure_forms(
    train_model: nn.Module, deploy_model: nn.Module, example_input: torch.Tensor, **settings: Any
) -> FormsReport:
    """Measure a training-form model and its deployed form together, latencies interleaved.

    ``settings`` are ``measure_models``'s keywords (device, dtype, channels_last, compile, threads, warmup,
    min_run_time, rounds, latency); an unknown one is a TypeError.
    """
    costs, used = measure_models({"train": train_model, "deploy": deploy_model}, example_input, **settings)
    return FormsReport(train=costs["train"], deploy=costs["deploy"], settings=used)

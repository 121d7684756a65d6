"""Engines: a deployed model in PyTorch eager beside inference runtimes running its ONNX graph, timed together.

``measure_engines(model, onnx_model, example_input)`` times PyTorch eager and, on the same input, ONNX Runtime
(CPUExecutionProvider; CUDAExecutionProvider and TensorrtExecutionProvider where this onnxruntime build has them)
and OpenVINO (where it is installed: ``pip install 'repablate[openvino]'``), interleaved round by round with
``measure_latencies``. An engine that this machine lacks is skipped with its reason, never an error. Every
engine's outputs are first compared with eager's (normwise relative error, as ``repablate.nn.equivalence_error``).

Threads are explicit and equal: eager runs under ``torch.utils.benchmark.Timer(num_threads=threads)``; ONNX
Runtime sessions get ``intra_op_num_threads=threads``, ``inter_op_num_threads=1``, sequential execution and all
graph optimizations (ONNX Runtime docs, "Thread management" and "Graph optimizations"); OpenVINO gets
``INFERENCE_NUM_THREADS=threads``, the latency hint and f32 inference precision (so that it cannot pick bf16).

onnxruntime (a core dependency) is imported when first used, so that ``import repablate.bench`` stays cheap.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import math
import os
import statistics
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from repablate.bench.latency import Latency, _check_settings, measure_latencies

EAGER = "torch"  # the baseline every engine is compared with: the model itself, PyTorch eager
# engine -> ONNX Runtime execution provider
ORT_PROVIDERS = {
    "onnxruntime": "CPUExecutionProvider",
    "onnxruntime-cuda": "CUDAExecutionProvider",
    "onnxruntime-tensorrt": "TensorrtExecutionProvider",
}
OPENVINO = "openvino"
ENGINES = (*ORT_PROVIDERS, OPENVINO)
INT8 = "onnxruntime-int8"  # a quantized graph on the CPU provider, when measure_engines is given one

OnnxModel = Any  # an onnx.ModelProto, its serialized bytes, or the path of a .onnx file


class EngineUnavailable(RuntimeError):
    """An engine this machine cannot run (not installed, no such provider, no device); the message says why."""


def onnx_bytes(onnx_model: OnnxModel) -> bytes:
    """The serialized graph of an onnx.ModelProto, bytes, or a .onnx file's path."""
    if isinstance(onnx_model, (bytes, bytearray)):
        return bytes(onnx_model)
    if isinstance(onnx_model, (str, os.PathLike)):
        return Path(onnx_model).read_bytes()
    if callable(getattr(onnx_model, "SerializeToString", None)):
        return onnx_model.SerializeToString()
    raise TypeError(f"an ONNX model is a ModelProto, bytes or a path, not a {type(onnx_model).__name__}")


def output_leaves(output: Any) -> list[torch.Tensor]:
    """The tensors of a model's output (a tensor or nested tuples/lists/dicts of them), in the order the ONNX
    exporter flattens them: depth first, dicts in insertion order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        return [leaf for value in output.values() for leaf in output_leaves(value)]
    if isinstance(output, (list, tuple)):
        return [leaf for item in output for leaf in output_leaves(item)]
    raise TypeError(f"a model output holds a {type(output).__name__}; expected tensors in tuples, lists or dicts")


def max_rel_error(expected: Sequence[Any], actual: Sequence[Any]) -> float:
    """Normwise relative error of ``actual`` against ``expected`` (tensors or arrays, paired in order), as
    ``repablate.nn.equivalence_error``: max |a - b| / max |a| over all outputs, in float64. A NaN or infinity
    anywhere gives ``inf``; so do different counts or shapes of outputs."""
    if len(expected) != len(actual) or not expected:
        return math.inf
    max_abs, scale = 0.0, 0.0
    for a, b in zip(expected, actual, strict=True):
        a64 = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
        b64 = np.asarray(b.detach().cpu() if isinstance(b, torch.Tensor) else b, dtype=np.float64)
        if a64.shape != b64.shape:
            return math.inf
        if not a64.size:
            continue
        if not (np.isfinite(a64).all() and np.isfinite(b64).all()):
            return math.inf
        max_abs = max(max_abs, float(np.abs(a64 - b64).max()))
        scale = max(scale, float(np.abs(a64).max()))
    return max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)


def paired_ratio(latency: Latency, baseline: Latency) -> float:
    """Median over interleaving rounds of ``latency``'s round median divided by ``baseline``'s in the same round
    (a slow spell of a shared machine falls on both sides of a round alike)."""
    pairs = [a / b for a, b in zip(latency.round_medians_ms, baseline.round_medians_ms, strict=True)]
    return statistics.median(pairs) if pairs else latency.median_ms / baseline.median_ms


# --- ONNX Runtime ------------------------------------------------------------------------------------------------


def ort_available_providers() -> list[str]:
    """``onnxruntime.get_available_providers()``: the execution providers this onnxruntime build has."""
    import onnxruntime

    return list(onnxruntime.get_available_providers())


def ort_session(
    onnx_model: OnnxModel,
    *,
    threads: int | None = None,
    engine: str = "onnxruntime",
    config: Mapping[str, str] | None = None,
):
    """An ``onnxruntime.InferenceSession`` of ``onnx_model`` on ``engine``'s execution provider (see
    ``ORT_PROVIDERS``): ``intra_op_num_threads=threads`` (None: ``torch.get_num_threads()``), one inter-op
    thread, sequential execution, every graph optimization (ORT_ENABLE_ALL); ``config``: session config entries
    (e.g. ``{"session.x64quantprecision": "1"}``). Raises EngineUnavailable when the provider is missing from this
    build or fails to load (ONNX Runtime would silently fall back to the CPU)."""
    import onnxruntime

    if engine not in ORT_PROVIDERS:
        raise ValueError(f"engine={engine!r} is not an ONNX Runtime engine; choose from {sorted(ORT_PROVIDERS)}")
    provider = ORT_PROVIDERS[engine]
    available = onnxruntime.get_available_providers()
    if provider not in available:
        raise EngineUnavailable(f"{provider} is not in this onnxruntime build (it has {', '.join(available)})")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads if threads is not None else torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = onnxruntime.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only: a provider's missing library is reported by EngineUnavailable
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    providers = [provider] if provider == "CPUExecutionProvider" else [provider, "CPUExecutionProvider"]
    session = onnxruntime.InferenceSession(onnx_bytes(onnx_model), options, providers=providers)
    if session.get_providers()[0] != provider:
        raise EngineUnavailable(f"{provider} failed to load (missing device or libraries); ONNX Runtime fell back")
    return session


def ort_runner(onnx_model: OnnxModel, inputs: np.ndarray, *, threads: int, engine: str = "onnxruntime"):
    """A call without arguments that runs ``onnx_model`` on ``inputs`` in ONNX Runtime and returns its outputs."""
    session = ort_session(onnx_model, threads=threads, engine=engine)
    feed = {session.get_inputs()[0].name: inputs}
    return lambda: session.run(None, feed)


# --- OpenVINO ----------------------------------------------------------------------------------------------------


def openvino_runner(onnx_model: OnnxModel, inputs: np.ndarray, *, threads: int):
    """A call without arguments that runs ``onnx_model`` on ``inputs`` in OpenVINO on the CPU and returns its
    outputs. Raises EngineUnavailable when openvino is not installed (it is the ``openvino`` extra)."""
    if importlib.util.find_spec("openvino") is None:
        raise EngineUnavailable("openvino is not installed (pip install 'repablate[openvino]')")
    # The openvino extra, imported by name where present: an import statement would declare it a core dependency
    # (tests/test_packaging.py reads every import of the package).
    openvino = importlib.import_module("openvino")
    core = openvino.Core()
    with tempfile.TemporaryDirectory(prefix="repablate-openvino-") as folder:
        path = Path(folder) / "model.onnx"
        path.write_bytes(onnx_bytes(onnx_model))
        config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads, "INFERENCE_PRECISION_HINT": "f32"}
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    outputs = list(compiled.outputs)

    def run() -> list[np.ndarray]:
        results = request.infer({0: inputs})
        return [results[output] for output in outputs]

    return run


# --- measuring ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineReport:
    """Engines measured together on one batch. ``latencies`` by engine (``torch`` is eager); ``errors``: each
    engine's normwise relative error against eager's outputs; ``skipped``: engines this machine lacks, with why."""

    latencies: dict[str, Latency]
    errors: dict[str, float]
    skipped: dict[str, str]
    batch_size: int
    threads: int
    providers: tuple[str, ...] = field(default_factory=tuple)

    def latency_vs(self, engine: str, baseline: str = EAGER) -> float | None:
        """``engine``'s latency / ``baseline``'s, paired by round (see ``paired_ratio``); None if either is
        missing. Below 1: ``engine`` is faster."""
        if engine not in self.latencies or baseline not in self.latencies:
            return None
        return paired_ratio(self.latencies[engine], self.latencies[baseline])

    def as_dict(self) -> dict[str, Any]:
        """Flat: ``engine/<name>/latency_ms`` (median), ``latency_iqr_ms``, ``throughput`` (images/s),
        ``latency_vs_torch`` (paired ratio), ``max_rel_error`` (against eager); ``engine/<name>/skipped`` (why);
        ``engine/threads``, ``engine/batch_size``, ``engine/ort_providers``."""
        record: dict[str, Any] = {
            "engine/threads": self.threads,
            "engine/batch_size": self.batch_size,
            "engine/ort_providers": ",".join(self.providers),
        }
        for name, latency in self.latencies.items():
            record[f"engine/{name}/latency_ms"] = latency.median_ms
            record[f"engine/{name}/latency_iqr_ms"] = latency.iqr_ms
            record[f"engine/{name}/throughput"] = self.batch_size / (latency.median_ms / 1e3)
            if name != EAGER:
                record[f"engine/{name}/latency_vs_torch"] = self.latency_vs(name)
                record[f"engine/{name}/max_rel_error"] = self.errors.get(name)
        record.update({f"engine/{name}/skipped": reason for name, reason in self.skipped.items()})
        return record


def engine_runners(
    onnx_model: OnnxModel, inputs: np.ndarray, engines: Iterable[str], *, threads: int
) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    """For each engine of ``engines`` (names of ``ENGINES``) a call that runs ``onnx_model`` on ``inputs``, and
    for each engine this machine lacks the reason it is skipped."""
    runners: dict[str, Callable[[], Any]] = {}
    skipped: dict[str, str] = {}
    for engine in engines:
        if engine not in ENGINES:
            raise ValueError(f"engine {engine!r} is unknown; choose from {', '.join(ENGINES)}")
        try:
            if engine == OPENVINO:
                runners[engine] = openvino_runner(onnx_model, inputs, threads=threads)
            else:
                runners[engine] = ort_runner(onnx_model, inputs, threads=threads, engine=engine)
        except EngineUnavailable as reason:
            skipped[engine] = str(reason)
    return runners, skipped


def measure_engines(
    model: nn.Module,
    onnx_model: OnnxModel,
    example_input: torch.Tensor,
    *,
    engines: Iterable[str] = ENGINES,
    int8_model: OnnxModel | None = None,
    threads: int | None = None,
    warmup: int = 10,
    min_run_time: float = 0.2,
    rounds: int = 1,
) -> EngineReport:
    """Time ``model`` (PyTorch eager, on the CPU, float32, eval mode, no grad) and ``onnx_model`` (its exported
    graph) in each engine of ``engines`` on ``example_input``, interleaved over ``rounds`` (see
    ``measure_latencies``). ``int8_model``: a quantized graph, timed too as ``onnxruntime-int8`` (CPU provider).
    ``threads``: the CPU thread count of every engine (None: ``torch.get_num_threads()``). Engines missing here
    are skipped with their reason (``EngineReport.skipped``). ``model`` itself is left untouched."""
    threads = _check_settings(threads, warmup, min_run_time, rounds)
    if not isinstance(example_input, torch.Tensor) or example_input.dim() < 1:
        raise ValueError("example_input must be a batch tensor whose first dimension is the batch size")
    eager = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    x = example_input.detach().to(device="cpu", dtype=torch.float32).contiguous()
    array = x.numpy()
    runners, skipped = engine_runners(onnx_model, array, engines, threads=threads)
    if int8_model is not None:
        runners[INT8] = ort_runner(int8_model, array, threads=threads)
    with torch.no_grad():
        expected = output_leaves(eager(x))
    errors = {name: max_rel_error(expected, runner()) for name, runner in runners.items()}
    timed = {EAGER: lambda: eager(x), **runners}
    latencies = measure_latencies(timed, (), threads=threads, warmup=warmup, min_run_time=min_run_time, rounds=rounds)
    return EngineReport(latencies, errors, skipped, x.shape[0], threads, tuple(ort_available_providers()))


def _ms(latency: Latency) -> str:
    return f"{latency.median_ms:.4g} ({latency.iqr_ms:.2g})"


def markdown_engines(reports: Sequence[tuple[str, EngineReport]]) -> str:
    """Per case and engine: latency (ms, IQR), images/s, latency / eager's paired by round, and the relative error
    against eager; then the engines skipped, with why."""
    lines = [
        "| case | engine | device | ms (IQR) | images/s | engine / eager, paired by round | max rel error vs eager |",
        "|---|---|---|---|---:|---:|---:|",
    ]
    skipped: dict[str, str] = {}
    for case, report in reports:
        for name, latency in report.latencies.items():
            device = "GPU" if name in ("onnxruntime-cuda", "onnxruntime-tensorrt") else "CPU"
            ratio = report.latency_vs(name)
            error = report.errors.get(name)
            lines.append(
                f"| {case} | {name + ' (eager)' if name == EAGER else name} | {device} | {_ms(latency)} | "
                f"{report.batch_size / (latency.median_ms / 1e3):,.0f} | "
                f"{'1' if name == EAGER else f'{ratio:.3g}'} | {'-' if error is None else f'{error:.2g}'} |"
            )
        skipped.update(report.skipped)
    if skipped:
        lines += ["", "Skipped: " + "; ".join(f"{name} ({reason})" for name, reason in skipped.items()) + "."]
    return "\n".join(lines)

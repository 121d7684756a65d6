"""Latency on top of ``torch.utils.benchmark.Timer``, which sets the thread count and synchronizes accelerators.

Several callables measured together are interleaved round by round (a, b, then b, a, ...), so that a slow spell
of a shared machine falls on all of them rather than on one; their timed blocks are pooled per callable.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.benchmark import Measurement, Timer


@dataclass(frozen=True)
class Latency:
    """Time per call summarised over timed blocks: median and interquartile range, in milliseconds.

    ``blocks`` is how many timed blocks (of at least ``calls_per_block`` calls each) the statistics come from;
    ``peak_mem_bytes`` is the device's peak allocation while timing, above what was allocated before (weights and
    inputs of all models measured together are resident, so this is the forward's activations and workspace),
    None where the device reports none (CPU);
    ``round_medians_ms`` the median of each interleaving round, for paired comparisons between callables.
    """

    median_ms: float
    iqr_ms: float
    blocks: int
    calls_per_block: int
    threads: int
    peak_mem_bytes: int | None = None
    round_medians_ms: tuple[float, ...] = ()


def _check_settings(threads: int | None, warmup: int, min_run_time: float, rounds: int) -> int:
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads={threads!r} is not allowed: give a positive integer, or None for the current count")
    if not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"warmup={warmup!r} is not allowed: give the number of untimed calls, 0 or more")
    if not min_run_time > 0:
        raise ValueError(f"min_run_time={min_run_time!r} is not allowed: give a positive number of seconds")
    if not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds={rounds!r} is not allowed: give a positive integer")
    return threads if threads is not None else torch.get_num_threads()


def _device_of(inputs: tuple) -> torch.device:
    tensors = [arg for arg in inputs if isinstance(arg, torch.Tensor)]
    return tensors[0].device if tensors else torch.device("cpu")


def measure_latencies(
    functions: Mapping[str, Callable[..., Any]],
    inputs: Any,
    *,
    threads: int | None = None,
    warmup: int = 10,
    min_run_time: float = 0.2,
    rounds: int = 1,
) -> dict[str, Latency]:
    """Time each callable on ``inputs`` (a tensor or a tuple of arguments), interleaved over ``rounds``.

    First ``warmup`` untimed calls of each callable, then per round and callable
    ``Timer.blocked_autorange(min_run_time)`` (which also warms up while it sizes its blocks).
    ``threads`` is the CPU thread count the Timer sets while timing (None: ``torch.get_num_threads()``).
    Runs under ``torch.no_grad()``; peak memory (see ``Latency``) is read on CUDA devices.
    """
    threads = _check_settings(threads, warmup, min_run_time, rounds)
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    device = _device_of(args)
    timers = {
        name: Timer("function(*args)", globals={"function": function, "args": args}, label=name, num_threads=threads)
        for name, function in functions.items()
    }
    measurements: dict[str, list[Measurement]] = {name: [] for name in timers}
    peaks: dict[str, int | None] = dict.fromkeys(timers)
    with torch.no_grad():
        for timer in timers.values():
            if warmup:
                timer.timeit(warmup)
        for round_index in range(rounds):
            # Alternate the order, so that no callable always runs right after the same neighbour.
            order = list(timers.items()) if round_index % 2 == 0 else list(reversed(timers.items()))
            for name, timer in order:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                    resident = torch.cuda.memory_allocated(device)
                    torch.cuda.reset_peak_memory_stats(device)
                measurements[name].append(timer.blocked_autorange(min_run_time=min_run_time))
                if device.type == "cuda":
                    # Above what was resident (every model's weights, the input): this callable's activations.
                    extra = torch.cuda.max_memory_allocated(device) - resident
                    peaks[name] = max(peaks[name] or 0, extra)
    results = {}
    for name, runs in measurements.items():
        (pooled,) = Measurement.merge(runs)
        results[name] = Latency(
            median_ms=pooled.median * 1e3,
            iqr_ms=pooled.iqr * 1e3,
            blocks=len(pooled.times),
            calls_per_block=min(run.number_per_run for run in runs),
            threads=threads,
            peak_mem_bytes=peaks[name],
            round_medians_ms=tuple(run.median * 1e3 for run in runs),
        )
    return results


def measure_latency(
    function: Callable[..., Any],
    inputs: Any,
    *,
    threads: int | None = None,
    warmup: int = 10,
    min_run_time: float = 0.2,
    rounds: int = 1,
) -> Latency:
    """Latency of one callable (e.g. a model in eval mode) on ``inputs``; see ``measure_latencies``."""
    return measure_latencies(
        {"function": function}, inputs, threads=threads, warmup=warmup, min_run_time=min_run_time, rounds=rounds
    )["function"]

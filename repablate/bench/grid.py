"""The article's table, measured: a RepConv in training form vs its deployed form vs a plain conv of one shape.

Each case is three models measured together under one setting (latencies interleaved): ``train`` (multi-branch),
``deploy`` (the same block fused) and ``plain`` (a Conv + BN of the same shape with its BN folded). Rows are flat
dicts, ready for CSV; the markdown helpers render them.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.utils.benchmark import Timer

from repablate.bench.forms import FormsReport, measure_models
from repablate.bench.latency import measure_latency
from repablate.nn import Conv, RepConv, reparameterize

# The claims of the article "YOLOv7's RepConv module: the structure magician of training and inference":
# multi-branch vs single conv, never measured there.
ARTICLE_CLAIMS = {"flops": 2.5, "mem_bytes": 3.2, "latency_ms": 2.1}


@dataclass(frozen=True)
class Case:
    """One comparison: a training-form model, a plain model of the same shapes, and an input batch."""

    kind: str
    name: str
    train: nn.Module
    plain: nn.Module
    example_input: torch.Tensor
    width: int | None = None
    resolution: int | None = None


def block_case(width: int, resolution: int, batch_size: int = 1) -> Case:
    """RepConv(width, width) with its identity branch beside Conv(width, width, 3), on width x res x res inputs."""
    return Case(
        "block",
        f"repconv_c{width}_r{resolution}",
        RepConv(width, width),
        Conv(width, width, 3),
        torch.randn(batch_size, width, resolution, resolution),
        width,
        resolution,
    )


def repconv_stack(
    block: Callable[..., nn.Module], in_channels: int = 3, widths: Sequence[int] = (32, 64, 128), depth: int = 2
) -> nn.Sequential:
    """The article-style minimal network: per width, a stride-2 block then ``depth - 1`` blocks of stride 1."""
    layers, c_in = [], in_channels
    for width in widths:
        layers += [block(c_in, width, s=2)] + [block(width, width, s=1) for _ in range(depth - 1)]
        c_in = width
    return nn.Sequential(*layers)


def stack_case(resolution: int, batch_size: int = 1) -> Case:
    """The minimal RepConv stack beside the same stack of plain convs, on 3 x res x res images."""
    return Case(
        "model",
        f"repconv_stack_r{resolution}",
        repconv_stack(RepConv),
        repconv_stack(partial(Conv, k=3)),
        torch.randn(batch_size, 3, resolution, resolution),
        resolution=resolution,
    )


def run_case(case: Case, **settings: Any) -> dict[str, Any]:
    """Measure one case; ``settings`` go to ``measure_models``. A flat row: train_form/, deploy_form/, plain/,
    ratio/ (train / deploy), bench/, and ratio/deploy_vs_plain_latency: the median over rounds of the deployed
    block's latency divided by the plain conv's in the same round."""
    models = {"train": case.train, "deploy": reparameterize(case.train), "plain": reparameterize(case.plain)}
    costs, used = measure_models(models, case.example_input, **settings)
    row: dict[str, Any] = {"kind": case.kind, "name": case.name, "width": case.width, "resolution": case.resolution}
    row.update(FormsReport(costs["train"], costs["deploy"], used).as_dict())
    row.update({f"plain/{key}": value for key, value in costs["plain"].as_dict().items()})
    deploy, plain = costs["deploy"].latency, costs["plain"].latency
    if deploy is not None and plain is not None:
        # Paired by round: a slow spell of the shared machine hits both sides of a round alike.
        pairs = [d / p for d, p in zip(deploy.round_medians_ms, plain.round_medians_ms, strict=True)]
        row["ratio/deploy_vs_plain_latency"] = statistics.median(pairs)
    return row


def overhead_check(
    width: int, resolution: int, *, threads: int, min_run_time: float, rounds: int, device: torch.device | str = "cpu"
) -> dict[str, Any]:
    """The harness (``measure_latency``) against a hand-written Timer loop, interleaved, on one deployed block.

    Returns both medians over rounds and ``overhead``: the median over rounds of harness / hand-written, minus 1.
    """
    model = reparameterize(RepConv(width, width)).to(device)
    x = torch.randn(1, width, resolution, resolution, device=device)
    hand_timer = Timer("model(x)", globals={"model": model, "x": x}, num_threads=threads)
    harness, hand = [], []
    with torch.no_grad():
        hand_timer.timeit(10)
        for _ in range(rounds):
            harness.append(measure_latency(model, x, threads=threads, warmup=0, min_run_time=min_run_time).median_ms)
            hand.append(hand_timer.blocked_autorange(min_run_time=min_run_time).median * 1e3)
    return {
        "case": f"deployed RepConv c{width} r{resolution}",
        "harness_ms": statistics.median(harness),
        "hand_written_ms": statistics.median(hand),
        "overhead": statistics.median(h / k for h, k in zip(harness, hand, strict=True)) - 1,
    }


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}g}"


def _latency(row: dict[str, Any], prefix: str) -> str:
    if f"{prefix}/latency_ms" not in row:
        return "-"
    return f"{row[f'{prefix}/latency_ms']:.3g} ({row[f'{prefix}/latency_iqr_ms']:.2g})"


def markdown_rows(rows: Iterable[dict[str, Any]]) -> str:
    """Per case: params, MFLOPs, MB moved and latency (ms, IQR) of each form, and the ratios."""
    header = (
        "| case | params train / deploy | MFLOPs train / deploy | FLOPs ratio | MB moved train / deploy | "
        "memory ratio | ms train (IQR) | ms deploy (IQR) | ms plain conv (IQR) | latency ratio | deploy / plain |"
    )
    lines = [header, "|---|---|---|---:|---|---:|---|---|---|---:|---:|"]
    for row in rows:
        lines.append(
            f"| {row['name']} | {row['train_form/params']:,} / {row['deploy_form/params']:,} | "
            f"{row['train_form/flops'] / 1e6:.4g} / {row['deploy_form/flops'] / 1e6:.4g} | "
            f"{_fmt(row['ratio/flops'])} | "
            f"{row['train_form/mem_bytes'] / 1e6:.4g} / {row['deploy_form/mem_bytes'] / 1e6:.4g} | "
            f"{_fmt(row['ratio/mem_bytes'])} | {_latency(row, 'train_form')} | {_latency(row, 'deploy_form')} | "
            f"{_latency(row, 'plain')} | {_fmt(row.get('ratio/latency_ms'))} | "
            f"{_fmt(row.get('ratio/deploy_vs_plain_latency'), 4)} |"
        )
    return "\n".join(lines)


def markdown_summary(block_rows: Sequence[dict[str, Any]]) -> str:
    """The article's claims beside the medians (and ranges) measured over the block grid."""
    lines = [
        "| multi-branch : single conv | article claims | measured: median over the grid [min, max] |",
        "|---|---:|---|",
    ]
    names = {"flops": "FLOPs", "mem_bytes": "memory access", "latency_ms": "latency"}
    for metric, claim in ARTICLE_CLAIMS.items():
        values = [row[f"ratio/{metric}"] for row in block_rows if row.get(f"ratio/{metric}") is not None]
        lines.append(f"| {names[metric]} | {claim}x | {_spread(values)} |")
    bar = [row["ratio/deploy_vs_plain_latency"] for row in block_rows if "ratio/deploy_vs_plain_latency" in row]
    lines.append(f"| deployed RepConv / plain conv latency, paired by round | (bar: within 2%) | {_spread(bar, 4)} |")
    return "\n".join(lines)


def _spread(values: Sequence[float], digits: int = 3) -> str:
    if not values:
        return "not measured"
    return f"{statistics.median(values):.{digits}g}x [{min(values):.{digits}g}, {max(values):.{digits}g}]"

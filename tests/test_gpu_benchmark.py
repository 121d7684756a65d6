"""benchmarks/gpu.py run the way a user runs it: the one line without CUDA, the CPU code path (--device cpu --quick),
and the real GPU run where CUDA is present. The tables must hold numbers; no timing is asserted."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.py"


def run_script(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def table(markdown: str, header: str) -> list[dict[str, str]]:
    """The rows of the markdown table whose header row starts with ``header``, as dicts by column name."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header}"))
    names = [cell.strip() for cell in lines[start].strip().strip("|").split("|")]
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        rows.append(dict(zip(names, cells, strict=True)))
    return rows


def number(cell: str) -> float:
    """The leading figure of a cell: '1.23 (0.04)' -> 1.23, '1,465' -> 1465, '1.71x' -> 1.71."""
    return float(cell.split()[0].replace(",", "").rstrip("x"))


def check_tables(markdown: str) -> dict[str, list[dict[str, str]]]:
    """Every table of the report is there and holds positive figures; returns them by name."""
    tables = {
        "blocks": table(markdown, "case |"),
        "networks": table(markdown, "network | input | params"),
        "anchor": table(markdown, "RepVGG-B0, training form / deployed form latency"),
        "engines": table(markdown, "network | input | engine (provider)"),
        "training": table(markdown, "workload |"),
    }
    assert tables["blocks"] and all(row["case"].startswith("repconv_c") for row in tables["blocks"])
    for row in tables["blocks"]:
        for column in ("ms train (IQR)", "ms deploy (IQR)", "ms plain conv (IQR)", "train / deploy"):
            assert number(row[column]) > 0, (column, row)
    assert {"repvgg_a0", "yolov7_tiny", "repvgg_b0"} <= {row["network"] for row in tables["networks"]}
    for row in tables["networks"]:
        assert (
            number(row["ms train (IQR)"]) > 0 and number(row["ms deploy (IQR)"]) > 0 and number(row["train / deploy"])
        )
    paper, measured = tables["anchor"]
    assert number(paper["ratio"]) == pytest.approx(1.71) and number(measured["ratio"]) > 0
    assert "| FLOPs | 2.5x | 1.11x" in markdown  # the grid's summary against the article's claims
    return tables


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without a GPU")
def test_without_cuda_it_says_so_in_one_line_and_exits_0():
    result = run_script(timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 1 and "CUDA is not available" in lines[0]


@pytest.mark.slow
def test_quick_cpu_mode_writes_every_table_with_figures(tmp_path):
    out = tmp_path / "sub" / "gpu.md"
    result = run_script("--device", "cpu", "--quick", "--out", str(out), timeout=600)
    assert result.returncode == 0, result.stderr
    assert "done, markdown in" in result.stderr  # progress lines go to stderr
    markdown = out.read_text()
    assert markdown.startswith("### GPU: CPU stand-in (--device cpu)")
    assert "no figure below is a GPU figure" in markdown and f"torch {torch.__version__}" in markdown
    tables = check_tables(markdown)
    engines = {row["engine (provider)"]: row for row in tables["engines"]}
    # The CPU provider stands in on a CPU, labelled as what it is, never as CUDA.
    assert set(engines) == {"torch (eager)", "onnxruntime (CPUExecutionProvider)"}
    assert all(row["device"] == "CPU" for row in engines.values())
    assert (
        float(engines["onnxruntime (CPUExecutionProvider)"]["max rel error vs eager train / deploy"].split()[-1]) < 1e-4
    )
    training = {(row["workload"], row["mode"]): row for row in tables["training"]}
    for workload in ("digits", "shapes"):
        for mode in ("fp32", "bf16-mixed"):
            assert number(training[workload, mode]["images/s, first epoch"]) > 0
            assert training[workload, mode]["peak GPU MiB"] == "-"  # no GPU, no GPU memory
    assert "compile (" in markdown  # skipped with its reason in the quick CPU mode
    assert "failed" not in markdown, markdown
    assert not list(out.parent.glob("*.tmp"))  # written atomically


@pytest.mark.cuda
@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_the_gpu_run_records_latency_throughput_and_memory(tmp_path):
    out = tmp_path / "gpu.md"
    result = run_script("--out", str(out), timeout=850)
    assert result.returncode == 0, result.stderr
    markdown = out.read_text()
    assert markdown.startswith(f"### GPU: {torch.cuda.get_device_name()}") and "driver" in markdown
    tables = check_tables(markdown)
    for row in tables["networks"]:
        assert all(number(peak) > 0 for peak in row["peak MiB train / deploy"].split(" / "))
    training = {(row["workload"], row["mode"]): row for row in tables["training"]}
    for workload in ("digits", "shapes"):
        assert number(training[workload, "fp32"]["peak GPU MiB"]) > 0
        assert number(training[workload, "bf16-mixed"]["images/s, first epoch"]) > 0

"""python -m repablate.bench, run the way a user runs it (quick mode; no timing asserts)."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "repablate.bench", *args],
        cwd=ROOT,
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.mark.slow
def test_quick_mode_prints_the_table_and_writes_csv(tmp_path):
    out = tmp_path / "sub" / "bench.csv"
    result = run_cli("--quick", "--threads", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    for text in (
        "1 thread(s)",
        "float32",
        f"torch {torch.__version__}",
        "| repconv_c8_r8 |",
        "| repconv_stack_r32 |",
        "article claims",
        "| FLOPs | 2.5x | 1.11x",
        "hand-written",
    ):
        assert text in result.stdout
    rows = list(csv.DictReader(out.open()))
    assert [row["name"] for row in rows] == [
        "repconv_c8_r8",
        "repconv_c8_r16",
        "repconv_c16_r8",
        "repconv_c16_r16",
        "repconv_stack_r32",
    ]
    for row in rows:
        assert row["bench/threads"] == "1" and row["bench/torch"] == torch.__version__
        assert float(row["plain/latency_ms"]) > 0 and float(row["ratio/deploy_vs_plain_latency"]) > 0
    block = rows[0]
    assert float(block["ratio/flops"]) == pytest.approx(10 / 9)  # C -> C: (9 + 1) / 9
    assert block["deploy_form/flops"] == block["plain/flops"] and block["deploy_form/params"] == block["plain/params"]
    assert not list(out.parent.glob("*.tmp"))  # written atomically, nothing left behind


def test_bad_sizes_are_named(capsys):
    from repablate.bench.__main__ import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--quick", "--widths", "0"])
    assert exit_info.value.code == 2 and "--widths [0] is not allowed" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_in_process(capsys):
    from repablate.bench.__main__ import main

    assert main(["--quick", "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err

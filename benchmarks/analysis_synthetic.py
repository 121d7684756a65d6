"""Benchmark: the analysis of 1,000 synthetic results files (the bar: under 10 s on a 2-core CPU).

    python benchmarks/analysis_synthetic.py [--runs 1000] [--variants 4]

Writes a synthetic sweep (random numbers laid out like a Hydra multirun, with branch_gradients.csv) into a
temporary directory, then times `python -m repablate.analysis SWEEP_DIR --baseline plain` end to end (a fresh
process: imports, collection, table, exports, the three figures) and, in this process, each stage alone.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from repablate.analysis import ablation_table, collect_runs, export_table, write_report  # noqa: E402
from repablate.analysis.synthetic import write_synthetic_sweep  # noqa: E402

VARIANTS = ("plain", "repconv_no1x1", "repconv_n", "repconv")


def machine() -> str:
    cpu = (
        next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            platform.machine(),
        )
        if Path("/proc/cpuinfo").exists()
        else platform.machine()
    )
    return f"{cpu}, {os.cpu_count()} logical cores, {platform.system()}, python {platform.python_version()}"


def timed(label: str, function):
    start = time.perf_counter()
    value = function()
    print(f"  {label:<34} {time.perf_counter() - start:7.2f} s")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--variants", type=int, default=4, choices=range(1, len(VARIANTS) + 1))
    args = parser.parse_args()
    variants = VARIANTS[: args.variants]
    seeds = range(args.runs // len(variants))
    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        sweep = write_synthetic_sweep(Path(tmp) / "sweep", variants=variants, seeds=seeds)
        n_files = len(list(sweep.rglob("results.json")))
        print(f"{n_files} results files, {len(variants)} variants")
        start = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "repablate.analysis",
                str(sweep),
                "--baseline",
                "plain",
                "--out",
                str(Path(tmp) / "cli"),
            ],
            cwd=ROOT,
            capture_output=True,
            text=True,
        )
        total = time.perf_counter() - start
        if done.returncode != 0:
            raise SystemExit(f"analysis failed:\n{done.stderr}")
        print(f"  {'CLI end to end (fresh process)':<34} {total:7.2f} s")
        runs = timed("collect_runs", lambda: collect_runs(sweep))
        table = timed("ablation_table", lambda: ablation_table(runs, baseline="plain"))
        timed("export_table (md, tex, csv)", lambda: export_table(table, Path(tmp) / "out", runs=runs))
        timed("write_report (tables + 3 figures)", lambda: write_report(runs, Path(tmp) / "report", baseline="plain"))
    print(f"bar: under 10 s -> {'met' if total < 10 else 'NOT met'} ({total:.2f} s)")


if __name__ == "__main__":
    main()

"""Benchmark: the default sweep (plain vs RepConv, 3 seeds, on the embedded digits dataset) and then its
analysis, as a user runs them (the bar: both together under 5 minutes on a 2-core CPU).

    python benchmarks/analysis_sweep.py [--launcher basic|joblib] [extra Hydra overrides ...]

Runs `python -m repablate +sweep=default` into a temporary sweep directory, then
`python -m repablate.analysis SWEEP_DIR`, and prints the wall time of each, the table, and the machine.
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


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    models = (
        [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        if cpuinfo.exists()
        else []
    )
    return f"{models[0] if models else platform.machine()}, {os.cpu_count()} logical cores, {platform.system()}"


def timed_run(command: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    return time.perf_counter() - start, done


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--launcher", default="basic", choices=["basic", "joblib"])
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for every job")
    args = parser.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    print(f"machine: {machine()}; python {platform.python_version()}")
    with tempfile.TemporaryDirectory() as tmp:
        sweep_dir = Path(tmp) / "sweep"
        env.setdefault("WANDB_DIR", tmp)
        sweep_s, sweep = timed_run(
            [
                sys.executable,
                "-m",
                "repablate",
                "+sweep=default",
                f"+launcher={args.launcher}",
                f"hydra.sweep.dir={sweep_dir}",
                *args.overrides,
            ],
            env,
        )
        if sweep.returncode != 0:
            print(f"the sweep exited with {sweep.returncode} (failed jobs are listed below):\n{sweep.stderr[-2000:]}")
        analysis_s, analysis = timed_run([sys.executable, "-m", "repablate.analysis", str(sweep_dir)], env)
        print(analysis.stdout, analysis.stderr[-2000:])
    total = sweep_s + analysis_s
    print(f"sweep ({args.launcher} launcher): {sweep_s:.1f} s; analysis: {analysis_s:.1f} s; total: {total:.1f} s")
    print(f"bar: under 300 s -> {'met' if total < 300 else 'NOT met'}")


if __name__ == "__main__":
    main()

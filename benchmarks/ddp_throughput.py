"""Training throughput of one run in one process against the same run under DDP on the CPU (gloo).

    python benchmarks/ddp_throughput.py [--devices 2] [--rounds 2] [overrides ...]

Each round runs ``python -m repablate`` twice, as a user would, alternating: once in one process, once with
``trainer=ddp trainer.devices=N trainer.accelerator=cpu trainer.sync_batchnorm=false``; both with ``threads=1`` per
process, the CSV logger and no deploy-check export. It prints results.json's ``train/images_per_s`` (every
process's images over the training epochs' time) and the wall time of each run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMON = ["+variant=repconv", "logger=csv", "~callbacks.progress_bar", "callbacks.deploy_check.export=false"]


def one_run(run_dir: Path, overrides: list[str]) -> tuple[float, float]:
    """(train/images_per_s, wall seconds) of one run into ``run_dir``."""
    env = {**os.environ, "WANDB_MODE": "disabled"}
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "repablate", *COMMON, *overrides, f"hydra.run.dir={run_dir}"],
        env=env,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"run failed ({' '.join(overrides)}):\n{done.stderr[-2000:]}")
    return json.loads((run_dir / "results.json").read_text())["train/images_per_s"], wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("overrides", nargs="*", help="further Hydra overrides, e.g. data=shapes trainer.max_epochs=3")
    args = parser.parse_args()
    ddp = ["trainer=ddp", f"trainer.devices={args.devices}", "trainer.accelerator=cpu", "trainer.sync_batchnorm=false"]
    figures: dict[str, list[tuple[float, float]]] = {"1 process": [], f"DDP, {args.devices} processes": []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            for (name, runs), extra in zip(figures.items(), ([], ddp), strict=True):
                runs.append(one_run(Path(tmp) / f"{round_}_{len(runs)}_{name[:3]}", [*args.overrides, *extra]))
                print(f"round {round_} {name}: {runs[-1][0]:.0f} images/s, {runs[-1][1]:.1f} s", flush=True)
    print(f"overrides={args.overrides} cores={os.cpu_count()}")
    base = statistics.median(ips for ips, _ in figures["1 process"])
    for name, runs in figures.items():
        ips = statistics.median(ips for ips, _ in runs)
        wall = statistics.median(wall for _, wall in runs)
        print(f"{name:18} median {ips:8.0f} images/s ({ips / base:.2f}x), median wall {wall:.1f} s")


if __name__ == "__main__":
    main()

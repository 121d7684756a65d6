"""A synthetic sweep on disk, laid out like a Hydra multirun of the harness, for trying the analysis without
training and for its benchmark. Every number is random: nothing here is a measurement."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from repablate.results import write_atomically

BRANCHES = {
    "plain": ["dense"],
    "repconv_n": ["dense", "1x1"],
    "repconv_no1x1": ["dense", "identity"],
    "repconv": ["dense", "1x1", "identity"],
}


def _record(variant: str, seed: int, run_dir: Path, rng: np.random.Generator) -> dict:
    acc = float(np.clip(rng.normal(0.80 + 0.01 * len(BRANCHES.get(variant, ["dense"])), 0.01), 0, 1))
    train_latency = float(rng.normal(2.0 + 0.3 * len(BRANCHES.get(variant, ["dense"])), 0.05))
    deploy_latency = float(rng.normal(2.0, 0.05))
    return {
        "status": "completed",
        "error": None,
        "variant": variant,
        "seed": seed,
        "task": "classify",
        "run_dir": str(run_dir),
        "wall_time_s": float(rng.uniform(20, 30)),
        "epochs": 3,
        "config/optimizer.lr": 0.01,
        "config/trainer.max_epochs": 3,
        "config/seed": seed,
        "train_form/val/acc": acc,
        "deploy_form/val/acc": acc,
        "deploy_form/test/acc": acc - 0.005,
        "train_form/test/acc": acc - 0.005,
        "val/acc_best": acc + 0.002,
        "equivalence/max_abs": float(rng.uniform(1e-7, 1e-6)),
        "equivalence/max_rel": float(rng.uniform(1e-7, 1e-6)),
        "train_form/params": 100_000 + 20_000 * (variant != "plain"),
        "deploy_form/params": 100_000,
        "train_form/flops": 2.2e7 if variant != "plain" else 2.0e7,
        "deploy_form/flops": 2.0e7,
        "train_form/latency_ms": train_latency,
        "deploy_form/latency_ms": deploy_latency,
        "ratio/latency_ms": train_latency / deploy_latency,
        "grad/warnings": 0,
    }


def _gradients_csv(variant: str, steps: int, rng: np.random.Generator) -> str:
    branches = BRANCHES.get(variant, ["dense"])
    lines = ["step,layer,branch,grad_norm,share"]
    for step in range(0, steps * 10, 10):
        for layer in ("stage1.0", "stage2.0"):
            norms = rng.uniform(0.1, 1.0, len(branches))
            lines += [f"{step},{layer},{b},{n:.6g},{n / norms.sum():.6g}" for b, n in zip(branches, norms, strict=True)]
    return "\n".join(lines) + "\n"


def write_synthetic_sweep(
    sweep_dir: str | Path,
    variants: Sequence[str] = ("plain", "repconv"),
    seeds: Sequence[int] = (0, 1, 2),
    failed: int = 0,
    missing: int = 0,
    gradient_steps: int = 5,
    rng_seed: int = 0,
) -> Path:
    """Write one job directory per (variant, seed), numbered like Hydra's (0, 1, ...), each with
    ``.hydra/overrides.yaml``, ``results.json`` and ``branch_gradients.csv``; then ``failed`` jobs whose
    results.json says failed and ``missing`` jobs with no results.json at all. Returns ``sweep_dir``."""
    sweep_dir = Path(sweep_dir)
    rng = np.random.default_rng(rng_seed)
    jobs = [(v, s) for v in variants for s in seeds]
    kinds = ["completed"] * len(jobs) + ["failed"] * failed + ["missing"] * missing
    jobs += [(variants[0], 1000 + i) for i in range(failed + missing)]
    for number, ((variant, seed), kind) in enumerate(zip(jobs, kinds, strict=True)):
        run_dir = sweep_dir / str(number)
        write_atomically(run_dir / ".hydra" / "overrides.yaml", f"- +variant={variant}\n- seed={seed}\n")
        if kind == "missing":
            continue
        record = _record(variant, seed, run_dir, rng)
        if kind == "failed":
            record = {k: v for k, v in record.items() if not k.startswith(("train_form", "deploy_form", "ratio"))}
            record.update(status="failed", error="Traceback (most recent call last):\nValueError: synthetic failure")
        else:
            write_atomically(run_dir / "branch_gradients.csv", _gradients_csv(variant, gradient_steps, rng))
        write_atomically(run_dir / "results.json", json.dumps(record, indent=1))
    return sweep_dir

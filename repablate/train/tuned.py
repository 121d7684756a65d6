"""Tune, then compare: each variant's seed sweep at the settings its own tuning sweep found best.

    python -m repablate +sweep=tune +variant=plain        # Optuna on the validation set, seed 100
    python -m repablate +sweep=tune +variant=repconv
    python -m repablate.train.tuned multirun/tune/plain/<dir> multirun/tune/repconv/<dir> [--seeds 0,1,2,3,4]
        [--out DIR] [--dry-run] [overrides ...]
    python -m repablate.analysis multirun/tuned/<dir>     # rows: variant, tuned lr, tuned warm-up

For each tuning sweep it reads the best trial (``optimization_results.yaml``, written by Hydra's Optuna sweeper)
and the sweep's command line (``multirun.yaml``), then runs ``python -m repablate -m`` once per variant with the
tuning sweep's overrides, its best values (the learning rate rounded to 3 significant figures) and fresh seeds,
into ``OUT/<variant>/`` (default OUT: ``multirun/tuned/<date>_<time>_<id>/``). Overrides given here apply to
every run and replace the tuning sweep's for the same key (a launcher, a logger). The runs carry ``analysis.by`` and
``analysis.baseline`` (plain, when tuned too), so the analysis of OUT needs no flags and shows each row's tuned
values. OUT/tuned.json records what was taken from where. It refuses tuning sweeps that differ in anything but the
variant (search space, trial budget, sampler, data, model, epochs): the comparison would not be a fair one.

Also here: ``TuningObjective``, the Hydra callback (conf/sweep/tune.yaml) that gives the Optuna sweeper each
trial's value. Exit status: 0 when every seed sweep ran, 1 when one did not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import logging
import secrets
import subprocess
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from repablate.results import DIVERGED, RESULTS_FILE, write_json

log = logging.getLogger(__name__)

OPTUNA_RESULTS = "optimization_results.yaml"  # the Optuna sweeper's best trial, in the sweep directory
SWEEP_CONFIG = "multirun.yaml"  # Hydra's record of the sweep: its config and command line
RECORD_FILE = "tuned.json"
SEED_KEY, VARIANT_KEY = "seed", "variant"
# Overrides of a tuning sweep that say how it ran, not what it trained: not carried over, never compared.
NOT_CARRIED = ("sweep", "launcher", "hydra")
SIGNIFICANT_FIGURES = 3  # of a tuned float: 0.0342, not 0.034187...; the analysis rows show it


class TuningObjective(HydraCallback):
    """The value a tuning trial reports to Hydra's Optuna sweeper: the field ``config.objective`` of the trial's
    results.json (conf/sweep/tune.yaml: ``val/acc``), unless the task function already returned a value.

    A diverged trial (status ``diverged``: its learning rate blew the loss up) scores ``diverged_value``, so the
    sampler learns that region is bad instead of the sweep stopping; any other failure stays a failure. At the
    sweep's start it saves the sweep's config as ``multirun.yaml``, as Hydra's basic sweeper does and the Optuna
    sweeper does not: the tuning sweep's command line for ``python -m repablate.train.tuned``, and a sweep
    directory the run-directory guard then never reuses.
    """

    def __init__(self, diverged_value: float = 0.0):
        self.diverged_value = float(diverged_value)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(config, sweep_dir / SWEEP_CONFIG)

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        metric = config.get("objective")
        path = Path(config.hydra.runtime.output_dir) / RESULTS_FILE
        record = json.loads(path.read_text()) if path.is_file() else {}
        if job_return.status == JobStatus.COMPLETED:
            if job_return.return_value is not None:
                return
            value = record.get(metric)
            if value is None:
                job_return.status = JobStatus.FAILED
                job_return.return_value = KeyError(f"{path} has no {metric!r}, the tuning objective (objective=...)")
                return
            job_return.return_value = float(value)
        elif record.get("status") == DIVERGED:
            log.warning("trial diverged at step %s: objective %s", record.get("diverged_at_step"), self.diverged_value)
            job_return.status = JobStatus.COMPLETED
            job_return.return_value = self.diverged_value


class TuningError(ValueError):
    """Tuning sweeps that cannot be compared, or bad arguments: a message for the user (exit status 2)."""


def _override_key(override: str) -> str:
    """``+variant=plain`` -> ``variant``; ``hydra.launcher.n_jobs=2`` -> ``hydra.launcher.n_jobs``."""
    return override.split("=", 1)[0].lstrip("+~")


def _is_carried(override: str) -> bool:
    key = _override_key(override)
    return not any(key == name or key.startswith(f"{name}.") for name in NOT_CARRIED)


def round_value(value: Any) -> Any:
    """A float to :data:`SIGNIFICANT_FIGURES` significant figures (a categorical choice comes out unchanged)."""
    return float(f"{value:.{SIGNIFICANT_FIGURES}g}") if isinstance(value, float) else value


def label(value: Any) -> str:
    """A value as the analysis writes it in a row label (1.0 as "1")."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


@dataclass
class Tuning:
    """One finished tuning sweep: its variant, best values and the overrides it trained with."""

    sweep_dir: Path
    variant: str
    best_params: dict[str, Any]
    best_value: float
    overrides: list[str]  # the sweep's command-line overrides that describe the training, +variant and seed excluded
    budget: dict[str, Any] = field(default_factory=dict)  # sampler, trials, search space, direction, objective

    @property
    def applied(self) -> dict[str, Any]:
        """The best values as the comparison runs them (floats rounded)."""
        return {key: round_value(value) for key, value in self.best_params.items()}


def read_tuning(sweep_dir: str | Path) -> Tuning:
    """The tuning sweep in ``sweep_dir``; ``TuningError`` unless it finished (``optimization_results.yaml``)."""
    sweep_dir = Path(sweep_dir)
    results, config = sweep_dir / OPTUNA_RESULTS, sweep_dir / SWEEP_CONFIG
    if not config.is_file():
        raise TuningError(f"{sweep_dir} is not a sweep directory: it has no {SWEEP_CONFIG}")
    if not results.is_file():
        raise TuningError(
            f"{sweep_dir} has no {OPTUNA_RESULTS}: not an Optuna tuning sweep (python -m repablate +sweep=tune), "
            "or one that did not finish"
        )
    best = OmegaConf.to_container(OmegaConf.load(results))
    if "best_params" not in best:
        raise TuningError(f"{results} holds no best_params (a multi-objective study?); tune one objective")
    cfg = OmegaConf.load(config)
    task = [str(o) for o in OmegaConf.to_container(cfg.hydra.overrides.task, resolve=False)]
    sweeper = OmegaConf.to_container(cfg.hydra.sweeper, resolve=False)
    budget = {key: sweeper.get(key) for key in ("sampler", "n_trials", "n_jobs", "direction", "params")}
    budget["objective"] = cfg.get("objective")
    # A search space may also come from the command line ('optimizer.lr=tag(log, interval(0.01, 0.3))').
    budget["searched on the command line"] = sorted(o for o in task if _override_key(o) in best["best_params"])
    variant = str(cfg.get(VARIANT_KEY))
    not_carried = (VARIANT_KEY, SEED_KEY, *best["best_params"])  # the variant, the tuning seed, the search space
    return Tuning(
        sweep_dir=sweep_dir,
        variant=variant,
        best_params=dict(best["best_params"]),
        best_value=float(best["best_value"]),
        overrides=[o for o in task if _is_carried(o) and _override_key(o) not in not_carried],
        budget=budget,
    )


def check_comparable(tunings: list[Tuning]) -> None:
    """``TuningError`` unless the sweeps differ in their variant only: one sweep per variant, the same trial
    budget, sampler, search space and objective, and the same training overrides (data, model, epochs, ...)."""
    variants = [t.variant for t in tunings]
    if len(set(variants)) < len(variants):
        raise TuningError(f"give one tuning sweep per variant; got variants {variants}")
    first = tunings[0]
    for other in tunings[1:]:
        for what, a, b in (
            ("tuning budget and search space", first.budget, other.budget),
            ("overrides", sorted(first.overrides), sorted(other.overrides)),
            ("tuned keys", sorted(first.best_params), sorted(other.best_params)),
        ):
            if a != b:
                raise TuningError(
                    f"the tuning sweeps differ in more than the variant, so the comparison would not be fair: "
                    f"{what} of {first.sweep_dir} ({first.variant}): {a}; of {other.sweep_dir} ({other.variant}): {b}"
                )


def seed_sweep_commands(
    tunings: list[Tuning], out: Path, seeds: str, extra: list[str], baseline: str | None
) -> dict[str, list[str]]:
    """Each variant's ``python -m repablate -m`` command line: the tuning sweep's overrides (but those of a key
    ``extra`` sets), its best values, the seeds, the analysis settings, then ``extra``; into ``out/<variant>``."""
    keys = list(tunings[0].best_params)
    replaced = {_override_key(o) for o in extra}
    analysis = [f"++analysis.by=[{','.join([VARIANT_KEY, *keys])}]"]
    base = next((t for t in tunings if t.variant == baseline), None)
    if base is not None:
        analysis.append(f"++analysis.baseline='{','.join([base.variant, *(label(base.applied[k]) for k in keys)])}'")
    commands = {}
    for tuning in tunings:
        tuned = [f"{key}={value!r}" for key, value in tuning.applied.items()]
        commands[tuning.variant] = [
            sys.executable,
            "-m",
            "repablate",
            "-m",
            *(o for o in tuning.overrides if _override_key(o) not in replaced),
            f"+{VARIANT_KEY}={tuning.variant}",
            *tuned,
            f"{SEED_KEY}={seeds}",
            f"hydra.sweep.dir={out / tuning.variant}",
            "run_group=tuned",
            *analysis,
            *extra,
        ]
    return commands


def _check_extra(extra: list[str], tuned_keys: list[str]) -> None:
    for override in extra:
        if "=" not in override:
            raise TuningError(f"{override!r} is neither a tuning sweep directory nor an override (key=value)")
        key = _override_key(override)
        if key in (*tuned_keys, SEED_KEY, VARIANT_KEY, "hydra.sweep.dir"):
            raise TuningError(
                f"{override!r} would replace what the comparison sets ({key}): seeds go in --seeds; the tuned "
                "values and the variant come from the tuning sweeps"
            )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m repablate.train.tuned",
        description=__doc__.split("\n\n")[2],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "items",
        nargs="+",
        metavar="TUNE_DIR_OR_OVERRIDE",
        help="tuning sweep directories (one per variant), then any Hydra overrides for every run, "
        "e.g. +launcher=joblib logger=csv",
    )
    parser.add_argument(
        "--seeds",
        default="0,1,2,3,4",
        help="the comparison's seeds, comma-separated (default 0,1,2,3,4; the tuning used seed 100)",
    )
    parser.add_argument("--baseline", default="plain", help="the variant the analysis compares against (plain)")
    parser.add_argument("--out", type=Path, help="comparison directory (default multirun/tuned/<date>_<time>_<id>)")
    parser.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    return parser.parse_intermixed_args(argv)  # directories and overrides before and after the options


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    dirs = [item for item in args.items if "=" not in item]
    extra = [item for item in args.items if "=" in item]
    try:
        if not dirs:
            raise TuningError("give at least one tuning sweep directory")
        if not all(s.strip().isdigit() for s in args.seeds.split(",")):
            raise TuningError(f"--seeds {args.seeds!r}: give comma-separated non-negative integers, e.g. 0,1,2,3,4")
        tunings = [read_tuning(d) for d in dirs]
        check_comparable(tunings)
        _check_extra(extra, list(tunings[0].best_params))
        out = args.out or Path("multirun/tuned") / f"{datetime.now():%Y-%m-%d_%H-%M-%S}_{secrets.token_hex(4)}"
        if out.exists() and any(out.iterdir()):
            raise TuningError(f"{out} is not empty: a comparison directory is never reused")
    except TuningError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    out = out.resolve()
    commands = seed_sweep_commands(tunings, out, args.seeds, extra, args.baseline)
    for tuning in tunings:
        print(
            f"{tuning.variant}: best {tuning.budget.get('objective')} {tuning.best_value:.4g} in {tuning.sweep_dir}, "
            f"runs at {', '.join(f'{k}={v}' for k, v in tuning.applied.items())}"
        )
    if args.dry_run:
        for command in commands.values():
            print(" ".join(command[1:]))
        return 0
    record = {
        "seeds": args.seeds,
        "overrides": extra,
        "variants": {
            t.variant: {
                "tune_dir": str(t.sweep_dir.resolve()),
                "best_params": t.best_params,
                "applied": t.applied,
                "best_value": t.best_value,
                "objective": t.budget.get("objective"),
                "budget": t.budget,
                "command": commands[t.variant][1:],
            }
            for t in tunings
        },
    }
    write_json(out / RECORD_FILE, record)
    failed = []
    for variant, command in commands.items():
        print(f"--- {variant}: {' '.join(command[1:])}", flush=True)
        if subprocess.run(command).returncode != 0:
            failed.append(variant)
    print(f"tabulate: python -m repablate.analysis {out}")
    if failed:
        print(f"seed sweeps that did not complete every job: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

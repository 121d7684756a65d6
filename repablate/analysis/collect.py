"""Collect runs into one DataFrame: from run directories (results.json) or from a wandb project.

One row per run, one column per results.json key (``config/<key>`` columns included), plus ``status``, ``error``,
``run_dir`` and ``overrides``. Runs write the status "completed", "failed", "diverged" (non-finite loss or weights;
``diverged_at_step``) or "interrupted" (SIGINT/SIGTERM). The analysis adds "missing": a job directory Hydra created
that holds no readable results.json (a killed job), or a job the sweep listed in ``sweep_jobs.json`` but never
started; and "invalid": a results.json that breaks this contract (no status, an unknown one, or a completed run that
names no variant). Only completed runs enter the statistics; every other row is reported, never dropped.
File names, statuses and ``flatten`` are ``repablate.results``'s, the schema the runs are written with.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from repablate.results import (
    COMPLETED,
    FAILED,
    GRADIENT_COLUMNS,
    GRADIENTS_FILE,
    INVALID,
    MISSING,
    RESULTS_FILE,
    RUN_STATUSES,
    STATUSES,
    SWEEP_JOBS_FILE,
    flatten,
)

NEVER_STARTED = "never started: the sweep stopped before this job"
# Directories inside a run that never hold another run: not worth walking on a big sweep.
_NOT_RUNS = {"checkpoints", "wandb", ".hydra", "csv", "lightning_logs", "analysis", "__pycache__"}
# wandb run states and the results.json status each one means.
_WANDB_STATUS = {"finished": COMPLETED, "failed": FAILED, "crashed": FAILED, "killed": FAILED}


def _scan(sweep_dir: str | Path) -> tuple[list[Path], list[Path]]:
    """The run directories and the sweep_jobs.json files under ``sweep_dir``, in one walk of the tree."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {str(sweep_dir)!r} does not exist or is not a directory")
    run_dirs, job_listings = [], []
    for root, dirs, files in os.walk(sweep_dir):
        if RESULTS_FILE in files or ".hydra" in dirs:
            run_dirs.append(Path(root))
        if SWEEP_JOBS_FILE in files:
            job_listings.append(Path(root) / SWEEP_JOBS_FILE)
        dirs[:] = sorted(d for d in dirs if d not in _NOT_RUNS)
    return sorted(run_dirs), sorted(job_listings)


def find_run_dirs(sweep_dir: str | Path) -> list[Path]:
    """Every directory under ``sweep_dir`` (itself included) that holds a results.json or a Hydra ``.hydra/``."""
    return _scan(sweep_dir)[0]


def _cell(value: Any) -> Any:
    """A table cell: None becomes NaN, lists and dicts become JSON text so any column can be grouped on."""
    if value is None:
        return math.nan
    if isinstance(value, (list, dict)):
        return json.dumps(value, sort_keys=True)
    return value


def _read_overrides(run_dir: Path) -> list[str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return []
    return [str(o) for o in (yaml.safe_load(path.read_text()) or [])]


def _identity_of_missing(run_dir: Path | None, overrides: list[str]) -> dict[str, Any]:
    """variant and seed of a job that left no results: from the config Hydra saved when the job started, else
    from its overrides (all there is of a job that never started: ``run_dir`` None)."""
    record: dict[str, Any] = {}
    saved = run_dir / ".hydra" / "config.yaml" if run_dir is not None else None
    if saved is not None and saved.is_file():
        config = yaml.safe_load(saved.read_text()) or {}
        record.update({k: config[k] for k in ("variant", "seed") if isinstance(config.get(k), (str, int))})
    for override in overrides:
        key, _, value = override.lstrip("+~").partition("=")
        if key in ("variant", "seed") and key not in record:
            record[key] = int(value) if key == "seed" and value.lstrip("-").isdigit() else value
    return record


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """One run's record: its results.json, or a "missing" record when the job left none or an unreadable one."""
    run_dir = Path(run_dir)
    overrides = _read_overrides(run_dir)
    path = run_dir / RESULTS_FILE
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(raw, dict):
            raise ValueError(f"expected a JSON object, got {type(raw).__name__}")
    except FileNotFoundError:
        record = {"status": MISSING, "error": "no results.json: the job was killed or has not finished"}
        record.update(_identity_of_missing(run_dir, overrides))
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        record = {"status": MISSING, "error": f"unreadable results.json: {err}"}
        record.update(_identity_of_missing(run_dir, overrides))
    else:
        record = _checked({key: _cell(value) for key, value in raw.items()}, "results.json")
        if record["status"] == INVALID:  # name the job all the same, from what Hydra saved of it
            for key, value in _identity_of_missing(run_dir, overrides).items():
                if _absent(record.get(key)):
                    record[key] = value
    record["run_dir"] = str(run_dir)  # where it is now, even if the sweep was moved since
    record["overrides"] = " ".join(overrides)
    return record


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or value == ""


def _checked(record: dict[str, Any], source: str) -> dict[str, Any]:
    """``record`` as is when it keeps the results contract; else marked "invalid", with an error naming the breach,
    so that it is listed with the failures instead of counting as completed or becoming a row named "nan"."""
    status = record.get("status")
    if _absent(status):
        breach = "no 'status' field"
    elif status not in RUN_STATUSES:
        breach = f"unknown status {status!r} (expected one of {', '.join(RUN_STATUSES)})"
    elif status == COMPLETED and _absent(record.get("variant")):
        breach = "a completed run with no 'variant' field"
    else:
        return record
    error = f"invalid {source}: {breach}"
    if isinstance(record.get("error"), str) and record["error"].strip():
        error += f"; its error: {record['error']}"
    return {**record, "status": INVALID, "error": error}


def _never_started(listing: Path, run_dirs: list[Path]) -> list[dict[str, Any]]:
    """A "missing" record for each job of ``listing`` (a sweep_jobs.json) that no run directory of its sweep
    answers for, matched on the exact list of overrides; an "invalid" record when the listing cannot be read."""
    sweep_dir = listing.parent
    try:
        jobs = json.loads(listing.read_text(encoding="utf-8"))["jobs"]
        jobs = [(job["num"], [str(o) for o in job["overrides"]]) for job in jobs]
    except (ValueError, KeyError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        return [
            {
                "status": INVALID,
                "error": f"unreadable {SWEEP_JOBS_FILE}: {type(err).__name__}: {err}",
                "run_dir": str(sweep_dir),
                "overrides": "",
            }
        ]
    # A Counter, not a set: two jobs with the same overrides need two run directories.
    started = Counter(tuple(_read_overrides(d)) for d in run_dirs if sweep_dir in d.parents)
    records = []
    for number, overrides in jobs:
        if started[tuple(overrides)] > 0:
            started[tuple(overrides)] -= 1
            continue
        records.append(
            {
                "status": MISSING,
                "error": NEVER_STARTED,
                **_identity_of_missing(None, overrides),
                "run_dir": str(sweep_dir),
                "overrides": " ".join(overrides),
                "job": number,
            }
        )
    return records


def collect_runs(sweep_dir: str | Path) -> pd.DataFrame:
    """All runs under ``sweep_dir`` as a DataFrame, one row per run (see the module docstring for columns), and
    one "missing" row per job that a sweep_jobs.json lists but that never started (its ``job`` number set)."""
    run_dirs, job_listings = _scan(sweep_dir)
    records = [read_run(run_dir) for run_dir in run_dirs]
    for listing in job_listings:
        records += _never_started(listing, run_dirs)
    if not records:
        raise FileNotFoundError(f"no runs (results.json or .hydra/) under {str(sweep_dir)!r}")
    return _frame(records)


def _frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    runs = pd.DataFrame.from_records(records)
    for column in ("status", "error", "variant", "seed", "run_dir"):
        if column not in runs:
            runs[column] = math.nan
    first = ["status", "variant", "seed", "run_dir", "error"]
    return runs[first + [c for c in runs.columns if c not in first]]


def collect_wandb(path: str, group: str | None = None, api: Any = None) -> pd.DataFrame:
    """All runs of the wandb project ``path`` ("entity/project"), optionally one group, with the same columns
    as :func:`collect_runs`: the run summary gives the results keys, the run config the ``config/`` keys.

    ``api`` defaults to ``wandb.Api()`` (needs network and a login); tests pass a stand-in.
    """
    if api is None:
        import wandb  # imported here: slow to import and needed only online

        api = wandb.Api()
    filters = {"group": group} if group else None
    records = [_wandb_record(run) for run in api.runs(path, filters=filters)]
    if not records:
        where = f"group {group!r} of " if group else ""
        raise LookupError(f"no runs in {where}wandb project {path!r}")
    return _frame(records)


def _wandb_record(run: Any) -> dict[str, Any]:
    summary = {k: _cell(v) for k, v in dict(run.summary).items() if not k.startswith("_")}
    # The run config flattened as a run flattens it into results.json, so both sources give the same columns.
    record = {**{key: _cell(value) for key, value in flatten(dict(run.config)).items()}, **summary}
    state = getattr(run, "state", "finished")
    record["status"] = summary.get("status", _WANDB_STATUS.get(state, MISSING))
    if record["status"] != COMPLETED and not isinstance(summary.get("error"), str):
        record["error"] = f"wandb run state {state!r}"
    record["run_dir"] = "/".join(run.path)
    record.setdefault("variant", record.get("config/variant", math.nan))
    record.setdefault("seed", record.get("config/seed", math.nan))
    return record if record["status"] == MISSING else _checked(record, "wandb run")


def resolve_column(runs: pd.DataFrame, name: str) -> str:
    """The column ``name`` refers to: itself, or a config key written as on the command line
    (``optimizer.lr`` or ``optimizer/lr`` -> ``config/optimizer.lr``). Raises ValueError naming the choices."""
    key = name.removeprefix("config/")
    for candidate in (name, f"config/{key}", f"config/{key.replace('/', '.')}"):
        if candidate in runs:
            return candidate
    known = ", ".join(sorted(map(str, runs.columns)))
    raise ValueError(f"unknown column {name!r}; the runs have these columns: {known}")


def completed(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that finished and wrote their results."""
    return runs[runs["status"] == COMPLETED]


def _status_order(status: str) -> int:
    return STATUSES.index(status) if status in STATUSES else len(STATUSES)


def failures(runs: pd.DataFrame) -> pd.DataFrame:
    """Every run left out of the statistics (failed, diverged, interrupted, missing, invalid), grouped by status
    in that order, with its error and, for a diverged run, ``diverged_at_step``."""
    columns = ("status", "variant", "seed", "run_dir", "overrides", "diverged_at_step", "error")
    left_out = runs.loc[runs["status"] != COMPLETED, [c for c in columns if c in runs]]
    return left_out.sort_values("status", key=lambda status: status.map(_status_order), kind="stable")


def status_counts(runs: pd.DataFrame) -> dict[str, int]:
    """How many runs have each status, in the order of :data:`STATUSES` (statuses with no run left out)."""
    counts = runs["status"].value_counts()
    return {str(s): int(counts[s]) for s in sorted(counts.index, key=_status_order)}


def load_branch_gradients(
    runs: pd.DataFrame, keys: Iterable[str] = ("variant", "seed"), pool: Sequence[str] | bool = ()
) -> pd.DataFrame:
    """The branch_gradients.csv of every completed run, concatenated, tagged with ``keys`` and ``run_dir``.

    Its figure (and anyone summarizing it by tag) averages the runs that share the ``keys`` other than the seed,
    so those must be replicates of one configuration: as in the ablation table, anything else raises
    :class:`~repablate.analysis.pooling.PoolingError` unless ``pool`` names the keys that may differ.
    """
    from repablate.analysis.pooling import check_pooling  # here: pooling builds on this module

    keys = list(keys)
    # Grouped by the tags it has (a tag the runs lack is NaN for all: it groups nothing apart).
    check_pooling(runs, [k for k in keys if k in runs and k.removeprefix("config/") != "seed"], pool)
    frames = []
    for _, run in completed(runs).iterrows():
        path = Path(run["run_dir"]) / GRADIENTS_FILE
        if path.is_file() and path.stat().st_size > 0:
            frame = pd.read_csv(path)
            for key in (*keys, "run_dir"):
                frame[key] = run.get(key, math.nan)
            frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=[*GRADIENT_COLUMNS, *keys, "run_dir"])
    return pd.concat(frames, ignore_index=True)


def tidy(runs: pd.DataFrame, metrics: Iterable[str], keys: Iterable[str] = ("variant", "seed")) -> pd.DataFrame:
    """Long form of the completed runs: one row per (run, metric), for plotting and pivoting."""
    keys = [k for k in keys if k in runs]
    metrics = [m for m in metrics if m in runs]
    long = completed(runs)[[*keys, "run_dir", *metrics]].melt(
        id_vars=[*keys, "run_dir"], var_name="metric", value_name="value"
    )
    long["value"] = pd.to_numeric(long["value"], errors="coerce")
    return long.dropna(subset=["value"])

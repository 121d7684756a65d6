"""Collect runs into one DataFrame: from run directories (results.json) or from a wandb project.

One row per run, one column per results.json key (``config/<key>`` columns included), plus ``status``
("completed", "failed" or "missing"), ``error``, ``run_dir`` and ``overrides``. A job directory that Hydra
created but that holds no results.json (a killed job) is a "missing" row, so failures are reported, not lost.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

RESULTS_FILE = "results.json"
GRADIENTS_FILE = "branch_gradients.csv"
# Directories inside a run that never hold another run: not worth walking on a big sweep.
_NOT_RUNS = {"checkpoints", "wandb", ".hydra", "csv", "lightning_logs", "analysis", "__pycache__"}
# wandb run states and the results.json status each one means.
_WANDB_STATUS = {"finished": "completed", "failed": "failed", "crashed": "failed", "killed": "failed"}


def find_run_dirs(sweep_dir: str | Path) -> list[Path]:
    """Every directory under ``sweep_dir`` (itself included) that holds a results.json or a Hydra ``.hydra/``."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep directory {str(sweep_dir)!r} does not exist or is not a directory")
    found = []
    for root, dirs, files in os.walk(sweep_dir):
        if RESULTS_FILE in files or ".hydra" in dirs:
            found.append(Path(root))
        dirs[:] = sorted(d for d in dirs if d not in _NOT_RUNS)
    return sorted(found)


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


def _identity_of_missing(run_dir: Path, overrides: list[str]) -> dict[str, Any]:
    """variant and seed of a job that left no results: from the config Hydra saved when the job started, else
    from its overrides."""
    record: dict[str, Any] = {}
    saved = run_dir / ".hydra" / "config.yaml"
    if saved.is_file():
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
        record = {"status": "missing", "error": "no results.json: the job was killed or has not finished"}
        record.update(_identity_of_missing(run_dir, overrides))
    except ValueError as err:  # json.JSONDecodeError is a ValueError
        record = {"status": "missing", "error": f"unreadable results.json: {err}"}
        record.update(_identity_of_missing(run_dir, overrides))
    else:
        record = {key: _cell(value) for key, value in raw.items()}
        record.setdefault("status", "completed")
    record["run_dir"] = str(run_dir)  # where it is now, even if the sweep was moved since
    record["overrides"] = " ".join(overrides)
    return record


def collect_runs(sweep_dir: str | Path) -> pd.DataFrame:
    """All runs under ``sweep_dir`` as a DataFrame, one row per run (see the module docstring for columns)."""
    records = [read_run(run_dir) for run_dir in find_run_dirs(sweep_dir)]
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


def _flatten(mapping: Mapping[str, Any], prefix: str = "config/", path: str = "") -> dict[str, Any]:
    """Nested config to results.json's keys: ``{"a": {"b": 1}}`` -> ``{"config/a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in mapping.items():
        dotted = f"{path}.{key}" if path else str(key)
        if isinstance(value, Mapping):
            flat.update(_flatten(value, prefix, dotted))
        else:
            flat[prefix + dotted] = _cell(value)
    return flat


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
    record = {**_flatten(dict(run.config)), **summary}
    state = getattr(run, "state", "finished")
    record["status"] = summary.get("status", _WANDB_STATUS.get(state, "missing"))
    if record["status"] != "completed" and not isinstance(summary.get("error"), str):
        record["error"] = f"wandb run state {state!r}"
    record["run_dir"] = "/".join(run.path)
    record.setdefault("variant", record.get("config/variant", math.nan))
    record.setdefault("seed", record.get("config/seed", math.nan))
    return record


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
    return runs[runs["status"] == "completed"]


def failures(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs that failed or left no results, with their errors."""
    columns = [c for c in ("status", "variant", "seed", "run_dir", "overrides", "error") if c in runs]
    return runs.loc[runs["status"] != "completed", columns]


def load_branch_gradients(runs: pd.DataFrame, keys: Iterable[str] = ("variant", "seed")) -> pd.DataFrame:
    """The branch_gradients.csv of every completed run, concatenated, tagged with ``keys`` and ``run_dir``."""
    frames = []
    for _, run in completed(runs).iterrows():
        path = Path(run["run_dir"]) / GRADIENTS_FILE
        if path.is_file() and path.stat().st_size > 0:
            frame = pd.read_csv(path)
            for key in (*keys, "run_dir"):
                frame[key] = run.get(key, math.nan)
            frames.append(frame)
    if not frames:
        return pd.DataFrame(columns=["step", "layer", "branch", "grad_norm", "share", *keys, "run_dir"])
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

"""Log an analysis (tables and figure files) to a wandb run, offline unless asked otherwise."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import pandas as pd

WANDB_MODES = ("offline", "online", "disabled")


def _flat(table: pd.DataFrame) -> pd.DataFrame:
    frame = table.reset_index()
    if isinstance(frame.columns, pd.MultiIndex):
        frame.columns = [" ".join(str(part) for part in column if part != "") for column in frame.columns]
    return frame.astype(str)


def log_analysis(
    tables: Mapping[str, pd.DataFrame],
    figures: Mapping[str, str | Path],
    project: str = "repablate",
    group: str | None = None,
    mode: str = "offline",
    directory: str | Path | None = None,
) -> str:
    """Log ``tables`` (as wandb Tables) and ``figures`` (image files) to a new run of job type "analysis" in
    ``group`` (the sweep's group, so the analysis sits beside its runs). Returns the run's local directory."""
    if mode not in WANDB_MODES:
        raise ValueError(f"wandb mode must be one of {WANDB_MODES}, got {mode!r}")
    import wandb  # imported here: slow to import, and only this function needs it

    run = wandb.init(
        project=project,
        group=group,
        job_type="analysis",
        mode=mode,
        dir=str(directory) if directory is not None else None,
        reinit="create_new",
    )
    try:
        # wandb Tables want flat string column names and plain values.
        logged = {name: wandb.Table(dataframe=_flat(table)) for name, table in tables.items()}
        logged.update({name: wandb.Image(str(path)) for name, path in figures.items()})
        run.log(logged)
        return str(Path(run.dir).parent) if run.dir else ""
    finally:
        run.finish()

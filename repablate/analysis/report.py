"""One call from collected runs to every table and figure of a sweep, written into one directory."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from repablate.analysis import figures as fig
from repablate.analysis.collect import completed, failures, load_branch_gradients
from repablate.analysis.pooling import group_labels
from repablate.analysis.tables import ablation_table, export_table


def sweep_settings(runs: pd.DataFrame) -> dict[str, Any]:
    """How the sweep asks to be tabulated: the ``analysis.by`` and ``analysis.baseline`` its config set
    (conf/sweep/*.yaml), where every run that has them agrees; an empty dict otherwise."""
    settings: dict[str, Any] = {}
    for key in ("by", "baseline"):
        column = f"config/analysis.{key}"
        values = runs[column].dropna().unique() if column in runs else []
        if len(values) == 1:
            settings[key] = json.loads(values[0]) if key == "by" else str(values[0])
    return settings


@dataclass
class Report:
    """What :func:`write_report` produced: the numeric table, the files, and figures skipped (with why)."""

    table: pd.DataFrame
    files: dict[str, Path] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)


def write_report(
    runs: pd.DataFrame,
    out_dir: str | Path,
    by: Sequence[str] = ("variant",),
    baseline: str | None = None,
    metrics: Sequence[str] | None = None,
    confidence: float = 0.95,
    figure_format: str = "png",
    draw_figures: bool = True,
    pool: Sequence[str] | bool = (),
) -> Report:
    """Build the ablation table from ``runs`` and write it (md, tex, csv), ``runs.csv``, ``failures.csv`` and
    the figures into ``out_dir``. A figure whose data the runs lack is skipped and named in ``skipped``.

    Rows and figure groups never average different configurations unless ``pool`` says so (see
    :func:`~repablate.analysis.ablation_table`); a refusal raises before anything is written."""
    if completed(runs).empty:
        shown = failures(runs)[["status", "run_dir", "error"]].to_string(index=False)
        raise ValueError(f"no completed run to tabulate; {len(runs)} failed or missing:\n{shown}")
    out_dir = Path(out_dir)
    table = ablation_table(runs, metrics=metrics, by=by, baseline=baseline, confidence=confidence, pool=pool)
    report = Report(table=table, files=export_table(table, out_dir, runs=runs))
    if not draw_figures:
        return report
    # Branch gradients are tagged with the table row: one column holding the row label, named after the keys.
    group = ",".join(c.removeprefix("config/") for c in table.attrs["by"])
    labelled = runs.assign(**{group: group_labels(runs, by)})
    drawers = {
        "accuracy_vs_latency": lambda: fig.accuracy_vs_latency(runs, by=by, pool=pool),
        "forms_flops_latency": lambda: fig.forms_comparison(runs, by=by, pool=pool),
        "branch_gradients": lambda: fig.branch_gradient_shares(
            load_branch_gradients(labelled, keys=[group], pool=pool), by=group
        ),
    }
    for name, draw in drawers.items():
        try:
            figure = draw()
        except ValueError as err:  # the runs lack this figure's data: say so, keep the rest
            report.skipped[name] = str(err)
            continue
        report.files[name] = fig.save_figure(figure, out_dir / "figures" / f"{name}.{figure_format}")
    return report

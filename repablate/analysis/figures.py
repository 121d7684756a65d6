"""Seaborn figures of a sweep. Each function returns a matplotlib ``Figure`` built without pyplot, so nothing
depends on an interactive backend and figures render to files (Agg) anywhere; notebooks display them as is.

Figures of runs group them as the ablation table does: ``by`` one or several keys, labels joined by commas, and
runs of different configurations in one group refused unless ``pool`` names what may differ
(:func:`repablate.analysis.pooling.check_pooling`)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from repablate.analysis.collect import completed, resolve_column
from repablate.analysis.pooling import check_pooling, group_labels
from repablate.results import write_atomically

ACCURACY_METRICS = (
    "deploy_form/test/acc",
    "deploy_form/val/acc",
    "val/acc_best",
    "deploy_form/test/map50",
    "deploy_form/val/map50",
)
FORMS = ("train_form", "deploy_form")


def _numeric(
    runs: pd.DataFrame, columns: Sequence[str], by: str | Sequence[str], pool: Sequence[str] | bool
) -> tuple[pd.DataFrame, str]:
    """The completed runs' ``columns`` as numbers and their group label, in a column named after the ``by`` keys
    (returned with the frame), once :func:`check_pooling` has accepted the groups."""
    keys = [by] if isinstance(by, str) else list(by)
    missing = [c for c in columns if c not in runs]
    if missing:
        raise ValueError(f"the runs have no column(s) {missing}; cannot draw this figure")
    group = ",".join(resolve_column(runs, k).removeprefix("config/") for k in keys)
    check_pooling(runs, keys, pool)
    done = completed(runs)
    frame = done[list(columns)].apply(pd.to_numeric, errors="coerce")
    frame[group] = group_labels(done, keys)
    return frame.dropna(subset=list(columns)), group


def pick_accuracy(runs: pd.DataFrame) -> str:
    """The first of :data:`ACCURACY_METRICS` the completed runs report."""
    done = completed(runs)
    for metric in ACCURACY_METRICS:
        if metric in done and pd.to_numeric(done[metric], errors="coerce").notna().any():
            return metric
    raise ValueError(f"the runs report none of the accuracy metrics {list(ACCURACY_METRICS)}")


def accuracy_vs_latency(
    runs: pd.DataFrame,
    accuracy: str | None = None,
    latency: str = "deploy_form/latency_ms",
    by: str | Sequence[str] = "variant",
    pool: Sequence[str] | bool = (),
) -> Figure:
    """Accuracy against deployed latency: each run as a faint point, each group's mean with ±1 std error bars
    on both axes. Groups as the ablation table's rows (``by``, ``pool``: see the module docstring)."""
    accuracy = accuracy or pick_accuracy(runs)
    data, by = _numeric(runs, [latency, accuracy], by, pool)
    order = sorted(data[by].unique())
    palette = dict(zip(order, sns.color_palette(n_colors=len(order)), strict=True))
    fig = Figure(figsize=(6, 4.5), layout="constrained")
    ax = fig.subplots()
    sns.scatterplot(
        data=data, x=latency, y=accuracy, hue=by, hue_order=order, palette=palette, alpha=0.35, ax=ax, legend=False
    )
    stats = data.groupby(by)[[latency, accuracy]].agg(["mean", "std"])
    for group in order:
        s = stats.loc[group]
        ax.errorbar(
            s[(latency, "mean")],
            s[(accuracy, "mean")],
            xerr=s[(latency, "std")],
            yerr=s[(accuracy, "std")],
            fmt="o",
            capsize=4,
            color=palette[group],
            label=group,
        )
    ax.set(xlabel=f"{latency} (lower is better)", ylabel=accuracy, title="Accuracy vs deployed latency (mean ± std)")
    ax.legend(title=by)
    return fig


def forms_comparison(
    runs: pd.DataFrame,
    metrics: Sequence[str] = ("flops", "latency_ms"),
    by: str | Sequence[str] = "variant",
    pool: Sequence[str] | bool = (),
) -> Figure:
    """Training form against deployed form, per group: one panel per metric (e.g. FLOPs, latency), bars are
    means with ±1 std error bars. Groups as the ablation table's rows (``by``, ``pool``: see the module docstring)."""
    columns = [f"{form}/{m}" for m in metrics for form in FORMS]
    data, by = _numeric(runs, columns, by, pool)
    data = data.melt(id_vars=[by], value_vars=columns, var_name="column", value_name="value")
    data[["form", "metric"]] = data["column"].str.split("/", n=1, expand=True)
    fig = Figure(figsize=(5 * len(metrics), 4), layout="constrained")
    axes = fig.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        sns.barplot(
            data=data[data["metric"] == metric],
            x=by,
            y="value",
            hue="form",
            hue_order=FORMS,
            order=sorted(data[by].unique()),
            errorbar="sd",
            ax=ax,
        )
        ax.set(ylabel=metric, title=f"{metric}: training vs deployed form")
    return fig


def branch_gradient_shares(gradients: pd.DataFrame, by: str = "variant") -> Figure:
    """Each branch's share of the gradient norm over training steps, one panel per group; lines are the mean
    over layers and seeds, bands ±1 std."""
    needed = ["step", "branch", "share", by]
    missing = [c for c in needed if c not in gradients]
    if missing or gradients.empty:
        raise ValueError(
            f"no branch gradients to plot (missing columns {missing} or no rows); runs write them "
            "to branch_gradients.csv"
        )
    data = gradients.dropna(subset=["share"]).astype({by: str})
    groups = sorted(data[by].unique())
    branches = list(dict.fromkeys(data["branch"]))
    palette = dict(zip(branches, sns.color_palette(n_colors=len(branches)), strict=True))  # same colour in every panel
    fig = Figure(figsize=(5 * len(groups), 4), layout="constrained")
    axes = fig.subplots(1, len(groups), squeeze=False, sharey=True)[0]
    for ax, group in zip(axes, groups, strict=True):
        sns.lineplot(
            data=data[data[by] == group], x="step", y="share", hue="branch", palette=palette, errorbar="sd", ax=ax
        )
        ax.set(title=f"{by}={group}", ylabel="share of gradient norm")
    return fig


def save_figure(fig: Figure, path: str | Path, dpi: int = 120) -> Path:
    """Render ``fig`` to ``path`` (format from the suffix: png, pdf, svg), atomically."""
    path = Path(path)
    return write_atomically(path, lambda stream: fig.savefig(stream, format=path.suffix[1:] or None, dpi=dpi))

"""repablate.analysis -- ablation tables and figures from results files; never imports training code.

runs = collect_runs("multirun/article")            # or collect_wandb("entity/project", group="article")
table = ablation_table(runs, baseline="plain")      # rows by variant, (metric, statistic) columns; against
                                                    # plain: Welch, paired by seed, Holm, Hedges' g, MDE
print(to_markdown(table, runs))                     # runs left out (failed, diverged, ...) listed by status
write_report(runs, "out/", baseline="plain")        # table.{md,tex,csv}, runs.csv, failures.csv, figures/
"""

from repablate.analysis.collect import (
    STATUSES,
    collect_runs,
    collect_wandb,
    completed,
    failures,
    find_run_dirs,
    load_branch_gradients,
    read_run,
    resolve_column,
    status_counts,
    tidy,
)
from repablate.analysis.figures import accuracy_vs_latency, branch_gradient_shares, forms_comparison, save_figure
from repablate.analysis.pooling import BOOKKEEPING_KEYS, PoolingError, check_pooling, group_labels, is_bookkeeping
from repablate.analysis.report import Report, sweep_settings, write_report
from repablate.analysis.stats import (
    Comparison,
    PairedComparison,
    Summary,
    compare,
    compare_paired,
    hedges_correction,
    hedges_g,
    holm,
    minimum_detectable_effect,
    pair_by_seed,
    summarize,
)
from repablate.analysis.tables import (
    DEFAULT_METRICS,
    ablation_table,
    code_versions,
    comparison_note,
    default_metrics,
    export_table,
    failures_markdown,
    flat_columns,
    format_deltas,
    format_table,
    to_latex,
    to_markdown,
)
from repablate.analysis.wandb_log import log_analysis

__all__ = [
    "BOOKKEEPING_KEYS",
    "DEFAULT_METRICS",
    "STATUSES",
    "Comparison",
    "PairedComparison",
    "PoolingError",
    "Report",
    "Summary",
    "ablation_table",
    "accuracy_vs_latency",
    "branch_gradient_shares",
    "check_pooling",
    "collect_runs",
    "code_versions",
    "collect_wandb",
    "compare",
    "compare_paired",
    "comparison_note",
    "completed",
    "default_metrics",
    "export_table",
    "failures",
    "failures_markdown",
    "find_run_dirs",
    "flat_columns",
    "format_deltas",
    "format_table",
    "forms_comparison",
    "group_labels",
    "hedges_correction",
    "hedges_g",
    "holm",
    "is_bookkeeping",
    "load_branch_gradients",
    "log_analysis",
    "minimum_detectable_effect",
    "pair_by_seed",
    "read_run",
    "resolve_column",
    "save_figure",
    "status_counts",
    "summarize",
    "sweep_settings",
    "tidy",
    "to_latex",
    "to_markdown",
    "write_report",
]

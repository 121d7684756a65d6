"""``python -m repablate.analysis SWEEP_DIR [--baseline plain] [--out DIR]``: tables and figures of a sweep.

Reads every run under SWEEP_DIR (or a wandb project with --from-wandb), prints the ablation table and the jobs
left out of it by status (failed, diverged, interrupted, missing, invalid), and writes table.{md,tex,csv},
runs.csv, failures.csv and figures/ into --out (default SWEEP_DIR/analysis). A row averages the seeds of one
configuration: runs that differ in anything else are refused, naming the keys; group by them (--by) or pool them
on purpose (--pool KEY, --pool-all). Against the baseline, each row gets Welch's t-test and, on the seeds it
shares with the baseline, a paired t-test; the p of the row's test Holm-adjusted across the rows, Hedges' g, and
the minimum detectable effect at 80% power.

Exit status: 0 when the table was written, even if some jobs did not complete (they are listed, and counted in
the last line); 2 when nothing was written: bad arguments, no runs, no completed run, an unknown column or
baseline, or rows that would average different configurations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from repablate.analysis.collect import collect_runs, collect_wandb, failures
from repablate.analysis.report import sweep_settings, write_report
from repablate.analysis.tables import flat_columns, left_out_summary, to_markdown
from repablate.analysis.wandb_log import WANDB_MODES, log_analysis


def _split_keys(values: list[str] | None) -> list[str] | None:
    """Keys given separately or comma-separated (--by variant,optimizer.lr, as the pooling error suggests them)."""
    return [key for value in values for key in value.split(",") if key] if values else values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m repablate.analysis", description=__doc__.split("\n\n")[1])
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="a sweep (or run) directory holding results.json files")
    parser.add_argument(
        "--from-wandb", metavar="ENTITY/PROJECT", help="collect runs from wandb instead (needs a login)"
    )
    parser.add_argument("--group", help="with --from-wandb: only this wandb group (a sweep)")
    parser.add_argument(
        "--baseline",
        help="the row to compare against, e.g. plain (several --by keys: 'plain,0.01'); "
        "default: the sweep config's analysis.baseline, else none",
    )
    parser.add_argument(
        "--by",
        nargs="+",
        metavar="KEY",
        help="columns or config keys to group runs by, e.g. "
        "variant,lr_scale or variant lr_scale; default: the sweep config's analysis.by, else variant",
    )
    pooling = parser.add_mutually_exclusive_group()
    pooling.add_argument(
        "--pool",
        nargs="+",
        metavar="KEY",
        help="config keys a row may average over on purpose, "
        "e.g. optimizer.lr or 'model.*' (default: none; a row holds the seeds of one configuration)",
    )
    pooling.add_argument(
        "--pool-all",
        action="store_true",
        help="let rows average runs of any configurations (the table notes what differed)",
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        metavar="METRIC",
        help="metric columns (default: the accuracy, latency, size ones present)",
    )
    parser.add_argument(
        "--confidence", type=float, default=0.95, help="confidence level of the intervals (default 0.95)"
    )
    parser.add_argument("--out", type=Path, help="output directory (default: SWEEP_DIR/analysis)")
    parser.add_argument("--format", default="png", choices=["png", "pdf", "svg"], help="figure file format")
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    parser.add_argument(
        "--wandb",
        nargs="?",
        const="offline",
        choices=WANDB_MODES,
        metavar="MODE",
        help="also log tables and figures to a wandb run (MODE offline by default, or online)",
    )
    parser.add_argument("--wandb-project", default="repablate", help="wandb project to log the analysis to")
    args = parser.parse_args(argv)
    args.by, args.pool = _split_keys(args.by), _split_keys(args.pool)
    if (args.sweep_dir is None) == (args.from_wandb is None):
        parser.error("give either SWEEP_DIR or --from-wandb ENTITY/PROJECT (exactly one)")
    if args.out is None:
        if args.sweep_dir is None:
            parser.error("--out is required with --from-wandb")
        args.out = args.sweep_dir / "analysis"
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the analysis; returns the exit status."""
    args = parse_args(argv)
    try:
        runs = collect_wandb(args.from_wandb, args.group) if args.from_wandb else collect_runs(args.sweep_dir)
        settings = sweep_settings(runs) if args.by is None else {}
        by = args.by or settings.get("by", ["variant"])
        baseline = args.baseline if args.baseline is not None else settings.get("baseline")
        report = write_report(
            runs,
            args.out,
            by=by,
            baseline=baseline,
            metrics=args.metrics,
            confidence=args.confidence,
            figure_format=args.format,
            draw_figures=not args.no_figures,
            pool=True if args.pool_all else args.pool or (),
        )
    except (FileNotFoundError, LookupError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_markdown(report.table, runs))
    for name, why in report.skipped.items():
        print(f"figure {name} skipped: {why}", file=sys.stderr)
    if args.wandb:
        group = args.group or (args.sweep_dir.resolve().name if args.sweep_dir else None)
        figures = {k: v for k, v in report.files.items() if v.suffix in (".png", ".svg")}
        where = log_analysis(
            {"ablation_table": flat_columns(report.table)},
            figures,
            project=args.wandb_project,
            group=group,
            mode=args.wandb,
            directory=args.out,
        )
        print(f"logged to wandb ({args.wandb}): {where}")
    n_left_out = len(failures(runs))
    counts = f" ({left_out_summary(runs)})" if n_left_out else ""
    print(f"{len(runs) - n_left_out} completed, {n_left_out} failed or missing{counts}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

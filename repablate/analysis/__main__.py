"""``python -m repablate.analysis SWEEP_DIR [--baseline plain] [--out DIR]``: tables and figures of a sweep.

Reads every run under SWEEP_DIR (or a wandb project with --from-wandb), prints the ablation table and any
failed or missing jobs, and writes table.{md,tex,csv}, runs.csv, failures.csv and figures/ into --out
(default SWEEP_DIR/analysis). Exits 0 when a table was built, even if some jobs failed (they are listed).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from repablate.analysis.collect import collect_runs, collect_wandb, failures
from repablate.analysis.report import sweep_settings, write_report
from repablate.analysis.tables import flat_columns, to_markdown
from repablate.analysis.wandb_log import WANDB_MODES, log_analysis


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; see the module docstring."""
    parser = argparse.ArgumentParser(prog="python -m repablate.analysis", description=__doc__.split("\n\n")[1])
    parser.add_argument("sweep_dir", nargs="?", type=Path, help="a sweep (or run) directory holding results.json files")
    parser.add_argument("--from-wandb", metavar="ENTITY/PROJECT", help="collect runs from wandb instead (needs a login)")
    parser.add_argument("--group", help="with --from-wandb: only this wandb group (a sweep)")
    parser.add_argument("--baseline", help="the row to compare against, e.g. plain (several --by keys: 'plain,0.01'); "
                        "default: the sweep config's analysis.baseline, else none")
    parser.add_argument("--by", nargs="+", metavar="KEY", help="columns or config keys to group runs by, e.g. variant lr_scale; "
                        "default: the sweep config's analysis.by, else variant")
    parser.add_argument("--metrics", nargs="+", metavar="METRIC", help="metric columns (default: the accuracy, latency, size ones present)")
    parser.add_argument("--confidence", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    parser.add_argument("--out", type=Path, help="output directory (default: SWEEP_DIR/analysis)")
    parser.add_argument("--format", default="png", choices=["png", "pdf", "svg"], help="figure file format")
    parser.add_argument("--no-figures", action="store_true", help="tables only")
    parser.add_argument("--wandb", nargs="?", const="offline", choices=WANDB_MODES, metavar="MODE",
                        help="also log tables and figures to a wandb run (MODE offline by default, or online)")
    parser.add_argument("--wandb-project", default="repablate", help="wandb project to log the analysis to")
    args = parser.parse_args(argv)
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
        report = write_report(runs, args.out, by=by, baseline=baseline, metrics=args.metrics,
                              confidence=args.confidence, figure_format=args.format, draw_figures=not args.no_figures)
    except (FileNotFoundError, LookupError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(to_markdown(report.table, runs))
    for name, why in report.skipped.items():
        print(f"figure {name} skipped: {why}", file=sys.stderr)
    if args.wandb:
        group = args.group or (args.sweep_dir.resolve().name if args.sweep_dir else None)
        figures = {k: v for k, v in report.files.items() if v.suffix in (".png", ".svg")}
        where = log_analysis({"ablation_table": flat_columns(report.table)}, figures, project=args.wandb_project,
                             group=group, mode=args.wandb, directory=args.out)
        print(f"logged to wandb ({args.wandb}): {where}")
    n_failed = len(failures(runs))
    print(f"{len(runs) - n_failed} completed, {n_failed} failed or missing; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

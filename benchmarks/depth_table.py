"""The depth sweep's tables: at each depth multiplier, every variant against plain at that depth.

    python benchmarks/depth_table.py multirun/depth/<dir> [--metric deploy_form/test/acc] [--baseline plain]

``python -m repablate.analysis multirun/depth/<dir>`` tabulates the whole sweep in one table (rows variant,depth)
against one baseline row (plain at depth 4). This script runs the same analysis (repablate.analysis) once per depth,
so each row is compared with plain at its own depth, paired by seed, Holm-adjusted across that depth's rows, and
prints first a summary (one line per variant, one column per depth), then each depth's full table.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from repablate.analysis import ablation_table, collect_runs, resolve_column, to_markdown

DEPTH = "model.depth_multiplier"


def _cell(table, row: str, metric: str, baseline: str) -> str:
    t = table.loc[row, metric]
    text = f"{t['mean']:.3f} ± {t['std']:.3f}"
    if row == baseline:
        return text
    paired = math.isfinite(t.get("p_paired", math.nan))
    delta = t["delta_paired"] if paired else t["delta"]
    p = t["p_paired"] if paired else t["p_value"]
    holm = t.get("p_holm", math.nan)
    return f"{text} (Δ {delta:+.3f}, p={p:.2g}, Holm {holm:.2g})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--metric", default="deploy_form/test/acc")
    parser.add_argument("--baseline", default="plain")
    args = parser.parse_args()
    runs = collect_runs(args.sweep_dir)
    column = resolve_column(runs, DEPTH)
    depths = sorted(runs[column].dropna().unique())
    tables = {}
    for depth in depths:
        subset = runs[runs[column] == depth]
        tables[depth] = ablation_table(subset, metrics=[args.metric], by=["variant"], baseline=args.baseline)
    variants = list(tables[depths[0]].index)
    label = "x" + ", x".join(f"{d:g}" for d in depths)
    print(f"**{args.metric}, mean ± std over seeds; against {args.baseline} at the same depth (paired by seed)**\n")
    print("| variant | " + " | ".join(f"depth x{d:g}" for d in depths) + " |")
    print("|---|" + "---|" * len(depths))
    for variant in variants:
        cells = [_cell(tables[d], variant, args.metric, args.baseline) for d in depths]
        print(f"| {variant} | " + " | ".join(cells) + " |")
    print(f"\n(depth multipliers {label})")
    for depth in depths:
        print(f"\n### depth multiplier {depth:g}\n")
        print(to_markdown(tables[depth], runs[runs[column] == depth]))


if __name__ == "__main__":
    main()

"""Which runs one table row may average: replicates, runs that differ in nothing but their seed.

A row of an ablation table (and a group of a figure) is a mean over seeds of one configuration. Runs grouped
into one row that differ in any other config key (``config/<key>`` columns, and the run's ``variant``) are
refused with the keys and values that differ: group by those keys too (``by``), or name them in ``pool`` to
average them on purpose. Keys that differ between seeds of one configuration without changing what is trained or
measured are listed, with why, in :data:`BOOKKEEPING_KEYS` and never compared.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from fnmatch import fnmatchcase

import pandas as pd

from repablate.analysis.collect import completed, resolve_column

# Config keys (results.json's "config/<key>" without the prefix; fnmatch patterns) that are never compared, each
# with why. They were read off real runs: the keys that differ between two seeds of one configuration, plus keys
# that only say where things are written or how they are shown.
BOOKKEEPING_KEYS: dict[str, str] = {
    "seed": "the replicate itself",
    "data.seed": "follows the run's seed (${seed}): the data order of a replicate",
    "paths.*": "where the run writes (its directory) and where the data lives on this machine",
    "trainer.default_root_dir": "the run directory",
    "ckpt_path": "the checkpoint a resumed run continues from; the configuration it continues is the same",
    "callbacks.*.dirpath": "the checkpoint directory, inside the run directory",
    "callbacks.*.csv_path": "a file inside the run directory",
    "callbacks.*.checkpoint_path": "a file inside the run directory",
    "callbacks.progress_bar.*": "the console progress bar: display only",
    "logger.*": "loggers record a run and never change it: names and groups (from variant and seed), save "
    "directories, online or offline, or no wandb logger at all",
    "data.cache_dir": "where generated data is cached on this machine",
    "data.report_path": "the dataset check's report, a file inside the run directory",
    "hydra.*": "Hydra's own settings: output directories, job number, launcher",
    "analysis.*": "how the analysis tabulates the sweep, not how a run trains",
}
ABSENT = "<absent>"  # the value shown for a key that some runs of a row lack
_SHOWN_ROWS, _SHOWN_KEYS = 5, 8  # the error names this many rows and keys; the rest are counted


def is_bookkeeping(key: str) -> bool:
    """Whether the config key ``key`` (``optimizer.lr``, no ``config/``) matches :data:`BOOKKEEPING_KEYS`."""
    return any(fnmatchcase(key, pattern) for pattern in BOOKKEEPING_KEYS)


class PoolingError(ValueError):
    """Runs that differ in more than their seed would be averaged into one row. ``differing``: each such config
    key and its values (as text); ``by`` and the message say how to group or pool them instead."""

    def __init__(self, message: str, differing: dict[str, list[str]]):
        super().__init__(message)
        self.differing = differing


def _text(value: object) -> str:
    # A seed read as float (its column had a gap) still reads "1", not "1.0"; a lr of 1000.0 reads "1000".
    if value is None or (isinstance(value, float) and value != value):
        return ABSENT
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def row_label(key: object) -> str:
    """A row label from its ``by`` values: a tuple joined by commas, one value as text."""
    return ",".join(map(_text, key)) if isinstance(key, tuple) else _text(key)


def group_labels(runs: pd.DataFrame, by: Sequence[str]) -> pd.Series:
    """Each run's row label in :func:`~repablate.analysis.ablation_table` (its ``by`` values joined by commas)."""
    columns = [resolve_column(runs, c) for c in by]
    if runs.empty:
        return pd.Series(index=runs.index, dtype=str)
    if not columns:  # no grouping: every run in one group
        return pd.Series("all runs", index=runs.index, dtype=str)
    return runs[columns].apply(lambda row: row_label(tuple(row)), axis=1).astype(str)


def _key(column: str) -> str:
    return column.removeprefix("config/")


def _pool_patterns(runs: pd.DataFrame, pool: Sequence[str] | bool) -> list[str]:
    """The keys (fnmatch patterns) that ``pool`` allows to differ within a row; ["*"] for ``pool=True``.
    A plain name must be a column or config key (a typo is an error, not a silent no-op); a pattern must match."""
    if pool is True:
        return ["*"]
    if isinstance(pool, str):
        pool = [pool]
    patterns = []
    for name in pool or ():
        if any(c in name for c in "*?["):
            pattern = _key(name)
            if not any(fnmatchcase(_key(str(c)), pattern) for c in runs.columns):
                raise ValueError(f"pool pattern {name!r} matches no config key of the runs")
            patterns.append(pattern)
        else:
            patterns.append(_key(resolve_column(runs, name)))
    return patterns


def _compared_columns(runs: pd.DataFrame, by_columns: Sequence[str]) -> list[str]:
    """The configuration of a run: its config keys and its variant, less the bookkeeping and the ``by`` keys
    (grouping by ``variant`` also covers ``config/variant``, and the other way round)."""
    grouped = {_key(c) for c in by_columns}
    return [
        c
        for c in map(str, runs.columns)
        if (c.startswith("config/") or c == "variant") and _key(c) not in grouped and not is_bookkeeping(_key(c))
    ]


def _sort_values(values: Sequence[str]) -> list[str]:
    def order(text: str) -> tuple:
        try:
            return (text == ABSENT, 0, float(text), text)
        except ValueError:
            return (text == ABSENT, 1, 0.0, text)

    return sorted(values, key=order)


def mixed_rows(runs: pd.DataFrame, by: Sequence[str]) -> dict[str, dict[str, Counter]]:
    """The rows (by label) of the completed runs grouped by ``by`` whose runs differ in a compared config key:
    for each, key -> how many runs have each value (as text). Empty when every row holds one configuration."""
    done = completed(runs)
    by_columns = [resolve_column(runs, c) for c in by]
    columns = _compared_columns(done, by_columns)
    if done.empty or not columns:
        return {}
    labels = group_labels(done, by)
    texts = done[columns].map(_text)
    distinct = texts.groupby(labels, sort=True).nunique()
    mixed: dict[str, dict[str, Counter]] = {}
    for label, row in distinct.iterrows():
        for column in row.index[row > 1]:
            key = _key(column)  # "variant" and "config/variant" are one key: the first found speaks for both
            mixed.setdefault(str(label), {}).setdefault(key, Counter(texts.loc[labels == label, column]))
    return mixed


def _describe(row: str, keys: dict[str, Counter]) -> str:
    n_runs = sum(next(iter(keys.values())).values())
    shown = [
        f"{key} = " + " | ".join(f"{v} ({counts[v]} run{'s' * (counts[v] != 1)})" for v in _sort_values(counts))
        for key, counts in list(keys.items())[:_SHOWN_KEYS]
    ]
    more = f"; and {len(keys) - _SHOWN_KEYS} more keys" if len(keys) > _SHOWN_KEYS else ""
    return f"  row {row!r} ({n_runs} runs): " + "; ".join(shown) + more


def check_pooling(runs: pd.DataFrame, by: Sequence[str], pool: Sequence[str] | bool = ()) -> dict[str, list[str]]:
    """Refuse to average runs of different configurations into one row of ``by``.

    Compares the completed runs within each row on every config key (and ``variant``) except the ``by`` keys and
    :data:`BOOKKEEPING_KEYS`. A differing key not named in ``pool`` (column or config key names, or fnmatch
    patterns such as ``model.*``; ``True`` pools anything) raises :class:`PoolingError`, which names the rows,
    the keys and their values, and says how to group or pool them. Returns the keys that did differ and were
    pooled on purpose, with their values, so that a table can say what it averaged.
    """
    patterns = _pool_patterns(runs, pool)
    mixed = mixed_rows(runs, by)
    refused = {
        row: {k: c for k, c in keys.items() if not any(fnmatchcase(k, p) for p in patterns)}
        for row, keys in mixed.items()
    }
    refused = {row: keys for row, keys in refused.items() if keys}
    if refused:
        differing = _union(refused)
        rows = [_describe(row, keys) for row, keys in list(refused.items())[:_SHOWN_ROWS]]
        if len(refused) > _SHOWN_ROWS:
            rows.append(f"  and {len(refused) - _SHOWN_ROWS} more rows")
        grouped = [_key(resolve_column(runs, c)) for c in by]
        split = [*grouped, *(k for k in differing if k not in grouped)]
        raise PoolingError(
            "runs that differ in more than their seed would be averaged into one row:\n" + "\n".join(rows) + "\n"
            f"Give each configuration its own row: --by {','.join(split)} (Python: by={split!r}); "
            f"or average them on purpose: --pool {','.join(differing)} (Python: pool={list(differing)!r}).",
            differing,
        )
    return _union(mixed)


def _union(rows: dict[str, dict[str, Counter]]) -> dict[str, list[str]]:
    """Each key that differs in some row, with all its values there, in a stable order."""
    values: dict[str, set[str]] = {}
    for keys in rows.values():
        for key, counts in keys.items():
            values.setdefault(key, set()).update(counts)
    return {key: _sort_values(list(found)) for key, found in values.items()}

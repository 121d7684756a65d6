"""What a run prints: each log line once (Hydra's handlers: the console and main.log), no vendor tips, no warnings
from dependencies about their own internals, and at the end one short summary of the run (``run_summary``).

Everything is filtered at its source, by logger or module and message, so that any other line still shows.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

from repablate.results import DIVERGED


class _DropMessages(logging.Filter):
    """Drops the records of one logger whose message starts with one of ``starts``."""

    def __init__(self, *starts: str):
        super().__init__()
        self.starts = starts

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.starts)


# Lightning's advertisement for its hosted logger, on every Trainer that has none of it.
_LIGHTNING_TIP = _DropMessages("💡 Tip:")
# torch finds a CUDA toolkit but no GPU when torch.utils.benchmark loads torch.utils.cpp_extension; no extension is
# ever compiled here.
_NO_CUDA_RUNTIME = _DropMessages("No CUDA runtime is found")


def quiet_console() -> None:
    """Set up the process's console for a run: once per process is enough, and more calls change nothing.

    - Lightning adds its own stderr handler to the ``lightning`` logger, which also propagates to the root logger.
      When the root has handlers (Hydra's console and main.log, in a run), Lightning's are removed, so each line is
      shown once and still lands in main.log; without them (a run started from plain Python) Lightning's stay.
    - Lightning's tip and torch's CUDA-runtime notice are dropped at their loggers.
    - Warnings: two that the harness causes on purpose (below) and one that a dependency raises about another.
    """
    import lightning  # noqa: F401 -- adds its console handler on import; it must be there to be removed

    if logging.getLogger().hasHandlers():
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            logger = logging.getLogger(name)
            for handler in list(logger.handlers):
                if type(handler) is logging.StreamHandler:  # Lightning's own; Hydra's are on the root logger
                    logger.removeHandler(handler)
            logger.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).addFilter(_LIGHTNING_TIP)  # addFilter adds a filter once
    logging.getLogger("torch.utils.cpp_extension").addFilter(_NO_CUDA_RUNTIME)

    # metrics.csv is written into the run directory, which already holds Hydra's .hydra/ and main.log (the CSV
    # logger never deletes anything there).
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    # An epoch shorter than the logging interval (the digits' 9 batches, 10 steps): step logging continues across
    # epochs, as intended.
    warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging")
    # Lightning 2.6 builds torch's LeafSpec, deprecated in recent torch; nothing a user can act on.
    warnings.filterwarnings(
        "ignore",
        message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


def quiet_wandb(loggers: Iterable[Any]) -> None:
    """Lightning's WandbLogger always hands ``anonymous`` to ``wandb.init`` (None unless asked for), which wandb,
    since it dropped anonymous mode, answers with "The anonymous setting has no effect"; the argument is removed
    where it is None. wandb's own console output is set in conf/logger/default.yaml (``settings``)."""
    for logger in loggers:
        init_arguments = getattr(logger, "_wandb_init", None)
        if isinstance(init_arguments, dict) and init_arguments.get("anonymous", 0) is None:
            del init_arguments["anonymous"]


# --- the summary at the end of a run -----------------------------------------------------------------------------

_METRIC_NAMES = {"acc": "accuracy", "map50": "mAP@0.5", "map": "mAP@0.5:0.95"}
_COSTS = (("params", "params", "{:,.0f}"), ("flops", "FLOPs", None), ("latency_ms", "latency ms", "{:.3g}"))


def _si(value: float) -> str:
    for factor, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {unit}"
    return f"{value:.3g}"


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


def run_summary(record: Mapping[str, Any], results_path: Any) -> str:
    """A few lines on the run of ``record`` (results.json's fields), the path of its results.json last:

    variant, seed, status and wall time; for a run that got that far, the test metrics of the training and the
    deployed form, params, FLOPs and latency of both forms with their ratio, and the equivalence error.
    """
    status = record.get("status")
    head = f"{record.get('variant')} seed {record.get('seed')}: {status}"
    if status == DIVERGED and record.get("diverged_at_step") is not None:
        head += f" at step {record['diverged_at_step']}"
    if _number(record.get("wall_time_s")):
        head += f" in {record['wall_time_s']:.1f} s"
    lines = [head]  # the error, if any, is logged just before: not repeated here
    rows = []
    names = [key.removeprefix("train_form/test/") for key in record if key.startswith("train_form/test/")]
    for name in sorted(names, key=lambda name: (list(_METRIC_NAMES) + [name]).index(name)):  # known ones first
        trained, deployed = record[f"train_form/test/{name}"], record.get(f"deploy_form/test/{name}")
        if _number(trained) and _number(deployed):
            rows.append((f"test {_METRIC_NAMES.get(name, name)}", f"{trained:.4f}", f"{deployed:.4f}", ""))
    for key, label, style in _COSTS:
        trained, deployed = record.get(f"train_form/{key}"), record.get(f"deploy_form/{key}")
        if _number(trained) and _number(deployed):
            ratio = record.get(f"ratio/{key}")
            show = style.format if style else _si
            rows.append((label, show(trained), show(deployed), f"{ratio:.2f}x" if _number(ratio) else ""))
    if rows:
        rows.insert(0, ("", "training form", "deployed", "ratio"))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for label, *cells in rows:
            cells = [cell.rjust(width) for cell, width in zip(cells, widths[1:], strict=True)]
            lines.append("  ".join(["", label.ljust(widths[0]), *cells]).rstrip())
    if _number(record.get("equivalence/max_rel")):
        error = f"  equivalence: max relative error {record['equivalence/max_rel']:.1e}"
        if _number(record.get("equivalence/max_abs")):
            error += f" (max abs {record['equivalence/max_abs']:.1e})"
        lines.append(error)
    lines.append(f"  results: {results_path}")
    return "\n".join(lines)

"""The files a run leaves behind, as one schema that the writer (``repablate.train``) and the reader
(``repablate.analysis``) both import: file names, results.json's statuses and fields, ``flatten`` (how the config
becomes ``config/<dotted.key>`` fields), and the one atomic writer every module writes its files with.

Standard library only, and nothing from repablate: any layer may import it.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, BinaryIO

# --- the run directory ----------------------------------------------------------------------------------------------

RESULTS_FILE = "results.json"  # one flat record per run, written atomically, also when the run does not complete
METRICS_FILE = "metrics.csv"  # Lightning's CSV logger: every logged metric by step and epoch
GRADIENTS_FILE = "branch_gradients.csv"  # BranchGradientMonitor: one row per (check, layer, branch)
GRADIENT_COLUMNS = ("step", "layer", "branch", "grad_norm", "share")
CHECKPOINTS_DIR = "checkpoints"  # last.ckpt, best-<epoch>.ckpt, deploy.pt
DEPLOY_CHECKPOINT = "deploy.pt"  # in CHECKPOINTS_DIR: {"state_dict", "config", "deploy": True}
# What a run writes into its directory (Hydra's .hydra/ and main.log are there before the run starts): a directory
# holding any of these holds a run, and is never reused.
RUN_FILES = (RESULTS_FILE, METRICS_FILE, GRADIENTS_FILE, CHECKPOINTS_DIR)
# In a sweep's directory, written when the sweep starts: {"jobs": [{"num": 0, "overrides": ["seed=0", ...]}, ...]}.
SWEEP_JOBS_FILE = "sweep_jobs.json"

# --- results.json ---------------------------------------------------------------------------------------------------

# The status a run writes (docs/FAILURE_MODES.md) ...
COMPLETED, FAILED, DIVERGED, INTERRUPTED = "completed", "failed", "diverged", "interrupted"
RUN_STATUSES = (COMPLETED, FAILED, DIVERGED, INTERRUPTED)
# ... and the two only the analysis assigns: a job that left no readable results.json (or never started), and a
# results.json that breaks this contract. STATUSES is also the order in which runs left out are listed.
MISSING, INVALID = "missing", "invalid"
STATUSES = (*RUN_STATUSES, MISSING, INVALID)

# The fields that describe the run itself; besides them results.json holds the figures (train_form/..., deploy_form/...,
# ratio/..., equivalence/..., onnx/..., int8/..., grad/..., the last logged metrics), the option chosen in every config
# group under CHOICE_PREFIX and the resolved config under CONFIG_PREFIX. A run that stops before training has no
# epochs, global_step or device yet.
RUN_FIELDS = (
    "status",
    "error",
    "diverged_at_step",
    "variant",
    "seed",
    "task",
    "run_dir",
    "started_at",
    "finished_at",
    "wall_time_s",
    "git_commit",
    "torch_version",
    "device",
    "epochs",
    "global_step",
)
CONFIG_PREFIX = "config/"
# The option Hydra composed in each config group (its runtime choices, Hydra's own hydra/* groups left out):
# choice/block, choice/init, choice/model, choice/data, choice/optimizer, choice/scheduler, choice/task,
# choice/trainer, choice/callbacks, choice/logger, choice/paths, choice/variant (null without +variant), and
# choice/sweep, choice/launcher, choice/experiment when chosen. What ran, by name, whatever the run is called.
CHOICE_PREFIX = "choice/"


def flatten(config: Mapping[str, Any], prefix: str = CONFIG_PREFIX) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` -> ``{"config/a.b": 1}``. Lists become JSON strings, so every value is a scalar."""
    flat: dict[str, Any] = {}

    def walk(node: Mapping[str, Any], path: str) -> None:
        for key, value in node.items():
            dotted = f"{path}.{key}" if path else str(key)
            if isinstance(value, Mapping):
                walk(value, dotted)
            elif isinstance(value, (list, tuple)):
                flat[prefix + dotted] = json.dumps(value)
            else:
                flat[prefix + dotted] = value

    walk(config, "")
    return flat


# --- writing --------------------------------------------------------------------------------------------------------


def write_atomically(path: str | os.PathLike, content: bytes | str | Callable[[BinaryIO], Any]) -> Path:
    """Write ``path`` so that a reader finds the old file or the new one, never part of one, and a crash leaves
    no half-written file: into a temporary file beside ``path`` (same directory, so same file system), flushed
    and fsynced, then renamed over ``path`` with ``os.replace``. On any error the temporary file is removed and
    ``path`` is left as it was. Returns ``path``.

    ``content``: bytes; text (written as UTF-8); or a callback that writes to the open binary stream, e.g.
    ``lambda stream: torch.save(obj, stream)`` or ``lambda stream: fig.savefig(stream, format="png")``.
    The file is readable by everyone (0644), as files written with ``open`` usually are.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            if callable(content):
                content(stream)
            else:
                stream.write(content.encode("utf-8") if isinstance(content, str) else content)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, 0o644)  # mkstemp creates it private to its owner
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
    return path


def write_json(path: str | os.PathLike, value: Any) -> Path:
    """``value`` as strict JSON (sorted keys), written atomically: NaN and infinity become null (JSON has neither),
    tuples become lists, and objects JSON cannot hold (paths, devices, ...) become their ``str``."""
    return write_atomically(path, json.dumps(_json_safe(value), indent=1, sort_keys=True, allow_nan=False))


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return str(value)

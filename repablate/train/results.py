"""results.json: one flat record per run, written atomically, read by repablate.analysis; and a sweep's
sweep_jobs.json, the jobs it set out to run (docs/FAILURE_MODES.md)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

RESULTS_FILE = "results.json"
SWEEP_JOBS_FILE = "sweep_jobs.json"  # in a sweep's directory: {"jobs": [{"num": 0, "overrides": [...]}, ...]}


def flatten(config: Mapping[str, Any], prefix: str = "config/") -> dict[str, Any]:
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


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None  # strict JSON has no NaN or infinity
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    return str(value)


def write_json_atomically(record: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Write ``record`` as JSON to a temporary file beside ``path``, then rename it into place, so a reader
    never sees a half-written file. NaN and infinity become null; lists and dicts are kept, other objects become
    their ``str``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w") as stream:
            json.dump(_json_safe(record), stream, indent=1, sort_keys=True)
            stream.flush()
            os.fsync(stream.fileno())
        os.chmod(temp, 0o644)  # mkstemp creates it private; results are for everyone who can read the run dir
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def git_commit(directory: str | os.PathLike) -> str | None:
    """The commit checked out at ``directory``, with "-dirty" if tracked files changed; None outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit

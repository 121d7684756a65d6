"""What a run refuses before it starts: a configuration value that cannot work (``validate``), a checkpoint it
cannot resume from (``check_resume_checkpoint``), and a run or sweep directory that already holds one.

Each refusal is a ``ConfigError`` naming the value and what is allowed (docs/FAILURE_MODES.md).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from repablate.results import RUN_FILES, SWEEP_JOBS_FILE

MAX_SEED = 2**32 - 1  # numpy's seed range, which seed_everything enforces
SWEEP_FILES = ("multirun.yaml", SWEEP_JOBS_FILE)  # what a started sweep has written into its directory


class ConfigError(ValueError):
    """A configuration value that cannot work, found before training starts."""


class RunDirectoryInUse(ConfigError):
    """The run (or sweep) directory already holds a run: it is never reused."""


def _is_number(value: Any) -> bool:
    """A finite int or float; bools are ints to Python but never a sensible number here."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate(cfg: DictConfig) -> None:
    """Reject values that would only fail (or silently misbehave) later, naming the value and what is allowed."""
    seed = cfg.get("seed")
    if not (_is_integer(seed) and 0 <= seed <= MAX_SEED):
        raise ConfigError(f"seed={seed!r} is not allowed: use an integer from 0 to {MAX_SEED}")
    lr = cfg.optimizer.get("lr")
    if lr is not None and not (_is_number(lr) and lr > 0):
        raise ConfigError(f"optimizer.lr={lr!r} is not allowed: the learning rate must be a positive number")
    if not (_is_number(cfg.lr_scale) and cfg.lr_scale > 0):
        raise ConfigError(f"lr_scale={cfg.lr_scale!r} is not allowed: it must be a positive number")
    epochs = cfg.trainer.get("max_epochs")
    # -1 (Lightning's "no limit") is refused: the per-step learning-rate schedule needs a known number of steps.
    if epochs is not None and not (_is_integer(epochs) and epochs >= 1):
        raise ConfigError(f"trainer.max_epochs={epochs!r} is not allowed: use a positive integer")
    threads = cfg.get("threads")
    if threads is not None and not (_is_integer(threads) and threads >= 1):
        raise ConfigError(f"threads={threads!r} is not allowed: use a positive integer, or null for torch's default")
    for switch in ("channels_last", "compile"):
        if not isinstance(cfg.get(switch, False), bool):
            raise ConfigError(f"{switch}={cfg.get(switch)!r} is not allowed: use true or false")
    root = cfg.data.get("root")
    if root is not None and not cfg.data.get("download", False) and not Path(root).exists():
        raise ConfigError(
            f"data.root={root!r} is not allowed: no such directory (give the dataset's location"
            + (", or data.download=true to fetch it there)" if "download" in cfg.data else ")")
        )
    if cfg.ckpt_path is not None:
        check_resume_checkpoint(cfg.ckpt_path)


def check_resume_checkpoint(path: str) -> None:
    """Refuse, before training, a ``ckpt_path`` that a run cannot resume from: a missing file, one that does not
    load with ``weights_only=True`` (how the run loads it: tensors and plain data only, never code), or one that is
    not a Lightning training checkpoint (e.g. a deploy.pt)."""
    from repablate.train.checkpoints import CheckpointError, read_checkpoint

    if not Path(path).is_file():
        raise ConfigError(f"ckpt_path={path!r} is not allowed: no such checkpoint file")
    try:
        checkpoint = read_checkpoint(path)
    except CheckpointError as error:
        raise ConfigError(f"ckpt_path={path!r} is not allowed: {error}") from None
    if checkpoint.get("deploy") is True:
        raise ConfigError(
            f"ckpt_path={path!r} is not allowed: it is a deploy checkpoint (the fused weights only); "
            "resume from the run's checkpoints/last.ckpt"
        )
    if "pytorch-lightning_version" not in checkpoint or "loops" not in checkpoint:
        raise ConfigError(
            f"ckpt_path={path!r} is not allowed: it is not a Lightning training checkpoint; resume "
            "from a run's checkpoints/last.ckpt"
        )


def check_run_dir_is_new(run_dir: Path) -> None:
    """``RunDirectoryInUse`` if ``run_dir`` already holds a run: a second run there would mix its files (CSV rows,
    checkpoints, results) with the first's."""
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if found:
        raise RunDirectoryInUse(
            f"{run_dir} already holds a run ({', '.join(found)}): a run directory is never reused. To continue that "
            f"run, resume it into a new directory with ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}; to start "
            "over, leave hydra.run.dir at its default or give a new one"
        )


def check_sweep_dir_is_new(sweep_dir: Path) -> None:
    """``RunDirectoryInUse`` if ``sweep_dir`` already holds a sweep (its job directories would be reused)."""
    found = [name for name in SWEEP_FILES if (sweep_dir / name).exists()]
    if found:
        raise RunDirectoryInUse(
            f"{sweep_dir} already holds a sweep ({', '.join(found)}): a sweep directory is never reused; leave "
            "hydra.sweep.dir at its default or give a new one"
        )

"""The main job: ``python -m repablate +variant=NAME [overrides]``.

Composes conf/ with Hydra, trains the model in its multi-branch form with Lightning, fuses it and proves the
fused form equivalent (DeployCheck), measures both forms and writes results.json into the run directory.
Heavy imports (torch, lightning, wandb) happen inside ``run`` so that ``--cfg job`` and ``--help`` are quick.
"""

from __future__ import annotations

import inspect
import logging
import secrets
import time
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

import repablate
from repablate.paths import conf_dir
from repablate.train.results import RESULTS_FILE, flatten, git_commit, write_json_atomically

log = logging.getLogger(__name__)

DATA_SHAPE_KEYS = ("num_classes", "in_channels", "image_size")


class ConfigError(ValueError):
    """A configuration value that cannot work, found before training starts."""


def register_resolvers() -> None:
    """``${repablate.unique:}``: a random suffix, fixed for the process (cached), that keeps run dirs apart."""
    if not OmegaConf.has_resolver("repablate.unique"):
        OmegaConf.register_new_resolver("repablate.unique", lambda: secrets.token_hex(4), use_cache=True)


def validate(cfg: DictConfig) -> None:
    """Reject values that would only fail (or silently misbehave) later, naming the value and what is allowed."""
    lr = cfg.optimizer.get("lr")
    if lr is not None and not (isinstance(lr, (int, float)) and lr > 0):
        raise ConfigError(f"optimizer.lr={lr!r} is not allowed: the learning rate must be a positive number")
    if not (isinstance(cfg.lr_scale, (int, float)) and cfg.lr_scale > 0):
        raise ConfigError(f"lr_scale={cfg.lr_scale!r} is not allowed: it must be a positive number")
    epochs = cfg.trainer.get("max_epochs")
    # -1 (Lightning's "no limit") is refused: the per-step learning-rate schedule needs a known number of steps.
    if epochs is not None and not (isinstance(epochs, int) and epochs >= 1):
        raise ConfigError(f"trainer.max_epochs={epochs!r} is not allowed: use a positive integer")
    threads = cfg.get("threads")
    if threads is not None and not (isinstance(threads, int) and threads >= 1):
        raise ConfigError(f"threads={threads!r} is not allowed: use a positive integer, or null for torch's default")
    root = cfg.data.get("root")
    if root is not None and not cfg.data.get("download", False) and not Path(root).exists():
        raise ConfigError(
            f"data.root={root!r} is not allowed: no such directory (give the dataset's location"
            + (", or data.download=true to fetch it there)" if "download" in cfg.data else ")")
        )
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        raise ConfigError(f"ckpt_path={cfg.ckpt_path!r} is not allowed: no such checkpoint file")


def build_datamodule(data_cfg: DictConfig):
    """Instantiate ``cfg.data``; its num_classes/in_channels/image_size keys (which the model interpolates) go to
    the constructor only if it takes them, and must agree with the datamodule's own attributes."""
    target = get_class(data_cfg._target_) if "_target_" in data_cfg else None
    accepted = set(inspect.signature(target).parameters) if target is not None else set()
    node = OmegaConf.to_container(data_cfg, resolve=True)
    datamodule = instantiate({k: v for k, v in node.items() if k not in DATA_SHAPE_KEYS or k in accepted})
    for key in DATA_SHAPE_KEYS:
        actual = getattr(datamodule, key, None)
        if key in data_cfg and actual is not None and actual != data_cfg[key]:
            raise ConfigError(f"data.{key}={data_cfg[key]!r} does not match the dataset, which has {key}={actual!r}")
    return datamodule


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return str(device)


def _metrics(trainer) -> dict[str, Any]:
    return {name: value.item() if hasattr(value, "item") else value for name, value in trainer.callback_metrics.items()}


def _collect(trainer, module, callbacks) -> dict[str, Any]:
    from repablate.train.callbacks import BranchGradientMonitor, DeployCheck, RunRecorder

    record: dict[str, Any] = {}
    for callback in callbacks:
        if isinstance(callback, DeployCheck):
            record.update(callback.results)
        elif isinstance(callback, BranchGradientMonitor):
            record.update(callback.summary())
        elif isinstance(callback, RunRecorder):
            record["train/images_per_s"] = callback.images_per_s
    record.update(epochs=trainer.current_epoch, global_step=trainer.global_step, device=_device_name(module.device))
    return record


def _finish_wandb(loggers, record: dict[str, Any]) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            experiment = logger.experiment
            experiment.summary.update(record)
            experiment.finish(exit_code=0 if record["status"] == "completed" else 1)


@dataclass
class Assembly:
    """Everything a run is made of, built from the config (see ``assemble``)."""

    datamodule: Any
    module: Any
    callbacks: list
    loggers: list
    trainer: Any


def assemble(cfg: DictConfig, config: dict[str, Any] | None = None) -> Assembly:
    """Seed, then instantiate data, model (initialized), task module, callbacks, loggers and Trainer from ``cfg``.

    ``config`` (the resolved config as a plain dict) goes to checkpoints and to callbacks with a ``run_config``.
    """
    import lightning.pytorch as pl
    import torch

    from repablate.train.callbacks import RunRecorder

    # metrics.csv shares the run directory with .hydra/ and main.log, which the CSV logger never deletes.
    warnings.filterwarnings("ignore", message=r"Experiment logs directory .* exists and is not empty")
    # Step logging simply continues across epochs when an epoch has fewer steps than the logging interval.
    warnings.filterwarnings("ignore", message=r"The number of training batches .* is smaller than the logging")

    validate(cfg)
    if config is None:
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if cfg.get("threads") is not None:
        torch.set_num_threads(cfg.threads)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data)
    model = instantiate(cfg.model)
    instantiate(cfg.init)(model)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = instantiate(cfg.task.module, model=model, optimizer=instantiate(cfg.optimizer), scheduler=scheduler)
    callbacks = [instantiate(node) for node in cfg.callbacks.values() if node is not None]
    for callback in callbacks:
        if hasattr(callback, "run_config"):
            callback.run_config = config
    callbacks.append(RunRecorder(config))
    loggers = [instantiate(node) for node in cfg.logger.values() if node is not None]
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    return Assembly(datamodule, module, callbacks, loggers, trainer)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train, check, measure and record one run into ``run_dir``; returns the results record.

    On any failure results.json is still written, with status "failed" and the error, and the error re-raised.
    """
    started = time.time()
    record: dict[str, Any] = {
        "status": "failed", "error": None, "variant": cfg.get("variant"), "seed": cfg.get("seed"),
        "task": HydraConfig.get().runtime.choices.get("task") if HydraConfig.initialized() else None,
        "run_dir": str(run_dir), "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "git_commit": git_commit(Path(repablate.__file__).parent),
    }
    parts: Assembly | None = None
    try:
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        record.update(flatten(config))
        record["task"] = record["task"] or config["task"]["module"]["_target_"].rsplit(".", 1)[-1]
        import torch

        record["torch_version"] = torch.__version__
        parts = assemble(cfg, config)
        parts.trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=cfg.ckpt_path)
        record.update(_metrics(parts.trainer))  # the last logged train/val metrics; test() replaces them
        record.update(_collect(parts.trainer, parts.module, parts.callbacks))
        parts.trainer.test(parts.module, datamodule=parts.datamodule, verbose=False)
        record.update(_metrics(parts.trainer))
        record["status"] = "completed"
    except BaseException as error:
        record["error"] = f"{type(error).__name__}: {error}"
        log.error("run failed: %s", record["error"])
        raise
    finally:
        finished = time.time()
        record.update(finished_at=datetime.fromtimestamp(finished, timezone.utc).isoformat(),
                      wall_time_s=finished - started)
        write_json_atomically(record, run_dir / RESULTS_FILE)
        if parts is not None:
            _finish_wandb(parts.loggers, record)
    log.info("results: %s", run_dir / RESULTS_FILE)
    return record


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def main(cfg: DictConfig) -> None:
    """Hydra entry point: one run into the run directory Hydra created (conf/hydra/default.yaml).

    A bad value in a single run ends the process after the one logged line naming it (no traceback); in a sweep
    it fails that job like any other error.
    """
    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (ConfigError, FileNotFoundError):
        if HydraConfig.get().mode != RunMode.RUN:
            raise
        raise SystemExit(1) from None  # run() has logged the message

"""The main job: ``python -m repablate +variant=NAME [overrides]``.

Composes conf/ with Hydra, trains the model in its multi-branch form with Lightning, fuses it and proves the
fused form equivalent (DeployCheck), measures both forms, writes results.json into the run directory and ends on
a short summary of the run (repablate.train.console).
Heavy imports (torch, lightning, wandb) happen inside ``run`` so that ``--cfg job`` and ``--help`` are quick.
How a run ends when it does not complete (status, exit code, files kept): docs/FAILURE_MODES.md.

What a run refuses before it starts: repablate.train.validation, and repablate.train.variants (a run is named by
what it trains); the Hydra callback that guards run and sweep directories: repablate.train.hydra_callbacks; what
stopped a run that did not complete: repablate.train.failures; paired initialization: repablate.models.pairing.
"""

from __future__ import annotations

import logging
import secrets
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import repablate
from repablate.paths import conf_dir
from repablate.results import COMPLETED, DIVERGED, FAILED, INTERRUPTED, RESULTS_FILE, flatten, write_json
from repablate.train.console import quiet_console, quiet_wandb, run_summary
from repablate.train.distributed import DDPProcessFailed, ddp_processes, launched_rank
from repablate.train.failures import RunInterrupted, as_interruption, dataloader_worker_error, interrupt_on_signals
from repablate.train.validation import ConfigError, check_run_dir_is_new, validate
from repablate.train.variants import check_variant, choice_fields

log = logging.getLogger(__name__)
# Tracebacks of failed runs: main.log only (conf/hydra/default.yaml routes this logger to the file), the console
# keeps its one line per error.
traceback_log = logging.getLogger(f"{__name__}.traceback")

DATA_SHAPE_KEYS = ("num_classes", "in_channels", "image_size")


def register_resolvers() -> None:
    """``${repablate.unique:}``: a random suffix, fixed for the process (cached), that keeps run dirs apart."""
    if not OmegaConf.has_resolver("repablate.unique"):
        OmegaConf.register_new_resolver("repablate.unique", lambda: secrets.token_hex(4), use_cache=True)


def build_datamodule(data_cfg: DictConfig, data_shape: DictConfig):
    """Instantiate ``cfg.data``, and check that the datamodule's own num_classes, in_channels and image_size agree
    with ``cfg.data_shape``, which the model and task configs read."""
    datamodule = instantiate(data_cfg)
    for key in DATA_SHAPE_KEYS:
        expected, actual = data_shape[key], getattr(datamodule, key, None)
        if actual is not None and actual != expected:
            raise ConfigError(
                f"data_shape.{key}={expected!r} does not match the data: {type(datamodule).__name__} "
                f"has {key}={actual!r} (set data_shape.{key}={actual!r})"
            )
    return datamodule


def build_model(model_cfg: DictConfig, init_cfg: DictConfig, seed: int):
    """Instantiate ``cfg.model`` and apply ``cfg.init``, paired across variants (``build_paired``): the layers two
    variants share start identical for one seed (docs/CONFIGURATION.md#paired-runs)."""
    from repablate.models.pairing import build_paired

    return build_paired(lambda: instantiate(model_cfg), lambda model: instantiate(init_cfg)(model), seed)


def git_commit(directory: str | Path) -> str | None:
    """The commit checked out at ``directory``, with "-dirty" if tracked files changed; None outside git."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(directory), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(directory), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}-dirty" if dirty else commit


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return str(device)


def _metrics(trainer) -> dict[str, Any]:
    return {name: value.item() if hasattr(value, "item") else value for name, value in trainer.callback_metrics.items()}


def _collect(trainer, callbacks) -> dict[str, Any]:
    """What the fit reached, and the ``run_results()`` of every callback that reports some (docs/ARCHITECTURE.md)."""
    record: dict[str, Any] = {}
    for callback in callbacks:
        if hasattr(callback, "run_results"):
            record.update(callback.run_results())
    # The strategy's device, not the module's: Lightning's teardown has moved the module to the CPU by now.
    record.update(
        epochs=trainer.current_epoch,
        global_step=trainer.global_step,
        device=_device_name(trainer.strategy.root_device),
        processes=trainer.world_size,
    )
    return record


def _finish_wandb(loggers, record: dict[str, Any]) -> None:
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger):
            experiment = logger.experiment
            experiment.summary.update(record)
            experiment.finish(exit_code=0 if record["status"] == COMPLETED else 1)


@dataclass
class Assembly:
    """Everything a run is made of, built from the config (see ``assemble``)."""

    datamodule: Any
    module: Any
    callbacks: list
    loggers: list
    trainer: Any


def assemble(cfg: DictConfig, config: dict[str, Any] | None = None) -> Assembly:
    """Seed, then instantiate data, model (initialized, paired across variants: ``build_model``), task module,
    callbacks, loggers and Trainer from ``cfg``.

    ``config`` (the resolved config as a plain dict) goes into every checkpoint and into deploy.pt.
    """
    import lightning.pytorch as pl
    import torch

    from repablate.data.tensors import InMemoryDataModule
    from repablate.train.callbacks import DeployCheck, RunConfigInCheckpoints, TrainingThroughput
    from repablate.train.profiler import NoProfiler

    quiet_console()
    validate(cfg)
    if config is None:
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    if cfg.get("threads") is not None:
        torch.set_num_threads(cfg.threads)
    pl.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(cfg.data, cfg.data_shape)
    model = build_model(cfg.model, cfg.init, cfg.seed)
    scheduler = instantiate(cfg.scheduler) if cfg.get("scheduler") else None
    module = instantiate(cfg.task.module, model=model, optimizer=instantiate(cfg.optimizer), scheduler=scheduler)
    callbacks = [instantiate(node) for node in cfg.callbacks.values() if node is not None]
    callbacks.append(TrainingThroughput())  # results.json's train/images_per_s
    callbacks.append(RunConfigInCheckpoints(config))  # ckpt["repablate_config"]: a checkpoint rebuilds its model
    for deploy_check in (callback for callback in callbacks if isinstance(callback, DeployCheck)):
        deploy_check.run_config = config  # deploy.pt holds it, and the check rebuilds the deployed model from it
    loggers = [instantiate(node) for node in cfg.logger.values() if node is not None]
    quiet_wandb(loggers)
    profiler = {} if cfg.trainer.get("profiler") else {"profiler": NoProfiler()}  # Lightning's default, cheaper
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers, **profiler)
    if trainer.world_size > 1 and trainer.strategy.root_device.type == "cpu" and cfg.trainer.get("sync_batchnorm"):
        raise ConfigError(
            "trainer.sync_batchnorm=true is not allowed on the CPU: torch's SyncBatchNorm needs GPUs. Set "
            "trainer.sync_batchnorm=false (each process then normalizes over its part of the batch, so the run "
            "differs from one process by more than float noise; docs/RUNS.md#ddp)"
        )
    if trainer.world_size > 1 and not isinstance(datamodule, InMemoryDataModule):
        raise ConfigError(
            f"DDP with {trainer.world_size} processes is not allowed "
            f"with {type(datamodule).__name__}: DDP here splits each global batch of the in-memory datasets "
            "(digits, shapes, cifar, imagefolder); detection data is not split among processes"
        )
    return Assembly(datamodule, module, callbacks, loggers, trainer)


def run(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    """Train, check, measure and record one run into ``run_dir``; returns the results record.

    ``run_dir`` must not hold a run yet (``RunDirectoryInUse``), and the composition must not contradict its
    variant (``VariantContradiction``, ``check_variant``; needs Hydra's config, ``HydraConfig``): both are raised
    before anything is written. results.json records the option of every config group (``choice_fields``). When
    the run does not complete, results.json is still written and the error re-raised; its status is "diverged"
    (``TrainingDiverged``, with ``diverged_at_step``), "interrupted" (SIGINT or SIGTERM; Lightning's
    SIGTERMException is re-raised as ``RunInterrupted``) or "failed" (anything else), see docs/FAILURE_MODES.md.
    """
    choices = HydraConfig.get().runtime.choices if HydraConfig.initialized() else {}
    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    primary = launched_rank() == 0  # under DDP the other processes train alongside and write nothing
    try:
        if primary:
            check_run_dir_is_new(run_dir)
        if HydraConfig.initialized():
            check_variant(cfg, HydraConfig.get())
    except ConfigError as error:
        log.error("%s", error)
        raise
    from repablate.train.callbacks import TrainingDiverged

    started = time.time()
    record: dict[str, Any] = {
        "status": FAILED,
        "error": None,
        "diverged_at_step": None,
        "variant": cfg.get("variant"),
        "seed": cfg.get("seed"),
        "task": choices.get("task"),
        "run_dir": str(run_dir),
        "started_at": datetime.fromtimestamp(started, timezone.utc).isoformat(),
        "git_commit": git_commit(Path(repablate.__file__).parent),
    }
    if choices:
        record.update(choice_fields(choices))
    parts: Assembly | None = None
    ddp = None
    try:
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        record.update(flatten(config))
        record["task"] = record["task"] or config["task"]["module"]["_target_"].rsplit(".", 1)[-1]
        import torch

        record["torch_version"] = torch.__version__
        with ddp_processes(cfg.trainer, run_dir, overrides) as ddp:  # the other DDP processes, when it must
            parts = assemble(cfg, config)
            # weights_only: a checkpoint to resume from is loaded as tensors and plain data, never as code to run.
            parts.trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
            record.update(_metrics(parts.trainer))  # the last logged train/val metrics; test() replaces them
            record.update(_collect(parts.trainer, parts.callbacks))
            parts.trainer.test(parts.module, datamodule=parts.datamodule, verbose=False)
            record.update(_metrics(parts.trainer))
            record["status"] = COMPLETED
    except BaseException as caught:
        # A SIGTERM from the DDP process watcher: what failed is the started process.
        error = ddp.failure if ddp is not None and ddp.failure is not None else caught
        interruption = as_interruption(error)
        if isinstance(error, TrainingDiverged):
            record.update(status=DIVERGED, diverged_at_step=error.step)
        elif interruption is not None:
            record["status"] = INTERRUPTED
        reported = interruption or error
        worker = dataloader_worker_error(reported)
        if worker is not None:  # the worker's own error, not torch's wrapping of its traceback
            record["error"] = f"{worker.type_name}: {worker.message}"
        else:
            record["error"] = f"{type(reported).__name__}: {reported}"
        last = run_dir / "checkpoints" / "last.ckpt"
        resume = f"; resume with ckpt_path={last}" if record["status"] != FAILED and last.is_file() else ""
        log.error("run %s: %s%s", record["status"], record["error"], resume)
        if worker is not None:
            traceback_log.error("%s raised it; the traceback there:\n%s", worker.where, worker.traceback)
        elif record["status"] == FAILED and not isinstance(error, (ConfigError, FileNotFoundError)):
            traceback_log.error("the traceback:", exc_info=error)
        if interruption is not None and interruption is not error and not isinstance(error, KeyboardInterrupt):
            raise interruption from error  # Lightning's SIGTERMException is a SystemExit with status 0
        if ddp is not None and error is ddp.failure:
            raise error from None
        raise
    finally:
        if parts is not None and record["status"] != COMPLETED:  # how far it got
            record.update(
                epochs=parts.trainer.current_epoch,
                global_step=parts.trainer.global_step,
                device=_device_name(parts.trainer.strategy.root_device),
            )
        finished = time.time()
        record.update(
            finished_at=datetime.fromtimestamp(finished, timezone.utc).isoformat(), wall_time_s=finished - started
        )
        if primary:
            write_json(run_dir / RESULTS_FILE, record)
            if parts is not None:
                _finish_wandb(parts.loggers, record)
            log.info("%s", run_summary(record, run_dir / RESULTS_FILE))  # the last lines of every run
    return record


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def run_job(cfg: DictConfig) -> float | None:
    """Hydra's task: one run into the run directory Hydra created (conf/hydra/default.yaml).

    A bad value, a dataset that fails its check, a diverged run or an error in a DataLoader worker, in a single
    run, ends the process with status 1 after the one logged line naming it (a worker's traceback goes to
    main.log); in a sweep it fails that job like any other error, and the sweep goes on.
    """
    from repablate.data.check import DatasetCheckError
    from repablate.train.callbacks import TrainingDiverged

    try:
        # A sweeper that optimizes (Optuna, +sweep=tune) reads the run's `objective` metric from the return value.
        return run(cfg, Path(HydraConfig.get().runtime.output_dir)).get(cfg.get("objective"))
    except Exception as error:
        expected = isinstance(
            error, (ConfigError, FileNotFoundError, DatasetCheckError, TrainingDiverged, DDPProcessFailed)
        )
        if HydraConfig.get().mode != RunMode.RUN or not (expected or dataloader_worker_error(error)):
            raise
        raise SystemExit(1) from None  # run() has logged the message (and a worker's traceback into main.log)


def main() -> None:
    """``python -m repablate [overrides]``: a run, or a sweep with ``-m``.

    SIGINT and SIGTERM interrupt the run (results.json: status "interrupted") and, in a sweep, the whole sweep;
    the process then exits with 128 + the signal's number (130, 143), as a shell reports a signalled process.
    """
    try:
        with interrupt_on_signals():
            run_job()
    except RunInterrupted as interrupted:
        log.error("stopped: %s (exit status %d)", interrupted, 128 + interrupted.signum)
        raise SystemExit(128 + interrupted.signum) from None

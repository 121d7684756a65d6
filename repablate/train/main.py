"""The main job: ``python -m repablate +variant=NAME [overrides]``.

Composes conf/ with Hydra, trains the model in its multi-branch form with Lightning, fuses it and proves the
fused form equivalent (DeployCheck), measures both forms, writes results.json into the run directory and ends on
a short summary of the run (repablate.train.console).
Heavy imports (torch, lightning, wandb) happen inside ``run`` so that ``--cfg job`` and ``--help`` are quick.
How a run ends when it does not complete (status, exit code, files kept): docs/FAILURE_MODES.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback as HydraCallback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import repablate
from repablate.paths import conf_dir
from repablate.results import (
    CHOICE_PREFIX,
    COMPLETED,
    DIVERGED,
    FAILED,
    INTERRUPTED,
    RESULTS_FILE,
    RUN_FILES,
    SWEEP_JOBS_FILE,
    flatten,
    write_json,
)
from repablate.train.console import quiet_console, quiet_wandb, run_summary

log = logging.getLogger(__name__)
# Tracebacks of failed runs: main.log only (conf/hydra/default.yaml routes this logger to the file), the console
# keeps its one line per error.
traceback_log = logging.getLogger(f"{__name__}.traceback")

DATA_SHAPE_KEYS = ("num_classes", "in_channels", "image_size")
MAX_SEED = 2**32 - 1  # numpy's seed range, which seed_everything enforces
SWEEP_FILES = ("multirun.yaml", SWEEP_JOBS_FILE)  # what a started sweep has written into its directory
BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"
INTERRUPTING_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class ConfigError(ValueError):
    """A configuration value that cannot work, found before training starts."""


class RunDirectoryInUse(ConfigError):
    """The run (or sweep) directory already holds a run: it is never reused."""


class RunInterrupted(BaseException):
    """SIGINT or SIGTERM arrived. A BaseException, like KeyboardInterrupt, so that no ``except Exception`` on its
    way up (Lightning's, Hydra's job runner's) turns it into a failed job: the run, or the whole sweep, stops."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"received {signal.Signals(signum).name}")


@contextmanager
def interrupt_on_signals(signums: tuple[int, ...] = INTERRUPTING_SIGNALS) -> Iterator[None]:
    """While active, each of ``signums`` raises ``RunInterrupted`` in the main thread.

    Lightning's own SIGTERM handling (inside fit) only sets a flag and later raises ``SIGTERMException``, a
    ``SystemExit`` with code 0, and it turns KeyboardInterrupt into ``sys.exit(1)``: neither says "interrupted".
    Lightning keeps a handler it finds installed and calls it after its own, so this one still runs during fit.
    """

    def interrupt(signum: int, frame) -> None:
        raise RunInterrupted(signum)

    previous = {}
    try:
        for signum in signums:
            previous[signum] = signal.signal(signum, interrupt)
    except ValueError:  # not the main thread (a launcher's worker): leave the process's handlers alone
        pass
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _is_number(value: Any) -> bool:
    """A finite int or float; bools are ints to Python but never a sensible number here."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _is_integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def register_resolvers() -> None:
    """``${repablate.unique:}``: a random suffix, fixed for the process (cached), that keeps run dirs apart."""
    if not OmegaConf.has_resolver("repablate.unique"):
        OmegaConf.register_new_resolver("repablate.unique", lambda: secrets.token_hex(4), use_cache=True)


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


# --- a run is named by what it trains -------------------------------------------------------------------------------


class VariantContradiction(ConfigError):
    """The composition contradicts its variant: the run would be recorded under a name it does not train."""


@dataclass
class VariantPins:
    """What ``+variant=NAME`` fixes, read from conf/variant/NAME.yaml itself: the option of each group its defaults
    list overrides (``groups``), and every value it sets, those options' contents included (``values``, dotted keys
    as ``flatten`` writes them). ``nodes`` maps each pinned group to the config node its option fills."""

    groups: dict[str, str] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    nodes: dict[str, str] = field(default_factory=dict)


def _config_repository(hydra_cfg: DictConfig):
    """Hydra's repository of the run's config sources (conf/, and any a user added), for reading option files."""
    from hydra._internal.config_repository import ConfigRepository
    from hydra._internal.config_search_path_impl import ConfigSearchPathImpl

    search_path = ConfigSearchPathImpl()
    for source in hydra_cfg.runtime.config_sources:
        search_path.append(source.provider, f"{source.schema}://{source.path}")
    return ConfigRepository(search_path)


def _leaves(node: Any, package: str) -> dict[str, Any]:
    """An option file's keys as dotted leaves where they land in the composed config (``package``)."""
    values = flatten(OmegaConf.to_container(node, resolve=False), prefix="")
    return {f"{package}.{key}" if package else key: value for key, value in values.items()}


def _package(header: Mapping[str, Any], group: str) -> str:
    package = header.get("package")
    if package == "_global_":
        return ""
    return group.replace("/", ".") if package in (None, "_group_") else package


def variant_pins(name: str, repository) -> VariantPins:
    """What conf/variant/``name``.yaml pins (``VariantPins``), read through Hydra's config ``repository``."""
    from hydra.core.default_element import GroupDefault

    variant = repository.load_config(f"variant/{name}")
    pins = VariantPins()
    for default in variant.defaults_list or []:
        if not isinstance(default, GroupDefault) or not isinstance(default.value, str):
            continue
        group = default.group[1:] if default.group.startswith("/") else f"variant/{default.group}"
        option = repository.load_config(f"{group}/{default.value}")
        pins.groups[group] = default.value
        pins.nodes[group] = _package(option.header, group)
        pins.values.update(_leaves(option.config, pins.nodes[group]))
    pins.values.update(_leaves(variant.config, _package(variant.header, "variant")))
    return pins


def _as_override(key: str, value: Any) -> str:
    """``key=value`` as one would type it on the command line."""
    text = json.dumps(value) if value is None or isinstance(value, bool) else str(value)
    return f"{key}={text}"


def _and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} and {items[-1]}"


def _conflicts(
    pins: VariantPins, choices: Mapping[str, Any], actual: Mapping[str, Any], skip: str = ""
) -> list[tuple[str, str, str]]:
    """``(key, what the variant sets, what was composed)`` for each pin that ``choices`` (Hydra's runtime choices)
    and ``actual`` (the composed config's leaves) contradict; keys equal to ``skip`` are not compared."""
    found = []
    for group, option in pins.groups.items():
        if choices.get(group) != option:
            found.append((group, f"{group}={option}", _as_override(group, choices.get(group))))
    contradicted = tuple(f"{pins.nodes[key]}." for key, _, _ in found if pins.nodes.get(key))
    for key, value in pins.values.items():
        if key == skip or key.startswith(contradicted):
            continue
        if key not in actual:
            found.append((key, _as_override(key, value), f"~{key}"))
        elif actual[key] != value:
            found.append((key, _as_override(key, value), _as_override(key, actual[key])))
    for group, node in pins.nodes.items():  # a key added to a pinned option changes that option too
        if node and choices.get(group) == pins.groups[group]:
            for key in actual:
                if key.startswith(f"{node}.") and key not in pins.values:
                    found.append((key, f"no {key}", _as_override(key, actual[key])))
    return found


def check_variant(cfg: DictConfig, hydra_cfg: DictConfig) -> None:
    """``VariantContradiction`` (one message naming both sides) when the composition contradicts the variant that
    names the run: a config group set to another option than the variant's (``+variant=plain block=repconv``), a
    key of a pinned option changed (``block.use_1x1=false``), a value the variant sets changed (``lr_scale`` under
    ``+variant=repconv_lr``), or a ``variant:`` set without ``+variant``. Keys no variant sets (``optimizer.lr``,
    ``seed``, ...) stay free: results.json records them and the analysis keeps runs that differ in them apart.

    ``hydra_cfg``: the run's Hydra node (``HydraConfig.get()``), for its runtime choices, command-line overrides
    and config sources; conf/variant/NAME.yaml itself says what the variant pins (``variant_pins``).
    """
    choices = hydra_cfg.runtime.choices
    name = choices.get("variant")
    if name is None:
        named = cfg.get("variant", "default")
        if named != "default":
            raise VariantContradiction(
                f"variant={named} names the run {named}, but no +variant= chose that variant, so nothing says the "
                f"run trains it: use +variant={named}, or leave variant out (the run is then named default)"
            )
        return
    repository = _config_repository(hydra_cfg)
    actual = flatten({k: v for k, v in OmegaConf.to_container(cfg, resolve=False).items() if k != "hydra"}, prefix="")
    conflicts = _conflicts(variant_pins(name, repository), choices, actual)
    if not conflicts:
        return
    given = [override.split("=", 1)[0].lstrip("~+") for override in hydra_cfg.overrides.task]
    sources: dict[str, list[str]] = {}
    for key, _, chosen in conflicts:
        on_command_line = any(key == k or key.startswith(f"{k}.") for k in given)
        sources.setdefault("the command line" if on_command_line else "the composition", []).append(chosen)
    chose = _and([f"{source} chose {_and(items)}" for source, items in sources.items()])
    others = [
        f"+variant={other}"
        for other in repository.get_group_options("variant")
        if other != name and not _conflicts(variant_pins(other, repository), choices, actual, skip="variant")
    ]
    instead = f"use a variant it agrees with ({' or '.join(others)}), " if others else ""
    raise VariantContradiction(
        f"+variant={name} sets {_and([pinned for _, pinned, _ in conflicts])}, but {chose}: a run is named by its "
        f"variant (results.json, wandb, the run directory), and this one would not train {name}. Drop the "
        f"override, {instead}leave out +variant (the run is then named default), or add a variant to conf/variant/"
    )


def choice_fields(choices: Mapping[str, Any]) -> dict[str, Any]:
    """results.json's ``choice/<group>``: the option Hydra composed in every config group (its runtime choices),
    Hydra's own groups left out; ``choice/variant`` is null without ``+variant``."""
    fields: dict[str, Any] = {f"{CHOICE_PREFIX}variant": None}
    for group, option in choices.items():
        if group != "hydra" and not group.startswith("hydra/"):
            fields[CHOICE_PREFIX + group] = (
                option
                if option is None or isinstance(option, str)
                else json.dumps(OmegaConf.to_container(option) if OmegaConf.is_config(option) else list(option))
            )
    return fields


def sweep_jobs(config: DictConfig) -> list[list[str]] | None:
    """Every job of the sweep ``config`` starts, in launch order, as the override list Hydra's BasicSweeper gives
    it (and saves in the job's .hydra/overrides.yaml); None for other sweepers, whose jobs are not known ahead
    (e.g. Optuna's depend on earlier results)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.override_parser.overrides_parser import OverridesParser

    sweeper = config.hydra.sweeper
    if sweeper.get("_target_") != BASIC_SWEEPER:
        return None
    # As BasicSweeper.sweep builds them: hydra.sweeper.params first, then the command line's task overrides.
    arguments = [f"{key}={value}" for key, value in (sweeper.get("params") or {}).items()]
    arguments += OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    hydra_instance = GlobalHydra.instance()
    loader = hydra_instance.config_loader() if hydra_instance.is_initialized() else None  # for glob() sweeps
    overrides = OverridesParser.create(config_loader=loader).parse_overrides(arguments)
    batches = BasicSweeper.split_arguments(overrides, sweeper.get("max_batch_size"))
    return [list(job) for batch in batches for job in batch]


def check_sweep_variants(config: DictConfig, jobs: list[list[str]]) -> None:
    """``VariantContradiction`` if any job of the sweep ``config`` (its override lists, ``sweep_jobs``) contradicts
    its variant (``check_variant``): each job is composed as the launcher will compose it."""
    from hydra.core.global_hydra import GlobalHydra

    loader = GlobalHydra.instance().config_loader()
    refused = []
    for num, job in enumerate(jobs):
        job_config = loader.load_sweep_config(config, job)
        try:
            check_variant(job_config, job_config.hydra)
        except VariantContradiction as error:
            refused.append((num, job, error))
    if refused:
        num, job, error = refused[0]
        first = "it" if len(refused) == 1 else f"the first of {len(refused)} such jobs"
        raise VariantContradiction(f"the sweep is refused, {first} is job {num} ({' '.join(job)}): {error}")


class RunDirectoryGuard(HydraCallback):
    """Hydra callback (conf/hydra/default.yaml), called before Hydra writes anything into the output directory:
    refuses a composition that contradicts its variant (``check_variant``; in a sweep, every job's), and a run or
    sweep directory that already holds one, and at a sweep's start writes ``sweep_jobs.json`` there, every job the
    sweep will run, so that the jobs a killed sweep never started are known."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_variant(config, config.hydra)
            check_run_dir_is_new(Path(config.hydra.run.dir))
        except ConfigError as error:
            raise SystemExit(str(error)) from None  # one line on stderr, exit status 1

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        jobs = sweep_jobs(config)
        try:
            check_sweep_dir_is_new(sweep_dir)
            if jobs is not None:  # other sweepers' jobs are checked as they start (``run``)
                check_sweep_variants(config, jobs)
        except ConfigError as error:
            raise SystemExit(str(error)) from None
        if jobs is None:
            log.info(
                "%s not written: the sweeper %s does not know its jobs ahead",
                SWEEP_JOBS_FILE,
                config.hydra.sweeper.get("_target_"),
            )
            return
        listing = {"jobs": [{"num": num, "overrides": job} for num, job in enumerate(jobs)]}
        write_json(sweep_dir / SWEEP_JOBS_FILE, listing)


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


# --- paired initialization: variants of one seed start alike where they have the same layers -------------------------

# RepConv's dense branch is the plain Conv's conv (YOLOv7's attribute names rbr_dense.0 and conv): one layer of the
# network, under one name, so both draw the same initial 3x3 kernel.
PAIRED_NAMES = {"rbr_dense.0": "conv"}


def paired_name(name: str) -> str:
    """The name under which the layer ``name`` (a ``named_modules`` name) draws its initialization."""
    for suffix, alias in PAIRED_NAMES.items():
        if name == suffix or name.endswith(f".{suffix}"):
            return name[: -len(suffix)] + alias
    return name


def layer_seed(seed: int, name: str) -> int:
    """A 63-bit seed for the layer ``name`` of a run with ``seed``: independent of every other layer."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{name}".encode()).digest()[:8], "little") >> 1


@contextmanager
def _record_layers_as_built(built: dict[int, dict[str, Any]]) -> Iterator[None]:
    """While active, copies the parameters of each Conv2d and Linear as it joins its parent module: the default
    init its constructor drew, before the model may change it (a detection head's bias prior)."""
    from torch import nn
    from torch.nn.modules.module import register_module_module_registration_hook

    def record(parent, name: str, module) -> None:
        if isinstance(module, (nn.Conv2d, nn.Linear)) and id(module) not in built:
            built[id(module)] = {key: p.detach().clone() for key, p in module.named_parameters(recurse=False)}

    handle = register_module_module_registration_hook(record)
    try:
        yield
    finally:
        handle.remove()


def build_model(model_cfg: DictConfig, init_cfg: DictConfig, seed: int):
    """Instantiate ``cfg.model`` and apply ``cfg.init``, paired across variants (docs/CONFIGURATION.md#paired-runs).

    Every Conv2d and Linear draws PyTorch's default init again (``reset_parameters``) from a generator seeded by
    (seed, its name; ``paired_name``), so the layers two variants share (stem, head, the 3x3 kernel of the plain
    conv and of RepConv's dense branch) start identical for one seed, whatever else either variant builds. A
    parameter the model changed after its constructor drew it is kept as the model set it. The init scheme then
    draws from a generator seeded by the seed alone. All of it runs on a fork of torch's global generator, which
    is left as ``seed_everything`` set it: building another model never shifts what is drawn later.
    """
    import torch

    built: dict[int, dict[str, Any]] = {}
    with torch.random.fork_rng(devices=[]):
        with _record_layers_as_built(built):
            model = instantiate(model_cfg)
        for name, module in model.named_modules():
            if id(module) not in built:
                continue
            parameters = dict(module.named_parameters(recurse=False))
            kept = {
                key: p.detach().clone() for key, p in parameters.items() if not torch.equal(p, built[id(module)][key])
            }
            torch.random.default_generator.manual_seed(layer_seed(seed, paired_name(name)))
            module.reset_parameters()
            with torch.no_grad():
                for key, value in kept.items():
                    parameters[key].copy_(value)
        torch.random.default_generator.manual_seed(layer_seed(seed, "init"))
        instantiate(init_cfg)(model)
    return model


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


WORKER_ERROR = re.compile(
    r"Caught (?P<type>\w+) (?P<where>in DataLoader worker process \d+)\.\nOriginal (?P<traceback>Traceback .*)",
    re.DOTALL,
)


@dataclass(frozen=True)
class WorkerError:
    """An error raised in a DataLoader worker: its type's name, its own message, where, and its traceback there."""

    type_name: str
    message: str
    where: str
    traceback: str


def dataloader_worker_error(error: BaseException) -> WorkerError | None:
    """The error a DataLoader worker raised, when ``error`` is torch's re-raise of it in the main process, whose
    message is the worker's whole traceback ("Caught ValueError in DataLoader worker process 0. Original
    Traceback ..."; a ``RuntimeError`` when the type cannot be rebuilt from one message); None otherwise."""
    match = WORKER_ERROR.match(str(error))
    if match is None:
        return None
    name, text = match["type"], match["traceback"].rstrip()
    # The traceback ends on "<module.>Type: message" (the message may span lines); frames above it are indented.
    lines = list(re.finditer(rf"^(?:[\w.]+\.)?{re.escape(name)}(?:: |$)", text, re.MULTILINE))
    message = text[lines[-1].end() :].strip() if lines else text.splitlines()[-1]
    return WorkerError(name, message, match["where"], text)


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return str(device)


def _metrics(trainer) -> dict[str, Any]:
    return {name: value.item() if hasattr(value, "item") else value for name, value in trainer.callback_metrics.items()}


def _collect(trainer, module, callbacks) -> dict[str, Any]:
    """What the fit reached, and the ``run_results()`` of every callback that reports some (docs/ARCHITECTURE.md)."""
    record: dict[str, Any] = {}
    for callback in callbacks:
        if hasattr(callback, "run_results"):
            record.update(callback.run_results())
    record.update(epochs=trainer.current_epoch, global_step=trainer.global_step, device=_device_name(module.device))
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

    from repablate.train.callbacks import DeployCheck, RunConfigInCheckpoints, TrainingThroughput

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
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers)
    return Assembly(datamodule, module, callbacks, loggers, trainer)


def _as_interruption(error: BaseException) -> RunInterrupted | None:
    """The signal interruption ``error`` stands for, if any: ours, a KeyboardInterrupt, or Lightning's
    SIGTERMException (when no ``interrupt_on_signals`` handler was installed, e.g. a run started from Python)."""
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    if isinstance(error, RunInterrupted):
        return error
    if isinstance(error, KeyboardInterrupt):
        return RunInterrupted(signal.SIGINT)
    if isinstance(error, SIGTERMException):
        return RunInterrupted(signal.SIGTERM)
    return None


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
    try:
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
    try:
        config = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        record.update(flatten(config))
        record["task"] = record["task"] or config["task"]["module"]["_target_"].rsplit(".", 1)[-1]
        import torch

        record["torch_version"] = torch.__version__
        parts = assemble(cfg, config)
        # weights_only: a checkpoint to resume from is loaded as tensors and plain data, never as code to run.
        parts.trainer.fit(parts.module, datamodule=parts.datamodule, ckpt_path=cfg.ckpt_path, weights_only=True)
        record.update(_metrics(parts.trainer))  # the last logged train/val metrics; test() replaces them
        record.update(_collect(parts.trainer, parts.module, parts.callbacks))
        parts.trainer.test(parts.module, datamodule=parts.datamodule, verbose=False)
        record.update(_metrics(parts.trainer))
        record["status"] = COMPLETED
    except BaseException as error:
        interruption = _as_interruption(error)
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
        raise
    finally:
        if parts is not None and record["status"] != COMPLETED:  # how far it got
            record.update(
                epochs=parts.trainer.current_epoch,
                global_step=parts.trainer.global_step,
                device=_device_name(parts.module.device),
            )
        finished = time.time()
        record.update(
            finished_at=datetime.fromtimestamp(finished, timezone.utc).isoformat(), wall_time_s=finished - started
        )
        write_json(run_dir / RESULTS_FILE, record)
        if parts is not None:
            _finish_wandb(parts.loggers, record)
        log.info("%s", run_summary(record, run_dir / RESULTS_FILE))  # the last lines of every run
    return record


register_resolvers()


@hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="config")
def run_job(cfg: DictConfig) -> None:
    """Hydra's task: one run into the run directory Hydra created (conf/hydra/default.yaml).

    A bad value, a diverged run or an error in a DataLoader worker, in a single run, ends the process with status 1
    after the one logged line naming it (a worker's traceback goes to main.log); in a sweep it fails that job like
    any other error, and the sweep goes on.
    """
    from repablate.train.callbacks import TrainingDiverged

    try:
        run(cfg, Path(HydraConfig.get().runtime.output_dir))
    except Exception as error:
        expected = isinstance(error, (ConfigError, FileNotFoundError, TrainingDiverged))
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

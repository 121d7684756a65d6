"""The Hydra callback that guards run and sweep directories (``RunDirectoryGuard``, conf/hydra/default.yaml), and
what it knows of a sweep before it starts: every job's overrides (``sweep_jobs``), each checked against its variant
(``check_sweep_variants``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback as HydraCallback
from omegaconf import DictConfig, OmegaConf

from repablate.results import SWEEP_JOBS_FILE, write_json
from repablate.train.distributed import launched_rank
from repablate.train.validation import ConfigError, check_run_dir_is_new, check_sweep_dir_is_new
from repablate.train.variants import VariantContradiction, check_variant

log = logging.getLogger(__name__)

BASIC_SWEEPER = "hydra._internal.core_plugins.basic_sweeper.BasicSweeper"


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
            if launched_rank() == 0:  # another DDP process of this run shares the first one's directory
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

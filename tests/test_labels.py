"""A run is named by what it trains: a composition that contradicts its variant is refused before anything is
written, keys no variant sets stay free, and results.json records the option of every config group."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict

from repablate.train.hydra_callbacks import check_sweep_variants, sweep_jobs
from repablate.train.main import conf_dir, register_resolvers, run
from repablate.train.variants import VariantContradiction, check_variant, choice_fields
from tests.test_cli import repablate

CONF = conf_dir()
VARIANTS = sorted(p.stem for p in (CONF / "variant").glob("*.yaml"))
QUICK = ["logger=csv", "+callbacks.deploy_check.bench.latency=false", "callbacks.progress_bar.refresh_rate=0"]


@pytest.fixture
def compose_with_hydra(tmp_path: Path):
    """``compose_with_hydra(*overrides)``: the composed config with its ``hydra`` node (runtime choices, overrides,
    config sources), as the Hydra callback and ``check_variant`` see it."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig

    register_resolvers()

    def _compose(*overrides: str):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            return compose(
                "config", overrides=[f"paths.run_dir={tmp_path / 'run'}", *overrides], return_hydra_config=True
            )

    yield _compose
    HydraConfig.instance().cfg = None


def _check(cfg) -> None:
    check_variant(cfg, cfg.hydra)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["+variant=plain", "block=repconv"],
            "+variant=plain sets block=plain, but the command line chose block=repconv",
        ),
        (
            ["+variant=plain", "init=article"],
            "+variant=plain sets init=default, but the command line chose init=article",
        ),
        (
            ["+variant=plain", "block=repconv", "init=article"],
            "+variant=plain sets block=plain and init=default, but the command line chose block=repconv and "
            "init=article",
        ),
        (
            ["+variant=repconv_seed_init", "init=default"],
            "+variant=repconv_seed_init sets init=article, but the command line chose init=default",
        ),
        (
            ["+variant=repconv", "block.use_1x1=false"],
            "+variant=repconv sets block.use_1x1=true, but the command line chose block.use_1x1=false",
        ),
        (["+variant=repconv", "+block.d=2"], "+variant=repconv sets no block.d, but the command line chose block.d=2"),
        (["+variant=repconv_lr", "lr_scale=0.8"], "+variant=repconv_lr sets lr_scale=0.75, but the command line chose"),
        (
            ["+variant=repconv_lr", "scheduler.warmup_epochs=0"],
            "+variant=repconv_lr sets scheduler.warmup_epochs=1.0, but the command line chose "
            "scheduler.warmup_epochs=0",
        ),
    ],
)
def test_a_composition_that_contradicts_its_variant_is_refused_naming_both(overrides, message, compose_with_hydra):
    with pytest.raises(VariantContradiction, match=re.escape(message)) as error:
        _check(compose_with_hydra(*overrides))
    assert "\n" not in str(error.value) and "leave out +variant" in str(error.value)


@pytest.mark.parametrize(
    ("overrides", "agrees_with"),
    [
        (["+variant=plain", "block=repconv"], "+variant=repconv"),
        (["+variant=plain", "block=repconv", "init=article"], "+variant=repconv_seed_init"),
        (["+variant=repconv", "block=repconv_n"], "+variant=repconv_n"),
    ],
)
def test_the_refusal_names_the_variant_the_composition_agrees_with(overrides, agrees_with, compose_with_hydra):
    with pytest.raises(VariantContradiction, match=re.escape(f"use a variant it agrees with ({agrees_with})")):
        _check(compose_with_hydra(*overrides))


@pytest.mark.parametrize("variant", [None, *VARIANTS])
def test_every_variant_agrees_with_itself_and_keys_it_does_not_set_stay_free(variant, compose_with_hydra):
    chosen = [f"+variant={variant}"] if variant else []
    _check(compose_with_hydra(*chosen))
    # What the lr sweep varies under one variant, and other groups and keys no variant sets.
    free = ["optimizer=adamw", "optimizer.lr=0.01", "seed=3", "model=repvgg_a0", "data=shapes", "trainer.max_epochs=2"]
    if variant != "repconv_lr":
        free += ["lr_scale=0.8", "scheduler.warmup_epochs=0.5"]
    _check(compose_with_hydra(*chosen, *free))


def test_without_a_variant_any_group_goes_and_the_run_is_named_default(compose_with_hydra):
    cfg = compose_with_hydra("block=plain", "init=article")
    _check(cfg)
    assert cfg.variant == "default"


def test_a_variant_name_that_no_variant_chose_is_refused(compose_with_hydra):
    cfg = compose_with_hydra("block=plain")  # variant= on the command line is a group override: Hydra refuses it
    cfg.variant = "repconv"  # as another config file (an experiment) could set it
    with pytest.raises(
        VariantContradiction, match=re.escape("variant=repconv names the run repconv, but no +variant=")
    ):
        _check(cfg)


@pytest.mark.parametrize("variant", VARIANTS)
def test_each_variant_file_names_itself_and_pins_block_and_init(variant):
    content = OmegaConf.load(CONF / "variant" / f"{variant}.yaml")
    assert content.variant == variant
    pinned = {next(iter(entry)) for entry in content.defaults}
    assert {"override /block", "override /init"} <= pinned


def test_a_refused_run_writes_nothing(compose_with_hydra, tmp_path):
    cfg = compose_with_hydra("+variant=plain", "block=repconv", *QUICK)
    from hydra.core.hydra_config import HydraConfig

    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    with pytest.raises(VariantContradiction, match="sets block=plain"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def _compose_sweep(*overrides: str):
    return GlobalHydra.instance().hydra.compose_config(
        "config", list(overrides), run_mode=RunMode.MULTIRUN, with_log_configuration=False
    )


def test_a_sweep_is_checked_job_by_job_before_it_starts():
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        fine = _compose_sweep("+variant=plain,repconv", "seed=0,1")
        check_sweep_variants(fine, sweep_jobs(fine))
        mixed = _compose_sweep("+variant=plain,repconv", "block=repconv")
        with pytest.raises(VariantContradiction) as error:
            check_sweep_variants(mixed, sweep_jobs(mixed))
    assert str(error.value).startswith(
        "the sweep is refused, it is job 0 (+variant=plain block=repconv): +variant=plain sets block=plain, but the "
        "command line chose block=repconv"
    )


def test_results_record_every_group_choice_but_hydras_own(compose_with_hydra):
    fields = choice_fields(compose_with_hydra("+variant=plain", "optimizer=adamw").hydra.runtime.choices)
    assert fields == {
        "choice/variant": "plain",
        "choice/block": "plain",
        "choice/init": "default",
        "choice/model": "small",
        "choice/data": "digits",
        "choice/optimizer": "adamw",
        "choice/scheduler": "cosine",
        "choice/task": "classify",
        "choice/trainer": "default",
        "choice/callbacks": "default",
        "choice/logger": "default",
        "choice/paths": "default",
    }
    assert choice_fields(compose_with_hydra().hydra.runtime.choices)["choice/variant"] is None
    assert choice_fields(compose_with_hydra("+sweep=default").hydra.runtime.choices)["choice/sweep"] == "default"


@pytest.mark.slow
def test_the_command_line_refuses_a_contradiction_before_the_run_directory_exists(tmp_path):
    result = repablate("+variant=plain", "block=repconv", cwd=tmp_path)
    assert result.returncode == 1
    assert "+variant=plain sets block=plain, but the command line chose block=repconv" in result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "outputs").exists()
    sweep = repablate("-m", "+variant=plain,repconv", "block=repconv", cwd=tmp_path)
    assert sweep.returncode == 1 and "the sweep is refused, it is job 0" in sweep.stderr
    assert not (tmp_path / "multirun").exists()


@pytest.mark.slow
def test_a_run_without_a_variant_records_default_and_its_choices(tmp_path):
    result = repablate("trainer=debug", "block=plain", *QUICK, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "outputs").glob("*/*")
    record = json.loads((run_dir / "results.json").read_text())
    assert "_default_s0_" in run_dir.name and record["variant"] == "default" and record["choice/variant"] is None
    assert record["choice/block"] == "plain" and record["config/block._target_"] == "repablate.nn.Conv"

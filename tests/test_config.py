"""conf/: every option of every config group composes and instantiates; bad choices fail with a clear message."""

from __future__ import annotations

import fractions
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException, MissingConfigException
from hydra.types import RunMode
from omegaconf import OmegaConf

from repablate.nn import Conv, RepConv
from repablate.train.hydra_callbacks import sweep_jobs
from repablate.train.main import assemble, conf_dir, register_resolvers
from repablate.train.validation import ConfigError, validate

REPO = Path(__file__).resolve().parent.parent
CONF = conf_dir()
DEFAULTS = {
    next(iter(e)) for e in OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml").defaults) if isinstance(e, dict)
}
# Options needing values a user must give (a dataset on disk, ...): the overrides that make them instantiate.
NEEDS = {
    "data/imagefolder": lambda tmp: [f"data.root={_image_folder(tmp)}", "data_shape.num_classes=2"],
    "data/cifar10": lambda tmp: [f"data.root={_folder(tmp / 'cifar-10-batches-py').parent}"],
    "data/cifar100": lambda tmp: [f"data.root={_folder(tmp / 'cifar-100-python').parent}"],
    "data/yolo": lambda tmp: [
        "task=detect",
        "model=yolov7_tiny",
        f"data.data_yaml={tmp / 'data.yaml'}",
        "data_shape.num_classes=2",
    ],
    "task/detect": lambda tmp: ["model=yolov7_tiny", "data=shapes_detect"],
    "launcher/slurm": lambda tmp: ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=1"],
    # torch's SyncBatchNorm needs GPUs: on the CPU a DDP run normalizes per process (refused otherwise, tested).
    "trainer/ddp": lambda tmp: ["trainer.sync_batchnorm=false"],
}
# Options whose Hydra plugin is an extra outside `dev` (pyproject.toml): composed where the extra is installed.
PLUGINS = {"launcher/ray": "hydra_plugins.hydra_ray_launcher"}


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


def _image_folder(root: Path) -> Path:
    from PIL import Image

    for label in ("a", "b"):
        (root / "images" / label).mkdir(parents=True, exist_ok=True)
        for i in range(2):
            Image.new("RGB", (8, 8), (i * 100, 0, 0)).save(root / "images" / label / f"{i}.png")
    return root / "images"


def options() -> list[str]:
    """Every (group, option) found in conf/, as the override that selects it; files named _* are parts that
    options include (sweep/_base.yaml), not options."""
    found = []
    for path in sorted(CONF.rglob("*.yaml")):
        group = path.parent.relative_to(CONF).as_posix()
        if group == "." or group == "hydra" or path.stem.startswith("_"):  # hydra/default: in every composition
            continue
        prefix = "" if group in DEFAULTS else "+"
        found.append(f"{prefix}{group}={path.stem}")
    return found


def test_options_are_found():
    found = options()
    for expected in (
        "+variant=repconv",
        "+variant=plain",
        "block=plain",
        "model=repvgg_a0",
        "optimizer=adamw",
        "callbacks=ema",
        "callbacks=deploy_check",
        "+sweep=article",
        "+experiment=yolov7_tiny_table",
    ):
        assert expected in found


def test_every_file_in_conf_is_composed_by_a_test():
    """Options are composed one by one below; config.yaml and hydra/default.yaml are in every composition; a part
    (_*.yaml) is included by the options of its group."""
    selected = {override.lstrip("+").replace("=", "/") + ".yaml" for override in options()}
    for path in sorted(CONF.rglob("*.yaml")):
        name = path.relative_to(CONF).as_posix()
        if name in ("config.yaml", "hydra/default.yaml") or name in selected:
            continue
        assert path.stem.startswith("_"), f"conf/{name} is composed by no test"
        siblings = [p for p in path.parent.glob("*.yaml") if not p.stem.startswith("_")]
        assert siblings and all(path.stem in OmegaConf.load(p).defaults for p in siblings), name


@pytest.mark.parametrize("override", options())
def test_option_composes_and_instantiates(override, compose_config, tmp_path):
    group, option = override.lstrip("+").split("=")
    if f"{group}/{option}" in PLUGINS:
        pytest.importorskip(PLUGINS[f"{group}/{option}"])
    extra = NEEDS.get(f"{group}/{option}", lambda tmp: [])(tmp_path)
    cfg = compose_config(override, "trainer.max_epochs=1", *extra)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    parts = assemble(cfg)
    assert parts.module.model is not None and parts.trainer is not None
    for key in ("num_classes", "in_channels", "image_size"):
        assert getattr(parts.datamodule, key) == cfg.data_shape[key]


@pytest.mark.parametrize("option", sorted(p.stem for p in (CONF / "data").glob("*.yaml")))
def test_data_options_set_the_datamodule_and_its_shape(option, compose_config, tmp_path):
    cfg = compose_config(f"data={option}", *NEEDS.get(f"data/{option}", lambda tmp: [])(tmp_path))
    assert set(cfg.data_shape) == {"num_classes", "in_channels", "image_size"} and "_target_" not in cfg.data_shape
    # The datamodule's node holds only its constructor's arguments: a shape key there is read from data_shape.
    for key in set(cfg.data) & set(cfg.data_shape):
        assert OmegaConf.to_container(cfg.data)[key] == f"${{data_shape.{key}}}"


def test_a_data_shape_that_the_data_contradicts_is_refused_naming_both(compose_config, tmp_path):
    cfg = compose_config("data=imagefolder", f"data.root={_image_folder(tmp_path)}", "data_shape.num_classes=3")
    with pytest.raises(
        ConfigError,
        match=re.escape("data_shape.num_classes=3 does not match the data: ImageFolderDataModule has num_classes=2"),
    ):
        assemble(cfg)
    with pytest.raises(
        ConfigError,
        match=re.escape(
            "data_shape.image_size=16 does not match the data: "
            "DigitsDataModule has image_size=8 (set data_shape.image_size=8)"
        ),
    ):
        assemble(compose_config("data_shape.image_size=16"))


def test_the_old_data_shape_overrides_are_refused_by_hydra(compose_config):
    with pytest.raises(ConfigCompositionException, match="data.num_classes"):
        compose_config("data=imagefolder", "data.root=x", "data.num_classes=2")
    with pytest.raises(ConfigCompositionException, match="data.variant"):
        compose_config("data=cifar100", "data.variant=cifar10")
    assert compose_config("data=cifar100").data.name == "cifar100"


def test_callbacks_one_file_each_all_on_by_default(compose_config):
    files = {p.stem for p in (CONF / "callbacks").glob("*.yaml")} - {"default", "ema"}
    listed = [entry for entry in OmegaConf.load(CONF / "callbacks" / "default.yaml").defaults if entry != "_self_"]
    assert set(listed) == files
    cfg = compose_config()
    assert list(cfg.callbacks) == listed
    for name in files:  # each file holds the one callback it is named after
        assert list(OmegaConf.load(CONF / "callbacks" / f"{name}.yaml")) == [name]
    assert "branch_gradients" not in compose_config("~callbacks.branch_gradients").callbacks


def test_callbacks_ema_is_the_defaults_plus_weight_ema(compose_config):
    from lightning.pytorch.callbacks import EMAWeightAveraging

    cfg = compose_config("callbacks=ema")
    assert list(cfg.callbacks) == [*compose_config().callbacks, "ema"] and cfg.callbacks.ema.decay == 0.99
    assert compose_config("callbacks=ema", "callbacks.ema.decay=0.999").callbacks.ema.decay == 0.999
    parts = assemble(compose_config("callbacks=ema", "~callbacks.deploy_check"))
    assert sum(isinstance(callback, EMAWeightAveraging) for callback in parts.callbacks) == 1


@pytest.mark.parametrize(
    ("variant", "block_type", "branches"),
    [
        ("plain", Conv, None),
        ("repconv", RepConv, {"dense", "1x1", "identity"}),
        ("repconv_n", RepConv, {"dense", "1x1"}),
        ("repconv_no1x1", RepConv, {"dense", "identity"}),
    ],
)
def test_variants_build_the_block_they_name(variant, block_type, branches, compose_config):
    cfg = compose_config(f"+variant={variant}")
    parts = assemble(cfg)
    blocks = [m for m in parts.module.model.modules() if isinstance(m, (Conv, RepConv))]
    assert blocks and all(type(m) is block_type for m in blocks)
    if branches is not None:  # the widest branch set any block of the net has
        assert set().union(*(m.branches() for m in blocks)) == branches
    assert cfg.variant == variant


def test_seed_init_variant_applies_the_article_init(compose_config):
    parts = assemble(compose_config("+variant=repconv_seed_init"))
    identities = [m.rbr_identity for m in parts.module.model.modules() if isinstance(m, RepConv) and m.rbr_identity]
    assert identities and all(torch.all(bn.weight == 0) for bn in identities)


def test_lr_variant_keeps_the_base_lr_and_sets_scale_and_warmup(compose_config):
    base = compose_config("+variant=repconv")
    cfg = compose_config("+variant=repconv_lr")
    assert cfg.lr_scale == 0.75 and cfg.scheduler.warmup_epochs > 0 and cfg.optimizer.lr == base.optimizer.lr


def test_unknown_variant_lists_the_options(compose_config):
    with pytest.raises(MissingConfigException) as error:
        compose_config("+variant=nope")
    assert "variant/nope" in str(error.value) and "repconv_seed_init" in str(error.value)


def test_unknown_key_fails(compose_config):
    with pytest.raises(ConfigCompositionException, match="optimizer.learning_rate"):
        compose_config("optimizer.learning_rate=0.1")


def test_run_dirs_of_the_same_second_differ(compose_config):
    dirs = set()
    for _ in range(3):
        from hydra import compose, initialize_config_dir

        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose("config", overrides=["+variant=plain", "seed=3"], return_hydra_config=True)
        dirs.add(OmegaConf.to_container(cfg.hydra.run, resolve=True)["dir"])
    assert len(dirs) == 3
    assert all("_plain_s3_" in d and d.startswith("outputs/") for d in dirs)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("seed=abc", "seed='abc' is not allowed: use an integer from 0 to 4294967295"),
        ("seed=-1", "seed=-1 is not allowed"),
        ("seed=true", "seed=True is not allowed"),
        ("seed=4294967296", "seed=4294967296 is not allowed"),
        ("seed=1.5", "seed=1.5 is not allowed"),
        ("optimizer.lr=inf", "optimizer.lr=inf is not allowed"),
        ("optimizer.lr=nan", "optimizer.lr=nan is not allowed"),
        ("optimizer.lr=true", "optimizer.lr=True is not allowed"),
        ("optimizer.lr=abc", "optimizer.lr='abc' is not allowed"),
        ("lr_scale=inf", "lr_scale=inf is not allowed"),
        ("lr_scale=true", "lr_scale=True is not allowed"),
        ("trainer.max_epochs=true", "trainer.max_epochs=True is not allowed"),
        ("trainer.max_epochs=2.0", "trainer.max_epochs=2.0 is not allowed"),
        ("threads=true", "threads=True is not allowed"),
        ("threads=inf", "threads=inf is not allowed"),
    ],
)
def test_values_that_cannot_work_are_refused_by_name(override, message, compose_config):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(compose_config(override))


def test_sensible_values_pass_validation(compose_config):
    validate(
        compose_config("seed=4294967295", "optimizer.lr=1e-3", "lr_scale=0.7", "trainer.max_epochs=1", "threads=null")
    )


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"not a checkpoint", "is not a torch checkpoint"),
        ({"pytorch-lightning_version": "2.6.0", "loops": {}, "ratio": fractions.Fraction(1, 3)}, "fractions.Fraction"),
        ({"pytorch-lightning_version": "2.6.0", "state_dict": {}}, "is not a Lightning training checkpoint"),
    ],
)
def test_a_checkpoint_to_resume_from_must_load_weights_only_and_be_lightnings(
    content, message, compose_config, tmp_path
):
    path = tmp_path / "resume.ckpt"
    path.write_bytes(content) if isinstance(content, bytes) else torch.save(content, path)
    with pytest.raises(ConfigError, match=re.escape(f"ckpt_path='{path}' is not allowed")) as error:
        validate(compose_config(f"ckpt_path={path}"))
    assert message in str(error.value)


def _compose_sweep(*overrides: str):
    """The config a ``-m`` command line gives, as the Hydra callback sees it at the sweep's start."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return GlobalHydra.instance().hydra.compose_config(
            "config", list(overrides), run_mode=RunMode.MULTIRUN, with_log_configuration=False
        )


def test_sweep_jobs_are_the_sweep_params_and_the_command_line_expanded_as_basic_sweeper_does():
    jobs = sweep_jobs(_compose_sweep("+sweep=default", "seed=5,6", "trainer.max_epochs=2"))
    # The sweep's +variant first, its seeds replaced in place by the command line's, the rest after, as Hydra does.
    assert jobs == [
        [f"+variant={variant}", f"seed={seed}", "+sweep=default", "trainer.max_epochs=2"]
        for variant in ("plain", "repconv")
        for seed in (5, 6)
    ]


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "sweep").glob("*.yaml") if not p.stem.startswith("_")))
def test_every_named_sweep_lists_one_job_per_cell(name):
    cfg = _compose_sweep(f"+sweep={name}")
    if "optuna" in str(cfg.hydra.sweeper._target_).lower():  # asks for its trials as it goes: no list ahead
        assert sweep_jobs(cfg) is None
        return
    cells = 1
    for values in cfg.hydra.sweeper.params.values():
        cells *= len(str(values).split(","))
    jobs = sweep_jobs(cfg)
    assert len(jobs) == cells and len({tuple(job) for job in jobs}) == cells
    assert all(f"+sweep={name}" in job for job in jobs)


def test_sweep_jobs_are_not_listed_for_a_sweeper_that_does_not_know_them_ahead():
    cfg = _compose_sweep("+variant=plain,repconv")
    cfg.hydra.sweeper._target_ = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
    assert sweep_jobs(cfg) is None


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "repablate", "+variant=repconv_n", "--cfg", "job"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=_env(),
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.variant == "repconv_n" and printed.block.use_identity is False
    assert not (tmp_path / "outputs").exists()


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env

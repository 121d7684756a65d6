"""conf/: every option of every config group composes and instantiates; bad choices fail with a clear message."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from repablate.nn import Conv, RepConv
from repablate.train.main import assemble, conf_dir

REPO = Path(__file__).resolve().parent.parent
CONF = conf_dir()
DEFAULTS = {next(iter(e)) for e in OmegaConf.to_container(OmegaConf.load(CONF / "config.yaml").defaults) if isinstance(e, dict)}
# Options needing values a user must give (a dataset on disk, ...): the overrides that make them instantiate.
NEEDS = {
    "data/imagefolder": lambda tmp: [f"data.root={_image_folder(tmp)}", "data.num_classes=2"],
    "data/cifar10": lambda tmp: [f"data.root={_folder(tmp / 'cifar-10-batches-py').parent}"],
    "data/cifar100": lambda tmp: [f"data.root={_folder(tmp / 'cifar-100-python').parent}"],
    "data/yolo": lambda tmp: ["task=detect", "model=yolov7_tiny", f"data.data_yaml={tmp / 'data.yaml'}",
                              "data.num_classes=2"],
    "task/detect": lambda tmp: ["model=yolov7_tiny", "data=shapes_detect"],
    "launcher/slurm": lambda tmp: ["trainer.accelerator=cpu", "trainer.devices=1", "trainer.num_nodes=1"],
}


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
    """Every (group, option) found in conf/, as the override that selects it."""
    found = []
    for path in sorted(CONF.rglob("*.yaml")):
        group = path.parent.relative_to(CONF).as_posix()
        if group == "." or group == "hydra":  # config.yaml itself; hydra/default.yaml is tested via the CLI
            continue
        prefix = "" if group in DEFAULTS else "+"
        found.append(f"{prefix}{group}={path.stem}")
    return found


def test_options_are_found():
    found = options()
    for expected in ("+variant=repconv", "+variant=plain", "block=plain", "model=repvgg_a0", "optimizer=adamw"):
        assert expected in found


@pytest.mark.parametrize("override", options())
def test_option_composes_and_instantiates(override, compose_config, tmp_path):
    group, option = override.lstrip("+").split("=")
    extra = NEEDS.get(f"{group}/{option}", lambda tmp: [])(tmp_path)
    cfg = compose_config(override, "trainer.max_epochs=1", *extra)
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    parts = assemble(cfg)
    assert parts.module.model is not None and parts.trainer is not None
    assert parts.datamodule.num_classes == cfg.data.num_classes


@pytest.mark.parametrize(
    ("variant", "block_type", "branches"),
    [("plain", Conv, None), ("repconv", RepConv, {"dense", "1x1", "identity"}),
     ("repconv_n", RepConv, {"dense", "1x1"}), ("repconv_no1x1", RepConv, {"dense", "identity"})],
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


def test_cfg_job_prints_the_composed_config(tmp_path):
    result = subprocess.run([sys.executable, "-m", "repablate", "+variant=repconv_n", "--cfg", "job"], cwd=tmp_path,
                            capture_output=True, text=True, env=_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    printed = OmegaConf.create(result.stdout)
    assert printed.variant == "repconv_n" and printed.block.use_identity is False
    assert not (tmp_path / "outputs").exists()


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env

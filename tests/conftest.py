"""Shared fixtures: wandb disabled and confined to the test's temp dir, torch threads restored, Hydra composition."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(autouse=True)
def wandb_sandbox(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """wandb disabled (no network, no account) and writing nowhere but the test's temp dir."""
    wandb_dir = tmp_path / "wandb-home"
    wandb_dir.mkdir()
    for name, value in {
        "WANDB_MODE": "disabled",
        "WANDB_DIR": str(wandb_dir),
        "WANDB_SILENT": "true",
        "WANDB_CONFIG_DIR": str(wandb_dir),
        "WANDB_CACHE_DIR": str(wandb_dir),
    }.items():
        monkeypatch.setenv(name, value)
    return wandb_dir


@pytest.fixture(autouse=True, scope="session")
def one_torch_thread():
    """One CPU thread per test process: CI runs two workers on two cores, and the small tensor ops of these tests
    run fastest (about 10x faster than with two contending threads, measured on the 2-core VM)."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def torch_threads(one_torch_thread):
    """Restores torch's CPU thread count: a run sets it from the config (``threads``), for the whole process."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def compose_config(tmp_path: Path):
    """``compose_config(*overrides)``: the main job's config as ``python -m repablate`` would compose it, with the
    run directory in the test's temp dir."""
    from hydra import compose, initialize_config_dir
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import open_dict

    from repablate.train.main import conf_dir, register_resolvers

    register_resolvers()

    def _compose(*overrides: str, run_dir: Path | None = None):
        run_dir = run_dir or tmp_path / "run"
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            cfg = compose("config", overrides=[f"paths.run_dir={run_dir}", *overrides], return_hydra_config=True)
        HydraConfig.instance().set_config(cfg)  # so ${hydra:...} interpolations resolve, as in a real run
        with open_dict(cfg):
            del cfg["hydra"]
        return cfg

    yield _compose
    HydraConfig.instance().cfg = None  # no Hydra state leaks into the next test

"""Every launcher in conf/launcher composes with the keys its documentation names, and a sweep launched through
Ray (+launcher=ray, on CPU workers) runs each job as a run of its own, as a user runs it.

The Ray launcher is the extra `ray` (`pip install -e ".[ray]"`), not part of `.[dev]`: without it the Ray tests
skip."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

from repablate.train.main import conf_dir
from tests.test_sweeps import compose_with_hydra

ROOT = Path(__file__).resolve().parents[1]
CONF = conf_dir()
RAY = "hydra_plugins.hydra_ray_launcher"
# Each launcher: its Hydra launcher class and the plugin module that provides it (None: Hydra's own).
LAUNCHERS = {
    "basic": ("hydra._internal.core_plugins.basic_launcher.BasicLauncher", None),
    "joblib": (
        "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
        "hydra_plugins.hydra_joblib_launcher",
    ),
    "slurm": (
        "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher",
        "hydra_plugins.hydra_submitit_launcher",
    ),
    "ray": ("hydra_plugins.hydra_ray_launcher.ray_launcher.RayLauncher", RAY),
}


def needs_plugin(module: str | None) -> None:
    if module is not None:
        pytest.importorskip(module, reason=f"{module} is not installed (an extra of pyproject.toml)")
    if module == RAY:
        pytest.importorskip("ray", reason='pip install -e ".[ray]"')


@pytest.fixture(autouse=True)
def no_hydra_state_leaks():
    yield
    HydraConfig.instance().cfg = None


# --- composing -----------------------------------------------------------------------------------------------------


def test_every_launcher_file_is_tested_here():
    assert {p.stem for p in (CONF / "launcher").glob("*.yaml")} == set(LAUNCHERS)


@pytest.mark.parametrize("name", sorted(LAUNCHERS))
def test_launcher_composes_under_a_named_sweep(name):
    target, plugin = LAUNCHERS[name]
    needs_plugin(plugin)
    cfg = compose_with_hydra("+sweep=article", f"+launcher={name}")
    assert cfg.hydra.launcher._target_ == target
    assert cfg.hydra.runtime.choices["hydra/launcher"] == {"slurm": "submitit_slurm"}.get(name, name)
    assert cfg.hydra.sweeper.params["+variant"] == "plain,repconv,repconv_n"  # the sweep is unchanged
    # The launcher's keys and the trainer's (which may read the launcher's: slurm) resolve.
    for node in (cfg.hydra.launcher, cfg.trainer):
        OmegaConf.to_container(node, resolve=True, throw_on_missing=True)


def test_ray_starts_a_local_cluster_without_dashboard_and_gives_each_job_one_gpu():
    needs_plugin(RAY)
    cfg = compose_with_hydra("+sweep=article", "+launcher=ray")
    ray = cfg.hydra.launcher.ray
    assert ray.init.address is None and ray.init.include_dashboard is False
    assert ray.remote.num_gpus == 1 and ray.remote.num_cpus == 1 and ray.remote.max_calls == 1
    # One device: the GPU Ray makes the task's only visible one (accelerator auto, or gpu when asked).
    assert cfg.trainer.devices == 1 and cfg.trainer.accelerator == "auto"


@pytest.mark.parametrize(
    "overrides, gpus, cpus",
    [
        (["hydra.launcher.ray.remote.num_gpus=0.25"], 0.25, 1),  # 4 jobs per GPU
        (["hydra.launcher.ray.remote.num_gpus=0", "hydra.launcher.ray.remote.num_cpus=2"], 0, 2),  # CPU workers
    ],
)
def test_ray_job_resources_are_command_line_keys(overrides, gpus, cpus):
    needs_plugin(RAY)
    cfg = compose_with_hydra("+sweep=article", "+launcher=ray", *overrides, "trainer.accelerator=gpu")
    assert cfg.hydra.launcher.ray.remote.num_gpus == gpus and cfg.hydra.launcher.ray.remote.num_cpus == cpus
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 1


@pytest.mark.parametrize("trainer", ["default", "ddp"])
def test_slurm_multi_node_ddp_is_one_process_per_gpu(trainer):
    """`hydra.launcher.nodes=2 hydra.launcher.gpus_per_node=4`: 4 SLURM tasks per node (one per GPU), and the
    trainer spans 4 devices on each of 2 nodes; Lightning's SLURMEnvironment takes the ranks from SLURM."""
    needs_plugin(LAUNCHERS["slurm"][1])
    if not (CONF / "trainer" / f"{trainer}.yaml").is_file():
        pytest.skip(f"conf/trainer/{trainer}.yaml is not there")
    cfg = compose_with_hydra(
        "+sweep=article",
        "+launcher=slurm",
        f"trainer={trainer}",
        "hydra.launcher.nodes=2",
        "hydra.launcher.gpus_per_node=4",
    )
    launcher = cfg.hydra.launcher
    assert launcher.nodes == 2 and launcher.gpus_per_node == 4 and launcher.tasks_per_node == 4
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.devices == 4 and cfg.trainer.num_nodes == 2


# --- a real sweep on Ray's CPU workers -------------------------------------------------------------------------------

RAY_SWEEP = [
    "-m",
    "+variant=plain,repconv",
    "seed=7",
    "+launcher=ray",
    "hydra.launcher.ray.init.num_cpus=2",  # this machine's 2 cores: both jobs at once
    "hydra.launcher.ray.remote.num_gpus=0",
    "hydra.launcher.ray.remote.num_cpus=1",
    "trainer=debug",
    "trainer.accelerator=cpu",
    "data=digits",
    "logger=csv",
    "callbacks.progress_bar.refresh_rate=0",
    "callbacks.deploy_check.export=false",
    "+callbacks.deploy_check.bench.warmup=2",
    "+callbacks.deploy_check.bench.min_run_time=0.02",
]


def _processes_with(marker: str) -> list[int]:
    """Processes whose environment carries ``marker`` (this test's subprocess and everything it started)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    found.append(int(entry.name))
            except OSError:  # gone, or not ours to read
                continue
    return found


def _processes_left(marker: str, grace_s: float) -> list[int]:
    """Ray's processes end with the driver (they share its fate on Linux); an idle worker may take a few seconds.
    Those still there after ``grace_s``."""
    deadline = time.monotonic() + grace_s
    while (left := _processes_with(marker)) and time.monotonic() < deadline:
        time.sleep(0.5)
    return left


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.timeout(420)
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds Ray's processes in /proc")
def test_a_sweep_on_ray_cpu_workers_runs_every_job(tmp_path):
    needs_plugin(RAY)
    sweep_dir = tmp_path / "sweep"
    marker = f"REPABLATE_RAY_TEST={uuid.uuid4().hex}"
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "MPLBACKEND": "Agg",
        "OMP_NUM_THREADS": "1",
        "WANDB_MODE": "disabled",
        "RAY_USAGE_STATS_ENABLED": "0",  # Ray sends nothing off the machine
        marker.split("=")[0]: marker.split("=")[1],
    }
    started = time.monotonic()
    try:
        done = subprocess.run(
            [sys.executable, "-m", "repablate", *RAY_SWEEP, f"hydra.sweep.dir={sweep_dir}"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=360,
        )
    finally:
        left = _processes_left(marker, grace_s=20)
        _kill(left)
    log = (done.stdout + done.stderr)[-6000:]
    assert done.returncode == 0, log
    assert left == [], f"Ray left processes behind: {left}"
    records = {p.parent.name: json.loads(p.read_text()) for p in sweep_dir.glob("*/results.json")}
    assert sorted(records) == ["0_plain_s7", "1_repconv_s7"], log
    for name, record in records.items():
        assert record["status"] == "completed" and record["error"] is None, (name, record["error"])
        assert record["seed"] == 7 and record["variant"] == name.split("_")[1]
        assert record["choice/launcher"] == "ray" and record["device"] == "cpu"
        assert record["run_dir"] == str(sweep_dir / name)
    listed = json.loads((sweep_dir / "sweep_jobs.json").read_text())["jobs"]
    assert [job["num"] for job in listed] == [0, 1]
    assert ["+variant=plain" in job["overrides"] for job in listed] == [True, False]
    assert all("seed=7" in job["overrides"] and "+launcher=ray" in job["overrides"] for job in listed)
    print(f"Ray sweep of 2 jobs: {time.monotonic() - started:.0f} s")

"""DDP under Hydra: one run directory, one results.json, one wandb run, one deploy check (``trainer=ddp``).

Lightning's DDP starts the other processes of a machine by re-running the entry point with the command line's
arguments. Under Hydra that re-runs a whole sweep (``-m``, or a sweep file's ``hydra.mode``) and resolves the run
directory again (a new time and random suffix). Here the first process starts the others itself, before the Trainer
exists (``ddp_processes``): each re-composes exactly this job (its overrides, in RUN mode) into this run directory
without writing a second ``.hydra/``; Lightning then finds the rendezvous in the environment and joins them, as it
does under torchrun or SLURM (which start every process themselves; then nothing is started here). Every process
trains; only global rank 0 checks, measures and writes (``launched_rank``).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from repablate.train.validation import ConfigError

log = logging.getLogger(__name__)

# What a DDP process reads to find the others; set for the first process while its job runs, then restored.
RENDEZVOUS_KEYS = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "NODE_RANK", "LOCAL_RANK")
# Strategies whose processes Lightning starts by re-running the script ("auto" is DDP with more than one device).
SPAWNING_STRATEGIES = ("auto", "ddp", "ddp_find_unused_parameters_true")
CHILD_WAIT_S = 120  # how long the first process waits for the others to exit after its run


def launched_rank(environ: dict[str, str] | None = None) -> int:
    """0 for the process of a run that writes, above 0 for its other DDP processes: torchrun's ``RANK``, SLURM's
    ``SLURM_PROCID`` (several tasks), else ``LOCAL_RANK`` (set by ``ddp_processes``) on node 0 and at least 1 on
    any other node."""
    env = os.environ if environ is None else environ
    if "RANK" in env:  # torchrun
        return int(env["RANK"])
    if int(env.get("SLURM_NTASKS", "1")) > 1 and "SLURM_PROCID" in env:
        return int(env["SLURM_PROCID"])
    local, node = int(env.get("LOCAL_RANK", "0")), int(env.get("NODE_RANK", "0"))
    return local if node == 0 else node + local


def started_externally(environ: dict[str, str] | None = None) -> bool:
    """True when something outside this process started (or will start) the job's other DDP processes."""
    env = os.environ if environ is None else environ
    return "LOCAL_RANK" in env or "RANK" in env or int(env.get("SLURM_NTASKS", "1")) > 1


def _device_count(devices: Any, accelerator: Any) -> int:
    """How many devices Lightning's ``devices`` setting means on this machine."""
    if isinstance(devices, int) and not isinstance(devices, bool) and devices >= 1:
        return devices
    if devices in (-1, "-1", "auto"):  # every GPU when training on GPUs, else Lightning's one CPU device
        import torch

        on_gpu = accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
        return torch.cuda.device_count() if on_gpu else 1
    indices = [index.strip() for index in devices.split(",") if index.strip()] if isinstance(devices, str) else []
    if indices and all(index.isdigit() for index in indices):  # "0,1": those GPUs
        return len(indices)
    if not isinstance(devices, (str, bool)) and hasattr(devices, "__len__") and len(devices):  # [0, 2]
        return len(devices)
    raise ConfigError(
        f"trainer.devices={devices!r} is not allowed: give a number of devices, a list of GPU indices, or auto"
    )


def processes_to_start(trainer_cfg: Any) -> int:
    """How many processes a run with ``trainer_cfg`` (the config's ``trainer`` node) has on this machine when this
    process must start them (Lightning's script-launched DDP, which ``auto`` is with several devices); else 1."""
    strategy = trainer_cfg.get("strategy", "auto")
    if not isinstance(strategy, str):  # a strategy node (conf/trainer/ddp.yaml): DDP when its class is
        strategy = "ddp" if str(strategy.get("_target_", "")).endswith(".DDPStrategy") else "other"
    if strategy not in SPAWNING_STRATEGIES or started_externally():
        return 1
    count = _device_count(trainer_cfg.get("devices", 1), trainer_cfg.get("accelerator", "auto"))
    if count > 1 and trainer_cfg.get("num_nodes", 1) != 1:
        raise ConfigError(
            f"trainer.num_nodes={trainer_cfg.get('num_nodes')} is not allowed here: a DDP job on several nodes is "
            "started by the cluster, one process per device (+launcher=slurm trainer=ddp, or torchrun), not from "
            "one command on one machine"
        )
    return count


def _end_with_parent() -> None:
    """In a started process, before it runs (Linux): SIGTERM when the first process dies, however it dies, so that
    no process is left waiting for a rendezvous that will not come."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def child_command(overrides: list[str], run_dir: Path, rank: int) -> list[str]:
    """The command that starts process ``rank`` of the job with ``overrides`` (its Hydra task overrides) in
    ``run_dir``: the same composition, in RUN mode, without a second ``.hydra/`` folder."""
    return [
        sys.executable,
        "-m",
        "repablate",
        *overrides,
        "hydra.mode=RUN",
        f'hydra.run.dir="{run_dir}"',
        "hydra.output_subdir=null",
        f"hydra.job.name=ddp_rank_{rank}",
    ]


class DDPProcessFailed(RuntimeError):
    """A started DDP process ended with an error while the run was going on."""


class StartedProcesses:
    """The processes ``ddp_processes`` started, watched: when one exits with an error while the run goes on, its
    ``failure`` is set and this process gets SIGTERM, so that the run ends instead of waiting in a collective for a
    process that is gone (a wait inside torch's C++ code, e.g. the rendezvous, ends first at its own timeout)."""

    def __init__(self, children: list[subprocess.Popen], poll_s: float = 1.0):
        self.children, self.failure = children, None
        self._stop = threading.Event()
        self._watcher = threading.Thread(target=self._watch, args=(poll_s,), daemon=True, name="ddp-process-watcher")
        self._watcher.start()

    def _watch(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            for rank, child in enumerate(self.children, start=1):
                code = child.poll()
                if code not in (None, 0):
                    self.failure = DDPProcessFailed(
                        f"DDP process {rank} exited with status {code} (its output: ddp_rank_{rank}.out)"
                    )
                    log.error("%s", self.failure)
                    os.kill(os.getpid(), signal.SIGTERM)
                    return

    def stop(self) -> None:
        """Stop watching (before the processes are waited for or stopped on purpose)."""
        self._stop.set()
        self._watcher.join()


@contextmanager
def ddp_processes(trainer_cfg: Any, run_dir: Path, overrides: list[str]) -> Iterator[StartedProcesses | None]:
    """Start the other processes of this run's DDP job on this machine, if this process must (see the module
    docstring), and watch them (``StartedProcesses``); yields them, or None when there are none to start. Their
    console output goes to ``run_dir/ddp_rank_<r>.out``. On the way out the environment is restored (a sweep's
    next job starts its own processes) and the others are waited for, or stopped when this process's run did not
    complete."""
    count = processes_to_start(trainer_cfg)
    if count == 1:
        yield None
        return
    saved = {key: os.environ.get(key) for key in RENDEZVOUS_KEYS}
    rendezvous = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(count)}
    os.environ.update(rendezvous, NODE_RANK="0", LOCAL_RANK="0")
    children: list[subprocess.Popen] = []
    started: StartedProcesses | None = None
    completed = False
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for rank in range(1, count):
            with open(run_dir / f"ddp_rank_{rank}.out", "wb") as output:
                env = {**os.environ, "LOCAL_RANK": str(rank)}
                children.append(
                    subprocess.Popen(
                        child_command(overrides, run_dir, rank),
                        env=env,
                        stdout=output,
                        stderr=output,
                        preexec_fn=_end_with_parent if sys.platform == "linux" else None,
                    )
                )
        started = StartedProcesses(children)
        yield started
        completed = True
    finally:
        if started is not None:
            started.stop()
        _end_children(children, completed)
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():  # Lightning leaves the group; the next job needs its own
            dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _end_children(children: list[subprocess.Popen], completed: bool) -> None:
    for rank, child in enumerate(children, start=1):
        if not completed and child.poll() is None:
            child.terminate()
        try:
            code = child.wait(timeout=CHILD_WAIT_S)
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
        if completed and code != 0:
            log.warning("DDP process %d exited with status %d (its output: ddp_rank_%d.out)", rank, code, rank)

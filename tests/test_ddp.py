"""DDP under Hydra, run the way a user runs it: ``python -m repablate trainer=ddp`` with two CPU processes (gloo).

One run directory, one results.json, one wandb run and one deploy check per run, also in a sweep; the trained
weights equal the one-process run's up to float noise; resuming under DDP continues exactly. On the CPU torch has
no SyncBatchNorm, so each process normalizes over its half of the batch: the one-process reference that computes
the same thing is half batches with two-step gradient accumulation (same samples, same pairing, same BatchNorm
statistics, the gradient averaged the same way).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from omegaconf import OmegaConf

from repablate.data.tensors import SeededBatchSampler
from repablate.train.distributed import child_command, launched_rank, processes_to_start

COMMON = [
    "+variant=repconv",
    "seed=3",
    "logger=csv",
    "~callbacks.progress_bar",
    "callbacks.deploy_check.export=false",
]
DDP = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.sync_batchnorm=false"]


REPO = Path(__file__).resolve().parent.parent


class StopAfterEpochs(Callback):
    """Ends the fit after ``epochs`` epochs in every process, as a run killed between epochs ends."""

    def __init__(self, epochs: int):
        self.epochs = epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        trainer.should_stop = trainer.current_epoch + 1 >= self.epochs


class FailInStartedProcess(Callback):
    """Raises while the run is assembled, in a started DDP process only (before the rendezvous)."""

    def __init__(self):
        if os.environ.get("LOCAL_RANK", "0") != "0":
            raise RuntimeError("failing on purpose in the started process")


def _repablate(cwd: Path, *overrides: str, timeout: int = 600, **environ: str) -> subprocess.CompletedProcess:
    # PYTHONPATH: the stop callback above is importable in every process of the run
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(REPO), **environ}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_NTASKS"):
        env.pop(key, None)
    return subprocess.run(
        [sys.executable, "-m", "repablate", *overrides], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip


def _parameters(run_dir: Path) -> dict[str, torch.Tensor]:
    """The model's trained parameters (BatchNorm's running statistics, and the metrics evaluated with them, left
    out: under DDP they are the first process's, from its half batches)."""
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    return {k: v for k, v in state.items() if k.startswith("model.") and not k.endswith(buffers)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A DDP sweep of one job (2 epochs), the one-process reference, and a DDP run stopped after its first epoch,
    resumed under DDP."""
    root = tmp_path_factory.mktemp("ddp")
    made = {}
    # wandb offline here (in a temp dir): a DDP run must make one wandb run, not one per process
    with_wandb = [o for o in COMMON if o != "logger=csv"]
    wandb_dir = root / "wandb-home"
    wandb_dir.mkdir()
    sweep = _repablate(
        root, "-m", *with_wandb, *DDP, "trainer.max_epochs=2", "hydra.sweep.dir=sweep", WANDB_MODE="offline",
        WANDB_DIR=str(wandb_dir), WANDB_CONFIG_DIR=str(wandb_dir), WANDB_CACHE_DIR=str(wandb_dir),
    )  # fmt: skip
    assert sweep.returncode == 0, sweep.stdout[-3000:] + sweep.stderr[-3000:]
    made["sweep"] = root / "sweep"
    single = root / "single"
    one = _repablate(
        root, *COMMON, "trainer.max_epochs=2", "data.batch_size=64", "+trainer.accumulate_grad_batches=2",
        "trainer.limit_train_batches=18", f"hydra.run.dir={single}",
    )  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    made["single"] = single
    first = root / "first"
    stop = [f"+callbacks.stop._target_={__name__}.StopAfterEpochs", "+callbacks.stop.epochs=1"]
    stopped = _repablate(root, *COMMON, *DDP, "trainer.max_epochs=2", *stop, f"hydra.run.dir={first}")
    assert stopped.returncode == 0, stopped.stdout[-3000:] + stopped.stderr[-3000:]
    resumed = root / "resumed"
    again = _repablate(
        root, *COMMON, *DDP, "trainer.max_epochs=2", f"ckpt_path={first / 'checkpoints' / 'last.ckpt'}",
        f"hydra.run.dir={resumed}",
    )  # fmt: skip
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    made["resumed"] = resumed
    made["first"] = first
    return made


def _results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.mark.slow
def test_a_ddp_sweep_job_writes_one_run_directory_and_one_record(runs):
    sweep = runs["sweep"]
    jobs = [path for path in sweep.iterdir() if path.is_dir()]
    assert [job.name for job in jobs] == ["0_repconv_s3"]  # the other process made no directory of its own
    job = jobs[0]
    record = _results(job)
    assert record["status"] == "completed" and record["processes"] == 2 and record["global_step"] == 18
    assert record["equivalence/max_rel"] < 1e-5 and "deploy_form/test/acc" in record  # one deploy check, in rank 0
    assert len(list(sweep.rglob("results.json"))) == 1 and len(list(sweep.rglob(".hydra"))) == 1
    assert (job / "ddp_rank_1.out").is_file() and (job / "checkpoints" / "deploy.pt").is_file()
    assert len(list(job.glob("wandb/offline-run-*"))) == 1  # one wandb run for the two processes
    assert json.loads((sweep / "sweep_jobs.json").read_text())["jobs"][0]["overrides"][0] == "+variant=repconv"


@pytest.mark.slow
def test_ddp_trains_what_one_process_trains_up_to_float_noise(runs):
    job = next(path for path in runs["sweep"].iterdir() if path.is_dir())
    ddp, single = _parameters(job), _parameters(runs["single"])
    assert ddp.keys() == single.keys()
    # 18 SGD steps of float32 sums taken in another order: differences of ~1e-6 relative; a wrong split of the
    # batches (another sample order, a doubled batch, unaveraged gradients) moves weights by 1e-2 and more.
    for key in ddp:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-4, atol=1e-5, msg=key)
    assert _results(job)["global_step"] == _results(runs["single"])["global_step"]


@pytest.mark.slow
def test_a_ddp_run_resumed_under_ddp_continues_exactly(runs):
    job = next(path for path in runs["sweep"].iterdir() if path.is_dir())
    resumed = _results(runs["resumed"])
    assert resumed["status"] == "completed" and resumed["epochs"] == 2 and resumed["global_step"] == 18
    uninterrupted, continued = _parameters(job), _parameters(runs["resumed"])
    for key in uninterrupted:
        torch.testing.assert_close(continued[key], uninterrupted[key], rtol=1e-5, atol=1e-6, msg=key)
    assert (runs["resumed"] / "ddp_rank_1.out").is_file() and _results(runs["first"])["processes"] == 2


def test_each_process_draws_its_part_of_every_one_process_batch():
    cases = [(50, 8, True, True, 2), (50, 8, False, False, 2), (9, 4, False, False, 3)]  # (9, 4, 3): an empty part
    for size, batch, shuffle, drop_last, world in cases:
        whole = list(SeededBatchSampler(size, batch, shuffle, seed=1, drop_last=drop_last))
        parts = [list(SeededBatchSampler(size, batch, shuffle, 1, drop_last, r, world)) for r in range(world)]
        for rank, part in enumerate(parts):
            assert len(part) == len(SeededBatchSampler(size, batch, shuffle, 1, drop_last, rank, world))
            assert all(len(indices) > 0 for indices in part)  # an empty part of a short last batch is skipped
        for index, indices in enumerate(whole):
            pieces = [part[index] for part in parts if index < len(part)]
            assert torch.equal(torch.cat(pieces), indices)
    with pytest.raises(ValueError, match=r"rank=2 is not allowed: it must be an integer in \[0, 2\)"):
        SeededBatchSampler(10, 2, False, rank=2, world_size=2)


def test_a_global_batch_that_the_processes_cannot_share_is_refused():
    from types import SimpleNamespace

    from repablate.data import DigitsDataModule

    data = DigitsDataModule(batch_size=63)
    data.trainer = SimpleNamespace(
        global_rank=0, world_size=2, strategy=SimpleNamespace(root_device=torch.device("cpu"))
    )
    with pytest.raises(ValueError, match="batch_size=63 is not allowed with 2 processes"):
        data.train_dataloader()


def test_the_processes_to_start_and_their_command(monkeypatch, tmp_path):
    for key in ("LOCAL_RANK", "RANK", "SLURM_NTASKS", "SLURM_PROCID", "NODE_RANK"):
        monkeypatch.delenv(key, raising=False)
    assert processes_to_start({"strategy": "ddp", "devices": 4, "num_nodes": 1}) == 4
    assert processes_to_start({"strategy": "ddp", "devices": [0, 2], "num_nodes": 1}) == 2
    assert processes_to_start({"strategy": "auto", "devices": 1}) == 1
    assert processes_to_start({"strategy": "auto", "devices": 2, "num_nodes": 1}) == 2  # Lightning's auto is DDP
    node = OmegaConf.create({"strategy": {"_target_": "lightning.pytorch.strategies.DDPStrategy"}, "devices": 3})
    assert processes_to_start(node) == 3  # conf/trainer/ddp.yaml's form
    if not torch.cuda.is_available():
        assert processes_to_start({"strategy": "auto", "devices": "auto", "accelerator": "auto"}) == 1
    with pytest.raises(ValueError, match="trainer.devices='two' is not allowed"):
        processes_to_start({"strategy": "ddp", "devices": "two"})
    with pytest.raises(ValueError, match="trainer.num_nodes=2 is not allowed here"):
        processes_to_start({"strategy": "ddp", "devices": 4, "num_nodes": 2})
    monkeypatch.setenv("SLURM_NTASKS", "8")  # SLURM started every process: none to start here
    monkeypatch.setenv("SLURM_PROCID", "5")
    assert processes_to_start({"strategy": "ddp", "devices": 4, "num_nodes": 2}) == 1 and launched_rank() == 5
    command = child_command(["+variant=repconv", "seed=1"], tmp_path, 1)
    assert command[1:5] == ["-m", "repablate", "+variant=repconv", "seed=1"]
    assert "hydra.mode=RUN" in command and f'hydra.run.dir="{tmp_path}"' in command
    assert "hydra.output_subdir=null" in command


def _processes_with(marker: str) -> list[int]:
    """PIDs of the processes whose command line contains ``marker`` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:  # a process that ended while we looked
            continue
    return found


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
def test_the_started_process_ends_when_the_first_process_is_killed(tmp_path):
    import signal
    import time

    run_dir = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "repablate", *COMMON, *DDP, "trainer.max_epochs=50", f"hydra.run.dir={run_dir}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    marker = f'hydra.run.dir="{run_dir}"'  # only the started process has it quoted this way (child_command)
    try:
        deadline = time.monotonic() + 120
        while not (run_dir / "metrics.csv").exists() and time.monotonic() < deadline:  # training has started
            time.sleep(0.5)
        started = _processes_with(marker)
        assert len(started) == 1, "the second DDP process was not found"
        first.send_signal(signal.SIGKILL)  # no handler runs: only the kernel can tell the other process
        first.wait(timeout=30)
        deadline = time.monotonic() + 60
        while _processes_with(marker) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not _processes_with(marker), "the second DDP process outlived the first"
    finally:
        first.kill()
        for pid in _processes_with(marker):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.slow
def test_a_started_process_that_fails_fails_the_run_naming_it(tmp_path):
    run_dir = tmp_path / "run"
    failing = [f"+callbacks.fail._target_={__name__}.FailInStartedProcess", "trainer.strategy.timeout.minutes=0.25"]
    done = _repablate(tmp_path, *COMMON, *DDP, "trainer.max_epochs=1", *failing, f"hydra.run.dir={run_dir}")
    record = _results(run_dir)
    # The first process waits at the rendezvous until the strategy's timeout (15 s here), then records the cause.
    assert done.returncode == 1 and record["status"] == "failed"
    assert record["error"] == "DDPProcessFailed: DDP process 1 exited with status 1 (its output: ddp_rank_1.out)"
    assert "failing on purpose in the started process" in (run_dir / "ddp_rank_1.out").read_text()


def test_an_eval_batch_smaller_than_the_processes_is_refused():
    from types import SimpleNamespace

    from repablate.data import DigitsDataModule

    data = DigitsDataModule(batch_size=64, eval_batch_size=1)
    data.trainer = SimpleNamespace(
        global_rank=0, world_size=2, strategy=SimpleNamespace(root_device=torch.device("cpu"))
    )
    with pytest.raises(ValueError, match="eval_batch_size=1 is not allowed with 2 processes and a val split of 180"):
        data.val_dataloader()

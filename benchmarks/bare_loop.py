"""Training throughput of the harness against a bare PyTorch loop on the same model, data and optimizer.

    python benchmarks/bare_loop.py [--variant repconv] [--epochs 5] [--rounds 3] [overrides ...]

The harness is the main job's own assembly (repablate.train.main.assemble: Lightning Trainer, the default
callbacks and loggers, wandb offline) minus the deploy check, which runs after training. The bare loop is
forward, cross-entropy, backward, optimizer and scheduler steps over the same DataLoader. Both are timed the same
way, from each epoch's start to its last batch's end (validation excluded), in alternating rounds so that a busy
spell of a shared machine hits both. Per epoch, images/s by the wall clock and by this process's CPU time; the
best and median epoch of each, and their ratios, are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import open_dict

from repablate.train.callbacks import TrainingThroughput
from repablate.train.main import assemble, build_datamodule, conf_dir, register_resolvers


def compose_run(overrides: list[str], run_dir: Path):
    """The main job's config for ``overrides``, writing into ``run_dir``."""
    register_resolvers()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[f"paths.run_dir={run_dir}", "~callbacks.deploy_check", *overrides],
            return_hydra_config=True,
        )
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


class EpochThroughput(TrainingThroughput):
    """TrainingThroughput that also keeps each epoch's images/s."""

    def __init__(self):
        super().__init__()
        self.per_epoch: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        super().on_train_epoch_start(trainer, pl_module)
        self._before = self.images, self.seconds, time.process_time()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        self._cpu_end = time.process_time()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        images, seconds, cpu = self._before
        images = self.images - images
        self.per_epoch.append((images / (self.seconds - seconds), images / (self._cpu_end - cpu)))


def harness_images_per_s(cfg) -> list[float]:
    """Train with the harness; images/s of each epoch, timed as results.json's train/images_per_s is."""
    parts = assemble(cfg)
    throughput = EpochThroughput()  # in place of the harness's TrainingThroughput, which it extends: no extra callback
    callbacks = parts.trainer.callbacks
    callbacks[:] = [throughput if isinstance(c, TrainingThroughput) else c for c in callbacks]
    parts.trainer.fit(parts.module, datamodule=parts.datamodule)
    for logger in parts.loggers:
        if hasattr(logger.experiment, "finish"):
            logger.experiment.finish()
    return throughput.per_epoch


def bare_images_per_s(cfg) -> list[float]:
    """The same training in a plain loop: same seed, data order, model, init, optimizer, schedule."""
    torch.manual_seed(cfg.seed)
    if cfg.get("threads") is not None:
        torch.set_num_threads(cfg.threads)
    datamodule = build_datamodule(cfg.data, cfg.data_shape)
    datamodule.setup("fit")
    model = instantiate(cfg.model)
    instantiate(cfg.init)(model)
    optimizer = instantiate(cfg.optimizer)(model.parameters())
    for group in optimizer.param_groups:
        group["lr"] *= cfg.lr_scale
    loader = datamodule.train_dataloader()
    epochs = cfg.trainer.max_epochs
    scheduler = instantiate(cfg.scheduler)(optimizer, total_steps=epochs * len(loader), steps_per_epoch=len(loader))
    model.train()
    per_epoch = []
    for epoch in range(epochs):
        loader.sampler.set_epoch(epoch)
        images, start, cpu = 0, time.perf_counter(), time.process_time()
        for x, y in loader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            images += len(x)
        per_epoch.append((images / (time.perf_counter() - start), images / (time.process_time() - cpu)))
    return per_epoch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="repconv")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="further Hydra overrides, e.g. data=shapes threads=2")
    args = parser.parse_args()
    os.environ.setdefault("WANDB_MODE", "offline")
    harness, bare = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            overrides = [f"+variant={args.variant}", f"trainer.max_epochs={args.epochs}", *args.overrides]
            cfg = compose_run(overrides, Path(tmp) / f"round{round_}")
            harness += harness_images_per_s(cfg)
            bare += bare_images_per_s(cfg)
            print(f"round {round_} done", flush=True)
    print(
        f"variant={args.variant} epochs={args.epochs} rounds={args.rounds} threads={torch.get_num_threads()} "
        f"torch={torch.__version__} overrides={args.overrides}"
    )
    # Wall clock is what a user waits for, but on a shared machine it mostly measures the neighbours; CPU time
    # of this process (one thread) measures the work each loop does. Best epoch: the least disturbed one.
    for clock, index in (("wall", 0), ("cpu", 1)):
        h, b = [e[index] for e in harness], [e[index] for e in bare]
        print(
            f"{clock:4} clock: harness best {max(h):.0f} / median {statistics.median(h):.0f} images/s; bare loop "
            f"best {max(b):.0f} / median {statistics.median(b):.0f} images/s; harness / bare: best "
            f"{max(h) / max(b):.3f}, median {statistics.median(h) / statistics.median(b):.3f}"
        )


if __name__ == "__main__":
    main()

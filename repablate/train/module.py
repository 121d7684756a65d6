"""The classification LightningModule (``task=classify``), a ``repablate.train.task.TaskModule``:
``evaluate(model, dataloader) -> {"acc"}``, top-1 accuracy."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics import MaxMetric
from torchmetrics.classification import MulticlassAccuracy

from repablate.train.schedules import configure_optimization
from repablate.train.task import OptimizerFactory, SchedulerFactory, TaskModule


class ClassificationModule(TaskModule):
    """Cross-entropy training with top-1 accuracy (torchmetrics for validation and test). Logs ``train/loss``,
    ``train/loss_epoch``, ``train/acc``, ``val/loss``, ``val/acc``, ``val/acc_best`` and ``test/acc``.

    Args:
        model: the network, images (N, in_channels, image_size, image_size) -> logits (N, num_classes).
        optimizer: ``optimizer(parameters)`` builds the optimizer (a Hydra partial).
        scheduler: ``scheduler(optimizer, total_steps=, steps_per_epoch=)`` builds a per-step schedule, or None.
        num_classes, in_channels, image_size: of the data.
        lr_scale: multiplies the optimizer's learning rate (the article's advice for RepConv is 0.75).
        channels_last, compile, compile_options: as in ``TaskModule``.
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None = None,
        num_classes: int = 10,
        in_channels: int = 3,
        image_size: int = 32,
        lr_scale: float = 1.0,
        channels_last: bool = False,
        compile: bool = False,
        compile_options: dict | None = None,
    ):
        super().__init__(
            model,
            optimizer,
            scheduler,
            num_classes,
            in_channels,
            image_size,
            lr_scale,
            channels_last,
            compile,
            compile_options,
        )
        self.val_acc, self.test_acc = self.new_metric(), self.new_metric()
        self.val_acc_best = MaxMetric()
        self.val_acc_best.persistent(True)  # saved in checkpoints, so a resumed run keeps its best

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self.run_model(x)
        loss = F.cross_entropy(logits, y)
        # Epoch figures accumulate in plain tensors and self.log runs only on logging steps: each self.log call
        # costs Lightning's result bookkeeping, which on a small CPU model is a tenth of a training step.
        with torch.no_grad():
            self._loss_sum += loss * len(y)
            self._correct += (logits.argmax(dim=1) == y).sum()
        self._seen += len(y)
        every = self.trainer.log_every_n_steps
        if every and (self.trainer.global_step + 1) % every == 0:  # the steps Lightning writes to the loggers
            self.log("train/loss", loss, prog_bar=True)
        return loss

    def on_train_epoch_start(self) -> None:
        self._loss_sum, self._correct = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        self._seen = 0

    def on_train_epoch_end(self) -> None:
        if self._seen:  # running (train-mode) figures of the epoch, as is usual for training metrics
            # sync_dist: under DDP, the mean over the processes (each saw an equal part of every batch)
            self.log("train/loss_epoch", self._loss_sum / self._seen, sync_dist=True)
            self.log("train/acc", self._correct / self._seen, sync_dist=True)

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        logits = self.run_model(x)
        self.val_acc.update(logits, y)
        self.log("val/loss", F.cross_entropy(logits, y), on_step=False, on_epoch=True, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        acc = self.val_acc.compute()
        self.val_acc.reset()
        self.log("val/acc", acc, prog_bar=True, sync_dist=True)  # the same in every process: gathered by compute
        if not self.trainer.sanity_checking:
            self.val_acc_best.update(acc)
            self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)

    def test_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        self.test_acc(self.run_model(x), y)
        self.log("test/acc", self.test_acc, on_step=False, on_epoch=True)

    def new_metric(self, sync_on_compute: bool = True) -> MulticlassAccuracy:
        return MulticlassAccuracy(self.num_classes, average="micro", sync_on_compute=sync_on_compute)

    def update_metric(self, metric: MulticlassAccuracy, outputs: torch.Tensor, targets: torch.Tensor) -> None:
        metric.update(outputs, targets)

    def metric_results(self, metric: MulticlassAccuracy) -> dict[str, float]:
        """Top-1 accuracy: ``{"acc": ...}``."""
        return {"acc": metric.compute().item()}

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A random batch of images of the data's shape, on the module's device."""
        return torch.randn(batch_size, self.in_channels, self.image_size, self.image_size, device=self.device)

    def configure_optimizers(self):
        return configure_optimization(
            self, self.parameters(), self.optimizer_factory, self.scheduler_factory, self.lr_scale
        )

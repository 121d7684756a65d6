"""What every task module (``task=classify``, ``task=detect``) has in common, and what the callbacks rely on:

- ``self.model``: the ``nn.Module`` being trained (what ``repablate.nn.reparameterize`` is applied to);
- ``evaluate(model, dataloader) -> dict[str, float]``: metrics of any form of the model, in eval mode, no grad;
- ``example_input(batch_size=1) -> Tensor``: an input of the right shape for equivalence checks and benchmarks.

``TaskModule`` holds the model, the data's shape and the optimization settings, and runs ``evaluate``'s loop once
for every task; a task says what its metric is (``new_metric``), how a batch's outputs update it
(``update_metric``) and what it reports (``metric_results``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torchmetrics import Metric

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]
SchedulerFactory = Callable[..., torch.optim.lr_scheduler.LRScheduler]


class TaskModule(pl.LightningModule):
    """A LightningModule training ``model`` on images of ``in_channels`` x ``image_size`` x ``image_size``.

    Args:
        model: the network; ``self.model``.
        optimizer: builds the optimizer from parameters or parameter groups (a Hydra partial).
        scheduler: ``scheduler(optimizer, total_steps=, steps_per_epoch=)`` builds a per-step schedule, or None.
        num_classes, in_channels, image_size: of the data.
        lr_scale: multiplies the optimizer's learning rate (the article's advice for RepConv is 0.75).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: OptimizerFactory,
        scheduler: SchedulerFactory | None,
        num_classes: int,
        in_channels: int,
        image_size: int,
        lr_scale: float,
    ):
        super().__init__()
        if not lr_scale > 0:
            raise ValueError(f"lr_scale={lr_scale!r} is not allowed: it must be a positive number")
        self.model = model
        self.optimizer_factory, self.scheduler_factory, self.lr_scale = optimizer, scheduler, lr_scale
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataloader: Iterable) -> dict[str, float]:
        """The task's metrics of ``model`` (either form) over ``dataloader``'s (inputs, targets) batches, on this
        module's device, in eval mode and without gradients; ``model``'s mode is restored afterwards."""
        metric = self.new_metric().to(self.device)
        was_training = model.training
        model.eval()
        try:
            for inputs, targets in dataloader:
                self.update_metric(metric, model(inputs.to(self.device)), targets.to(self.device))
        finally:
            model.train(was_training)
        return self.metric_results(metric)

    def new_metric(self) -> Metric:
        """A fresh metric for one evaluation."""
        raise NotImplementedError

    def update_metric(self, metric: Metric, outputs: Any, targets: torch.Tensor) -> None:
        """Add one batch: the model's eval-mode ``outputs`` and the batch's ``targets``."""
        raise NotImplementedError

    def metric_results(self, metric: Metric) -> dict[str, float]:
        """What ``evaluate`` reports, as plain floats."""
        raise NotImplementedError

    def example_input(self, batch_size: int = 1) -> torch.Tensor:
        """A batch of random images of the data's shape, on the module's device."""
        raise NotImplementedError

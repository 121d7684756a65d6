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
        channels_last: keep the model's weights and each batch's images in the channels-last memory format (faster
            convolutions on tensor-core GPUs).
        compile: train with ``torch.compile(model, **compile_options)``; the steps call ``run_model``, which uses
            it. ``self.model`` stays the eager module: checkpoints, the deploy check and the measurements see it.
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
        channels_last: bool = False,
        compile: bool = False,
        compile_options: dict[str, Any] | None = None,
    ):
        super().__init__()
        if not lr_scale > 0:
            raise ValueError(f"lr_scale={lr_scale!r} is not allowed: it must be a positive number")
        for name, value in (("channels_last", channels_last), ("compile", compile)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} is not allowed: it must be true or false")
        self.model = model
        self.optimizer_factory, self.scheduler_factory, self.lr_scale = optimizer, scheduler, lr_scale
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        self.channels_last = channels_last
        if channels_last:
            model.to(memory_format=torch.channels_last)
        # Kept out of the module tree (not a submodule): the compiled wrapper shares self.model's parameters and
        # would otherwise add a second copy of every key to the state dict.
        self.__dict__["_compiled_model"] = torch.compile(model, **(compile_options or {})) if compile else None

    def forward(self, x: torch.Tensor) -> Any:
        return self.model(x)

    def run_model(self, x: torch.Tensor) -> Any:
        """The model's output in the training, validation and test steps: compiled with ``compile``, else eager;
        with ``channels_last``, ``x`` is first put in that memory format (on the device, a no-op when it is)."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        compiled = self.__dict__["_compiled_model"]
        return self.model(x) if compiled is None else compiled(x)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Lightning's, skipped without a clip value (then it clips nothing): saves its argument checks every step."""
        if gradient_clip_val:
            super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, dataloader: Iterable) -> dict[str, float]:
        """The task's metrics of ``model`` (either form) over ``dataloader``'s (inputs, targets) batches, on this
        module's device, in eval mode and without gradients; ``model``'s mode is restored afterwards. The loader's
        batches are all there is: under DDP nothing is gathered from the other processes (the deploy check runs in
        the first process alone, on whole batches)."""
        metric = self.new_metric(sync_on_compute=False).to(self.device)
        # A model held in bfloat16 (precision=bf16-true) gets bf16 inputs; one without parameters (an ONNX graph's
        # wrapper) gets them as they come.
        dtype = next((parameter.dtype for parameter in model.parameters()), None)
        was_training = model.training
        model.eval()
        try:
            for inputs, targets in dataloader:
                float_inputs = dtype is not None and inputs.is_floating_point()
                inputs = inputs.to(self.device, dtype) if float_inputs else inputs.to(self.device)
                self.update_metric(metric, model(inputs), targets.to(self.device))
        finally:
            model.train(was_training)
        return self.metric_results(metric)

    def new_metric(self, sync_on_compute: bool = True) -> Metric:
        """A fresh metric; ``sync_on_compute``: computed over every DDP process's updates (torchmetrics)."""
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

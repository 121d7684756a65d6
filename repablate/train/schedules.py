"""Learning-rate schedules built from torch's own schedulers, stepped once per optimizer step."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

DECAYS = ("cosine", "constant")


def warmup_schedule(
    optimizer: Optimizer,
    total_steps: int,
    steps_per_epoch: float,
    decay: str = "cosine",
    warmup_epochs: float = 0.0,
    warmup_start_factor: float = 0.1,
    eta_min: float = 0.0,
) -> LRScheduler:
    """Linear warm-up from ``warmup_start_factor`` x lr over ``warmup_epochs``, then ``decay`` to the end.

    ``decay``: "cosine" (cosine annealing to ``eta_min`` at ``total_steps``) or "constant". Warm-up is given in
    epochs (fractions allowed) and converted to steps with ``steps_per_epoch``.
    """
    if decay not in DECAYS:
        raise ValueError(f"scheduler decay={decay!r} is not allowed: choose one of {list(DECAYS)}")
    if not warmup_epochs >= 0:
        raise ValueError(f"scheduler warmup_epochs={warmup_epochs!r} is not allowed: it must be 0 or more")
    if not 0 < warmup_start_factor <= 1:
        raise ValueError(f"scheduler warmup_start_factor={warmup_start_factor!r} is not allowed: it must be in (0, 1]")
    total_steps = max(1, int(total_steps))
    warmup_steps = min(total_steps - 1, round(warmup_epochs * steps_per_epoch))
    if decay == "cosine":
        after = CosineAnnealingLR(optimizer, T_max=max(1, total_steps - warmup_steps), eta_min=eta_min)
    else:
        after = ConstantLR(optimizer, factor=1.0, total_iters=0)
    if warmup_steps <= 0:
        return after
    warmup = LinearLR(optimizer, start_factor=warmup_start_factor, end_factor=1.0, total_iters=warmup_steps)
    return SequentialLR(optimizer, [warmup, after], milestones=[warmup_steps])


def configure_optimization(module, params, optimizer_factory, scheduler_factory, lr_scale: float = 1.0):
    """What a LightningModule's ``configure_optimizers`` returns: the optimizer over ``params`` (parameters or
    param groups) with its learning rates scaled by ``lr_scale``, and the per-step schedule if there is one."""
    optimizer = optimizer_factory(params)
    for group in optimizer.param_groups:  # before any scheduler, which records the lr it starts from
        group["lr"] *= lr_scale
    if scheduler_factory is None:
        return optimizer
    total_steps = int(module.trainer.estimated_stepping_batches)
    steps_per_epoch = total_steps / max(1, module.trainer.max_epochs or 1)
    scheduler = scheduler_factory(optimizer, total_steps=total_steps, steps_per_epoch=steps_per_epoch)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

"""LR schedulers as Lightning scheduler dicts, built from Hydra partials.

Each builder takes the optimizer plus `total_steps` and `steps_per_epoch` (known only
once the Trainer has the data), and returns what `configure_optimizers` returns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from torch.optim import Optimizer, lr_scheduler

from vision_tl.core.shims import set_last_lr


def step_lr(
    optimizer: Optimizer, *, step_size: int = 7, gamma: float = 0.1, **_: Any
) -> dict[str, Any]:
    """Multiply the LR by `gamma` every `step_size` epochs (the classic StepLR recipe)."""
    return {"scheduler": lr_scheduler.StepLR(optimizer, step_size, gamma), "interval": "epoch"}


@dataclass
class WarmupCosine:
    """The LR factor at a step: linear warmup for `warmup` steps, then cosine decay to
    `min_lr_ratio` at `total_steps`. An object, not a closure, so LambdaLR saves it in
    checkpoints and a time budget can move its horizon (`replan`)."""

    total_steps: int
    warmup: int
    min_lr_ratio: float
    steps_per_epoch: int

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        progress = min(1.0, (step - self.warmup) / max(1, self.total_steps - self.warmup))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return self.min_lr_ratio + (1 - self.min_lr_ratio) * cosine

    def replan(self, epochs: int) -> None:
        """End the schedule after `epochs` epochs."""
        self.total_steps = epochs * self.steps_per_epoch


def cosine_with_warmup(
    optimizer: Optimizer,
    *,
    total_steps: int,
    steps_per_epoch: int,
    warmup_epochs: float = 1.0,
    min_lr_ratio: float = 0.0,
    **_: Any,
) -> dict[str, Any]:
    """Linear warmup for `warmup_epochs`, then cosine decay to `min_lr_ratio` x LR, per step."""
    warmup = min(int(warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    factor = WarmupCosine(total_steps, warmup, min_lr_ratio, steps_per_epoch)
    return {"scheduler": lr_scheduler.LambdaLR(optimizer, factor), "interval": "step"}


def one_cycle(
    optimizer: Optimizer, *, total_steps: int, pct_start: float = 0.3, **_: Any
) -> dict[str, Any]:
    """OneCycleLR peaking at each param group's configured LR."""
    max_lr = [group["lr"] for group in optimizer.param_groups]
    scheduler = lr_scheduler.OneCycleLR(
        optimizer, max_lr=max_lr, total_steps=max(total_steps, 1), pct_start=pct_start
    )
    return {"scheduler": scheduler, "interval": "step"}


def reduce_on_plateau(
    optimizer: Optimizer,
    *,
    monitor: str = "val/loss",
    mode: str = "min",
    factor: float = 0.1,
    patience: int = 3,
    **_: Any,
) -> dict[str, Any]:
    """Cut the LR by `factor` when `monitor` stops improving for `patience` epochs."""
    scheduler = lr_scheduler.ReduceLROnPlateau(
        optimizer, mode=mode, factor=factor, patience=patience
    )
    return {"scheduler": scheduler, "interval": "epoch", "monitor": monitor}


def add_param_group(optimizer: Optimizer, schedulers: list, params: list, lr_scale: float) -> None:
    """Add `params` mid-training (gradual unfreezing) so optimizer and schedulers agree.

    The new group copies group 0's settings with every LR-like value scaled by
    `lr_scale`, and each scheduler's per-group lists grow by one entry.
    """
    template = optimizer.param_groups[0]
    group = {k: v for k, v in template.items() if k != "params"}
    for key in ("lr", "initial_lr", "max_lr", "min_lr"):
        if key in group:
            group[key] = group[key] * lr_scale
    optimizer.add_param_group({"params": params, **group})
    for scheduler in schedulers:
        if hasattr(scheduler, "base_lrs"):
            scheduler.base_lrs.append(scheduler.base_lrs[0] * lr_scale)
        if hasattr(scheduler, "lr_lambdas"):
            scheduler.lr_lambdas.append(scheduler.lr_lambdas[0])
        if hasattr(scheduler, "min_lrs"):
            scheduler.min_lrs.append(scheduler.min_lrs[0])
        if isinstance(scheduler, lr_scheduler.LRScheduler):
            set_last_lr(scheduler, [*scheduler.get_last_lr(), group["lr"]])

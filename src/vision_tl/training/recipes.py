"""Fine-tuning recipes: EMA weights, Mixup/CutMix, layer-wise LR decay, a time budget and an
LR finder. Each is off by default and switched on by its config keys (README, "Fine-tuning
recipes")."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Timer, WeightAveraging
from torch import nn
from torchvision.transforms import v2

from vision_tl.core.io import write_json
from vision_tl.data.augment import Inputs

log = logging.getLogger(__name__)

# ------------------------------------------------------------------ EMA


def ema_avg_fn(decay: float, warmup: bool) -> Callable[..., torch.Tensor]:
    """`AveragedModel`'s update rule: EMA with timm's warmup, decay = min(decay, (1+n)/(10+n))
    after n updates, so that a short run's average is not stuck near the initial weights."""

    def update(average: torch.Tensor, current: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        rate = min(decay, (1 + float(n)) / (10 + float(n))) if warmup else decay
        return average + (current - average) * (1 - rate)

    return update


class EMA(WeightAveraging):
    """Lightning's weight averaging as an EMA of the weights (and BatchNorm statistics).

    Validation during fit runs on the EMA weights, checkpoints hold them as `state_dict`
    (the raw weights go to `current_model_state`, for resuming), and at the end of fit the
    task keeps them. Outside fit (the calibration pass, test, eval) the callback stays out
    of the way: those runs use exactly the weights of the checkpoint they load.
    """

    def __init__(self, decay: float, warmup: bool = True, every_n_steps: int = 1) -> None:
        super().__init__(use_buffers=True, avg_fn=ema_avg_fn(decay, warmup))
        self.every_n_steps = every_n_steps

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx % self.every_n_steps == 0

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self._average_model = None

    def on_load_checkpoint(
        self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._average_model is not None:  # a resumed fit; else `state_dict` is the EMA
            super().on_load_checkpoint(trainer, pl_module, checkpoint)


def build_ema(spec: Mapping[str, Any] | None) -> EMA | None:
    """The EMA callback for the `ema` config, or None when `ema.decay` is null."""
    spec = dict(spec or {})
    if spec.get("decay") is None:
        return None
    warmup, every = bool(spec.get("warmup", True)), int(spec.get("every_n_steps", 1))
    return EMA(float(spec["decay"]), warmup, every)


# ------------------------------------------------------------------ Mixup / CutMix


class BatchMix:
    """Mixup and/or CutMix (torchvision v2) on a training batch, with probability `prob`:
    returns the (possibly mixed) images and soft targets (rows sum to 1)."""

    def __init__(self, num_classes: int, alpha: float, cutmix_alpha: float, prob: float) -> None:
        choices: list[nn.Module] = []
        if alpha > 0:
            choices.append(v2.MixUp(alpha=alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
        self.alphas = {"mixup": alpha, "cutmix": cutmix_alpha}
        self.num_classes = num_classes
        self.prob = prob

    def __call__(self, x: Inputs, y: torch.Tensor) -> tuple[Inputs, torch.Tensor]:
        if isinstance(x, list | tuple):  # one batch per ensemble member (own sizes)
            return self._per_member(list(x), y)
        if float(torch.rand(())) < self.prob:
            return self.mix(x, y)
        return x, F.one_hot(y, self.num_classes).to(x.dtype)

    def _per_member(
        self, xs: list[torch.Tensor], y: torch.Tensor
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """torchvision's Mixup / CutMix with one draw for every member's batch: the same
        mixing weight and partner (the batch rolled by one), and for CutMix the same
        relative box, cut at each member's own size."""
        target = F.one_hot(y, self.num_classes).to(xs[0].dtype)
        if float(torch.rand(())) >= self.prob:
            return tuple(xs), target
        kinds = [k for k, a in self.alphas.items() if a > 0]
        kind = kinds[int(torch.randint(len(kinds), ()))]
        alpha = self.alphas[kind]
        lam = float(torch.distributions.Beta(alpha, alpha).sample())
        if kind == "mixup":
            mixed = tuple(x.roll(1, 0).mul(1 - lam).add_(x.mul(lam)) for x in xs)
        else:
            cy, cx = float(torch.rand(())), float(torch.rand(()))
            half = math.sqrt(1 - lam) / 2
            box = (max(cy - half, 0), min(cy + half, 1), max(cx - half, 0), min(cx + half, 1))
            mixed = tuple(_paste(x, box) for x in xs)
            lam = 1 - (box[1] - box[0]) * (box[3] - box[2])
        return mixed, target.roll(1, 0).mul(1 - lam).add_(target.mul(lam))


def _paste(x: torch.Tensor, box: tuple[float, float, float, float]) -> torch.Tensor:
    """`x` with the relative `box` (top, bottom, left, right) taken from the rolled batch."""
    h, w = x.shape[-2:]
    top, bottom = round(box[0] * h), round(box[1] * h)
    left, right = round(box[2] * w), round(box[3] * w)
    out = x.clone()
    out[..., top:bottom, left:right] = x.roll(1, 0)[..., top:bottom, left:right]
    return out


def build_mixup(spec: Mapping[str, Any] | None, num_classes: int) -> BatchMix | None:
    """The batch mixer for the `mixup` config; None when `prob` is 0 or both alphas are 0."""
    spec = dict(spec or {})
    alpha, cutmix = float(spec.get("alpha", 0.0)), float(spec.get("cutmix_alpha", 0.0))
    prob = float(spec.get("prob", 0.0))
    if prob <= 0 or (alpha <= 0 and cutmix <= 0):
        return None
    return BatchMix(num_classes, alpha, cutmix, prob)


# ------------------------------------------------------------------ layer-wise LR decay


def backbone_param_groups(
    backbones: Sequence[nn.Module],
    lr_mult: float,
    layer_decay: float | None,
    keep: Callable[[nn.Parameter], bool],
) -> list[tuple[list[nn.Parameter], float]]:
    """The backbone's parameter groups as (parameters, LR scale relative to the head).

    Without `layer_decay` (null or 1) one group at `lr_mult`. With it, one group per
    declared stage of each backbone: the last stage at `lr_mult`, each earlier one
    `layer_decay` times the next. Only parameters for which `keep` holds are listed;
    empty groups are left out."""
    if layer_decay is None or layer_decay == 1.0:
        params = [p for b in backbones for p in b.parameters() if keep(p)]
        return [(params, lr_mult)] if params else []
    groups = []
    for backbone in backbones:
        stages = list(backbone.stages)
        staged = {id(p) for s in stages for p in s.parameters()}
        loose = [p for p in backbone.parameters() if id(p) not in staged and keep(p)]
        for depth, stage in enumerate(reversed(stages)):
            params = [p for p in stage.parameters() if keep(p)]
            if depth == 0:
                params += loose
            if params:
                groups.append((params, lr_mult * layer_decay**depth))
    return groups


# ------------------------------------------------------------------ time budget


class TimeBudget(L.Callback):
    """Fit the run into `trainer.max_time` with a finished LR schedule.

    After each epoch (validation included) the mean epoch time so far gives the number of
    epochs that fit in what is left of the budget (with `margin` to spare); the fit loop's
    `max_epochs` and the schedule's horizon are set to it, so a cosine schedule reaches
    its end at the last step instead of being cut by the timer. The plan only shrinks.
    Lightning's own `Timer` stays as the hard stop.
    """

    clock = staticmethod(time.monotonic)

    def __init__(self, margin: float = 0.9) -> None:
        self.margin = margin
        self.planned_epochs: int | None = None
        self._start = 0.0
        self._first_epoch = 0
        self._budget: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = self.clock()
        self._first_epoch = trainer.current_epoch
        # What the budget leaves this session: a resumed fit's timer has its state back
        # by now, and counts the time the earlier sessions used. None: no budget.
        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        self._budget = timer.time_remaining() if timer is not None else None

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._budget is None:
            return
        done = trainer.current_epoch + 1
        elapsed = self.clock() - self._start
        per_epoch = elapsed / max(1, done - self._first_epoch)
        left = max(0.0, self._budget - elapsed)
        fits = done + math.floor(left * self.margin / per_epoch) if per_epoch > 0 else done
        limit = trainer.fit_loop.max_epochs
        planned = min(fits, limit if limit and limit > 0 else fits, self.planned_epochs or fits)
        if planned == self.planned_epochs:
            return
        self.planned_epochs = planned
        trainer.fit_loop.max_epochs = planned
        replanned = replan_schedules(trainer, planned)
        log.info(
            "Time budget: %.1f s per epoch, %.0f s left: %d epochs in all%s",
            per_epoch,
            left,
            planned,
            "" if replanned else " (the LR schedule has no horizon to re-plan)",
        )


def replan_schedules(trainer: L.Trainer, epochs: int) -> bool:
    """Set the horizon of every re-plannable schedule (`optim.WarmupCosine`) to `epochs`."""
    found = False
    for config in trainer.lr_scheduler_configs:
        for fn in getattr(config.scheduler, "lr_lambdas", []):
            if hasattr(fn, "replan"):
                fn.replan(epochs)
                found = True
    return found


# ------------------------------------------------------------------ LR finder


def find_lr(
    trainer: L.Trainer,
    task: Any,
    datamodule: L.LightningDataModule,
    run_dir: Path,
    steps: int = 100,
) -> float | None:
    """Lightning's LR range test before the fit; writes `lr_find.png` and `lr_find.json`
    into `run_dir` and makes the suggestion the optimizer's LR (the head's; backbone
    groups keep their multipliers). Returns the suggestion (None when it found none)."""
    from lightning.pytorch.tuner import Tuner

    from vision_tl.core.plots import save_figure

    max_epochs, val_every = trainer.fit_loop.max_epochs, trainer.check_val_every_n_epoch
    # The range test runs `steps` steps however short an epoch is (each has at least one),
    # with no validation and the trainable parts held as they are.
    trainer.fit_loop.max_epochs = max(max_epochs or 1, steps)
    trainer.check_val_every_n_epoch = trainer.fit_loop.max_epochs + 1
    try:
        with task.holding_trainable():
            finder = Tuner(trainer).lr_find(
                task, datamodule=datamodule, num_training=steps, update_attr=False
            )
    finally:
        trainer.fit_loop.max_epochs, trainer.check_val_every_n_epoch = max_epochs, val_every
    if finder is None:
        return None
    suggestion = finder.suggestion()
    if trainer.is_global_zero:
        save_figure(finder.plot(suggest=suggestion is not None), run_dir / "lr_find.png", dpi=100)
        write_json(
            run_dir / "lr_find.json",
            {"suggestion": suggestion, **{k: _floats(v) for k, v in finder.results.items()}},
        )
    if suggestion is None:
        log.warning("LR finder: no suggestion (too few points); optimizer.lr is kept")
        return None
    task.use_lr(suggestion)
    log.info("LR finder suggests %.3g; training with it (plot in lr_find.png)", suggestion)
    return float(suggestion)


def _floats(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values]


def lr_find_skip_reason(task: Any, resuming: bool, fast_dev_run: bool) -> str | None:
    """Why `lr_find=true` does not run for this fit, or None when it does."""
    if task.finetune.converges() is not None:
        return "finetune=linear_probe with search chooses its LR by cross-validation"
    if len(task.finetune.plan()) > 1:
        return (
            f"finetune={task.finetune.name} fine-tunes from its probe stage at finetune.lr_scale "
            "x optimizer.lr; set those"
        )
    if resuming:
        return "a resumed run keeps the LR it started with"
    if fast_dev_run:
        return "trainer.fast_dev_run runs one batch"
    return None

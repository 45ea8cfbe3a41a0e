"""The keys `train` reads beyond `data.*`: fine-tune policies, recipes, optimiser, scheduler,
trainer, loss and distillation, checked before any work (see `core.validate`).

The fine-tune policies check their own fields against the `finetune.*` rules here too
(`training.finetune`), so a policy built in code obeys the same table.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, ListConfig

from vision_tl.core.validate import (
    FLAG,
    FRACTION,
    MISSING,
    PROBABILITY,
    Allowed,
    Rules,
    integer,
    is_int,
    is_number,
    number,
    one_of,
    or_null,
    path,
    register_rules,
    select,
)

# Lightning's `Trainer(precision=...)` values (`16` runs need a GPU: `check_precision`).
TRAINER_PRECISIONS = (
    "32",
    "32-true",
    "16-mixed",
    "bf16-mixed",
    "16-true",
    "bf16-true",
    "64",
    "64-true",
)


def _class_weights(value: Any) -> bool:
    if value is None or value == "auto":
        return True
    return isinstance(value, list | ListConfig) and all(is_number(v) and v >= 0 for v in value)


def _max_time(value: Any) -> bool:
    """What Lightning's `Trainer(max_time=...)` parses: null, `DD:HH:MM:SS`, or a dict."""
    if value is None:
        return True
    if isinstance(value, dict | DictConfig):
        keys = {"days", "hours", "minutes", "seconds"}
        values = list(value.values())
        return bool(values) and set(value) <= keys and all(is_number(v) and v >= 0 for v in values)
    parts = str(value).strip().split(":")
    return len(parts) == 4 and all(p.isdigit() for p in parts) and any(int(p) for p in parts)


def _values(value: Any) -> bool:
    return (
        isinstance(value, list | tuple | ListConfig)
        and bool(value)
        and all(is_number(v) and v >= 0 for v in value)
    )


def _open_ended(cfg: DictConfig) -> list[str]:
    """`trainer.max_epochs=-1` leaves the fit's end to a time budget or a step limit;
    without one it would never end, and a time budget cannot re-plan OneCycle."""
    if select(cfg, "trainer.max_epochs") != -1:
        return []
    steps = select(cfg, "trainer.max_steps")
    if is_int(steps) and steps > 0:
        return []
    if select(cfg, "trainer.max_time") in (MISSING, None):
        return [
            "trainer.max_epochs=-1: nothing would end the fit; set trainer.max_time "
            "(a time budget, e.g. 00:00:30:00) or trainer.max_epochs"
        ]
    target = select(cfg, "scheduler._target_")
    if isinstance(target, str) and target.endswith(".one_cycle"):
        return [
            "trainer.max_epochs=-1: scheduler=onecycle needs the run's length; set "
            "trainer.max_epochs, or use scheduler=cosine (re-planned to trainer.max_time)"
        ]
    return []


def _one_target(cfg: DictConfig) -> list[str]:
    """A threshold meets one target: precision or recall, not both."""
    targets = [select(cfg, f"operating_point.target_{k}") for k in ("precision", "recall")]
    if all(t not in (MISSING, None) for t in targets):
        return [
            "operating_point: set target_precision or target_recall, not both "
            "(the threshold meets one and maximises the other)"
        ]
    return []


def _semi_pool(cfg: DictConfig) -> list[str]:
    """Pseudo-labelling and the pool's open-set scores need images without labels."""
    if select(cfg, "semi.method") not in (MISSING, None) and select(cfg, "data.unlabeled") in (
        MISSING,
        None,
    ):
        return ["semi=pseudo_label needs data.unlabeled=DIR (a folder or CSV of unlabelled images)"]
    score = select(cfg, "open_set.score")
    if score in ("pool", "pool_msp") and select(cfg, "data.unlabeled") in (MISSING, None):
        return [f"open_set.score={score} needs data.unlabeled=POOL (a folder or CSV of images)"]
    return []


FINETUNE_RULES = Rules(
    {
        "finetune.backbone_lr_mult": number(ge=0),
        "finetune.layer_decay": or_null(number(gt=0, le=1), "off"),
        "finetune.unfreeze_epoch": integer(0),
        "finetune.trainable_stages": integer(0),
        # the converged probe (finetune=linear_probe), select
        "finetune.search": FLAG,
        "finetune.epochs": integer(1),
        "finetune.batch_size": integer(1),
        "finetune.folds": integer(2),
        "finetune.short_epochs": integer(0),
        "finetune.short_lr": number(gt=0),
        "finetune.short_batch_size": integer(1),
        "finetune.views_subset": integer(0),
        "finetune.lrs": Allowed(_values, "a non-empty list of numbers >= 0"),
        "finetune.l2s": Allowed(_values, "a non-empty list of numbers >= 0"),
        # LP-FT (finetune=lp_ft)
        "finetune.lr_scale": number(gt=0),
        "finetune.batchnorm": one_of("frozen", "train"),
    }
)
register_rules(FINETUNE_RULES)

RULES = register_rules(
    Rules(
        {
            "seed": or_null(integer(0), "not seeded"),
            "ckpt_path": or_null(path("file"), "none"),
            # fine-tuning recipes
            "ema.decay": or_null(number(gt=0, lt=1), "no EMA"),
            "ema.warmup": FLAG,
            "ema.every_n_steps": integer(1),
            "mixup.alpha": number(ge=0),
            "mixup.cutmix_alpha": number(ge=0),
            "mixup.prob": PROBABILITY,
            "lr_find": FLAG,
            "lr_find_steps": integer(20),
            "loss.label_smoothing": number(ge=0, lt=1),
            "loss.class_weights": Allowed(
                _class_weights, "null, auto, or one number >= 0 per class"
            ),
            # optimizer/, scheduler/
            "optimizer.lr": number(gt=0),
            "optimizer.weight_decay": number(ge=0),
            "optimizer.momentum": number(ge=0, lt=1),
            "scheduler.warmup_epochs": number(ge=0),
            "scheduler.step_size": integer(1),
            "scheduler.gamma": number(gt=0, le=1),
            "scheduler.factor": number(gt=0, lt=1),
            "scheduler.patience": integer(0),
            "scheduler.pct_start": FRACTION,
            # trainer/, callbacks/
            "trainer.precision": one_of(*TRAINER_PRECISIONS),
            "trainer.max_epochs": Allowed(
                lambda v: is_int(v) and (v >= 1 or v == -1),
                "a positive integer, or -1 (trainer.max_time ends the fit)",
            ),
            "trainer.max_time": Allowed(
                _max_time, "DD:HH:MM:SS or a dict of days/hours/minutes/seconds"
            ),
            "trainer.accelerator": one_of("auto", "cpu", "gpu", "cuda", "mps", "tpu"),
            "trainer.log_every_n_steps": integer(1),
            "callbacks.early_stopping.patience": integer(0),
            "callbacks.early_stopping.mode": one_of("min", "max"),
            # binary operating point (`training.binary`)
            "operating_point.target_precision": or_null(number(gt=0, le=1), "none"),
            "operating_point.target_recall": or_null(number(gt=0, le=1), "none"),
            # open set (`training.openset`)
            "open_set.score": or_null(
                one_of("auto", "pool_msp", "pool", "knn_msp", "knn", "energy", "msp"), "none fitted"
            ),
            "open_set.tpr": Allowed(lambda v: is_number(v) and 0 < v < 1, "a number > 0 and < 1"),
            "open_set.k": integer(1),
            "open_set.bank_size": integer(1),
            "open_set.pool_size": integer(4),
            "open_set.unknown": or_null(path("path"), "none"),
            # pseudo-labelling (`sweeps.pseudo_label`)
            "semi.teacher": or_null(path("file"), "round 0's best checkpoint"),
            "semi.rounds": integer(1),
            "semi.quantile": or_null(PROBABILITY, "off"),
            "semi.min_confidence": Allowed(
                lambda v: is_number(v) and 0 < v < 1, "a number > 0 and < 1"
            ),
            "semi.max_ratio": or_null(number(gt=0), "no cap"),
            "semi.exclude_unknown": FLAG,
            # distillation
            "distill.teacher": or_null(path("file"), "no distillation"),
            "distill.temperature": number(gt=0),
            "distill.alpha": PROBABILITY,
        },
        checks=(_open_ended, _one_target, _semi_pool),
    )
)

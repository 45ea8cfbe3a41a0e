"""The values every entry point accepts, checked before any work: one rule per config key.

A rule applies wherever its key exists (`data.batch_size` in train and eval, `top_k` in
predict), so each entry config is checked by the same table. A violation is one line,
`KEY=VALUE: what is allowed`, raised as a `ConfigError`. Names that live in a registry
(backbones, heads, augmentations, policies) are checked where the registry is read.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from vision_tl.core.errors import ConfigError
from vision_tl.core.runtime import PRECISIONS

_MISSING = object()


@dataclass(frozen=True)
class Allowed:
    """A predicate on a config value and the words that tell the user what passes it."""

    test: Callable[[Any], bool]
    text: str

    def __call__(self, value: Any) -> bool:
        try:
            return bool(self.test(value))
        except (TypeError, ValueError):
            return False


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (
        isinstance(value, (int, float))
        and not isinstance(value, bool)
        and math.isfinite(float(value))
    )


def integer(minimum: int = 0) -> Allowed:
    words = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
    return Allowed(lambda v: _is_int(v) and v >= minimum, words)


def number(
    gt: float | None = None,
    ge: float | None = None,
    lt: float | None = None,
    le: float | None = None,
) -> Allowed:
    """A finite number within the given bounds."""
    bounds = [
        (gt, lambda v, b: v > b, f"> {gt}"),
        (ge, lambda v, b: v >= b, f">= {ge}"),
        (lt, lambda v, b: v < b, f"< {lt}"),
        (le, lambda v, b: v <= b, f"<= {le}"),
    ]
    active = [(b, check, words) for b, check, words in bounds if b is not None]
    words = "a number" + (" " + " and ".join(w for _, _, w in active) if active else "")
    return Allowed(
        lambda v: _is_number(v) and all(check(float(v), b) for b, check, _ in active), words
    )


def one_of(*values: Any) -> Allowed:
    shown = ", ".join(str(v) for v in values)
    return Allowed(lambda v: str(v) in {str(x) for x in values}, f"one of {shown}")


def or_null(allowed: Allowed, meaning: str) -> Allowed:
    return Allowed(lambda v: v is None or allowed(v), f"{allowed.text}, or null ({meaning})")


def sequence(length: int, item: Allowed, what: str) -> Allowed:
    def test(value: Any) -> bool:
        return (
            isinstance(value, (list, tuple, ListConfig))
            and len(value) == length
            and all(item(v) for v in value)
        )

    return Allowed(test, f"a list of {length} {what}")


FLAG = Allowed(lambda v: isinstance(v, bool), "true or false")
PROBABILITY = number(ge=0, le=1)
FRACTION = number(gt=0, lt=1)
WORKERS = or_null(integer(0), "one per CPU core, up to a cap")


def _is_byte(value: Any) -> bool:
    return _is_int(value) and 0 <= value <= 255


def _interpolation(value: Any) -> bool:
    from torchvision.transforms import InterpolationMode

    return str(value).lower() in {m.value for m in InterpolationMode}


def _class_weights(value: Any) -> bool:
    if value is None or value == "auto":
        return True
    return isinstance(value, (list, ListConfig)) and all(_is_number(v) and v >= 0 for v in value)


def _crop_scale(value: Any) -> bool:
    low, high = (float(v) for v in value)
    return 0 < low <= high <= 1


def _max_time(value: Any) -> bool:
    """What Lightning's `Trainer(max_time=...)` parses: null, `DD:HH:MM:SS`, or a dict."""
    if value is None:
        return True
    if isinstance(value, (dict, DictConfig)):
        keys = {"days", "hours", "minutes", "seconds"}
        values = list(value.values())
        return bool(values) and set(value) <= keys and all(_is_number(v) and v >= 0 for v in values)
    parts = str(value).strip().split(":")
    return len(parts) == 4 and all(p.isdigit() for p in parts) and any(int(p) for p in parts)


def _path(kind: str) -> Allowed:
    """An existing folder, file or either (relative to where the command runs)."""
    checks = {"folder": Path.is_dir, "file": Path.is_file, "path": Path.exists}
    return Allowed(lambda v: checks[kind](Path(str(v)).expanduser()), f"an existing {kind}")


RULES: dict[str, Allowed] = {
    "seed": or_null(integer(0), "not seeded"),
    "ckpt_path": or_null(_path("file"), "none"),
    "input": or_null(_path("path"), "none"),
    "data.root": or_null(_path("folder"), "the built-in smoke-test set"),
    "data.manifest": or_null(_path("file"), "class folders"),
    # data/
    "data.batch_size": integer(1),
    "data.num_workers": WORKERS,
    "data.val_fraction": FRACTION,
    "data.image_size": or_null(integer(8), "the backbone's input size"),
    "data.resize_size": or_null(integer(8), "the backbone's crop ratio"),
    "data.interpolation": or_null(
        Allowed(_interpolation, "nearest, bilinear, bicubic, box, hamming or lanczos"),
        "the backbone's interpolation",
    ),
    "data.mean": or_null(sequence(3, number(), "numbers"), "the backbone's mean"),
    "data.std": or_null(sequence(3, number(gt=0), "numbers > 0"), "the backbone's std"),
    "data.background": sequence(3, Allowed(_is_byte, "0-255"), "integers 0-255"),
    "data.crop_scale": Allowed(_crop_scale, "two numbers 0 < low <= high <= 1"),
    "data.feature_views": integer(0),
    "data.max_failed_fraction": PROBABILITY,
    "data.max_image_pixels": or_null(integer(1), "Pillow's limit"),
    "data.draft": FLAG,
    "data.resize_cache": FLAG,
    # model/, finetune/, loss
    "model.pretrained": FLAG,
    "finetune.backbone_lr_mult": number(ge=0),
    "finetune.unfreeze_epoch": integer(0),
    "finetune.trainable_stages": integer(0),
    "finetune.layer_decay": or_null(number(gt=0, le=1), "off"),
    # fine-tuning recipes
    "ema.decay": or_null(number(gt=0, lt=1), "no EMA"),
    "ema.warmup": FLAG,
    "ema.every_n_steps": integer(1),
    "mixup.alpha": number(ge=0),
    "mixup.cutmix_alpha": number(ge=0),
    "mixup.prob": PROBABILITY,
    "lr_find": FLAG,
    "lr_find_steps": integer(20),
    "trainer.max_time": Allowed(_max_time, "DD:HH:MM:SS or a dict of days/hours/minutes/seconds"),
    "loss.label_smoothing": number(ge=0, lt=1),
    "loss.class_weights": Allowed(_class_weights, "null, auto, or one number >= 0 per class"),
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
    "trainer.max_epochs": Allowed(
        lambda v: _is_int(v) and (v >= 1 or v == -1),
        "a positive integer, or -1 (trainer.max_time ends the fit)",
    ),
    "trainer.accelerator": one_of("auto", "cpu", "gpu", "cuda", "mps", "tpu"),
    "trainer.log_every_n_steps": integer(1),
    "callbacks.early_stopping.patience": integer(0),
    "callbacks.early_stopping.mode": one_of("min", "max"),
    # eval, predict, explain, export
    "batch_size": integer(1),
    "num_workers": WORKERS,
    "top_k": integer(1),
    "reject_threshold": or_null(PROBABILITY, "never reject"),
    "calibrate": FLAG,
    "tta.hflip": FLAG,
    "tta.crops": one_of(1, 5),
    "num_highest_loss": integer(0),
    "submission": FLAG,
    "progress": FLAG,
    "opset": or_null(integer(7), "the exporter's default"),
    "tolerance": number(gt=0),
    "verify": FLAG,
    # the converged probe (finetune=linear_probe), select
    "finetune.search": FLAG,
    "finetune.epochs": integer(1),
    "finetune.batch_size": integer(1),
    "finetune.folds": integer(2),
    # LP-FT (finetune=lp_ft)
    "finetune.lr_scale": number(gt=0),
    "finetune.batchnorm": one_of("frozen", "train"),
    # distillation
    "distill.teacher": or_null(_path("file"), "no distillation"),
    "distill.temperature": number(gt=0),
    "distill.alpha": PROBABILITY,
    "data.feature_precision": one_of(*PRECISIONS),
    "data.feature_batch_size": or_null(integer(1), "8 on a CPU, else max(32, data.batch_size)"),
    "precision": one_of(*PRECISIONS),
    "time_budget": or_null(number(gt=0), "no limit"),
    "weights_dir": or_null(_path("folder"), "none"),
    # audit
    "audit.hash_distance": integer(0),
    "audit.sure_distance": integer(0),
    "audit.min_similarity": number(ge=-1, le=1),
    "audit.folds": integer(2),
    "audit.neighbours": integer(1),
    "audit.outlier_z": number(gt=0),
    "audit.unclaimed": PROBABILITY,
    "audit.thumbnails": integer(0),
}


def _shown(value: Any) -> str:
    if isinstance(value, (DictConfig, ListConfig)):
        value = OmegaConf.to_container(value, resolve=True)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_shown(v) for v in value) + "]"
    return str(value)


def _select(cfg: DictConfig, key: str) -> Any:
    value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
    if isinstance(value, ListConfig):
        return list(value)
    return value


def violations(cfg: DictConfig, rules: dict[str, Allowed] | None = None) -> list[str]:
    """Every `KEY=VALUE: allowed` line for `cfg` (empty when it is valid)."""
    found = []
    for key, allowed in (RULES if rules is None else rules).items():
        value = _select(cfg, key)
        if value is _MISSING or allowed(value):
            continue
        found.append(f"{key}={_shown(value)}: {allowed.text}")
    image_size, resize_size = _select(cfg, "data.image_size"), _select(cfg, "data.resize_size")
    if _is_int(image_size) and _is_int(resize_size) and resize_size < image_size:
        found.append(
            f"data.resize_size={resize_size}: at least data.image_size ({image_size}), "
            "since the centre crop is taken from the resized image"
        )
    found.extend(_open_ended(cfg))
    return found


def _open_ended(cfg: DictConfig) -> list[str]:
    """`trainer.max_epochs=-1` leaves the fit's end to a time budget or a step limit;
    without one it would never end, and a time budget cannot re-plan OneCycle."""
    if _select(cfg, "trainer.max_epochs") != -1:
        return []
    steps = _select(cfg, "trainer.max_steps")
    if _is_int(steps) and steps > 0:
        return []
    if _select(cfg, "trainer.max_time") in (_MISSING, None):
        return [
            "trainer.max_epochs=-1: nothing would end the fit; set trainer.max_time "
            "(a time budget, e.g. 00:00:30:00) or trainer.max_epochs"
        ]
    target = _select(cfg, "scheduler._target_")
    if isinstance(target, str) and target.endswith(".one_cycle"):
        return [
            "trainer.max_epochs=-1: scheduler=onecycle needs the run's length; set "
            "trainer.max_epochs, or use scheduler=cosine (re-planned to trainer.max_time)"
        ]
    return []


def validate(cfg: DictConfig) -> None:
    """Raise a one-line `ConfigError` for the first invalid value (all are logged)."""
    found = violations(cfg)
    if found:
        more = f" (and {len(found) - 1} more)" if len(found) > 1 else ""
        raise ConfigError(found[0] + more)


def closest(name: str, candidates: Iterable[str]) -> str | None:
    """The candidate a typo most likely meant, or None when nothing is close."""
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def did_you_mean(name: str, candidates: Sequence[str]) -> str:
    """`; did you mean X?` for a close candidate, else an empty string."""
    match = closest(name, candidates)
    return f"; did you mean {match}?" if match else ""

"""Train and eval transforms built from a backbone's `Preprocess` plus an augmentation preset."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import InterpolationMode, v2

from vision_tl.errors import ConfigError
from vision_tl.models.preprocess import Preprocess

AUGMENTATIONS = ("none", "flip_crop", "trivialaugment", "randaugment")


def _interpolation(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name.lower())
    except ValueError:
        known = ", ".join(m.value for m in InterpolationMode)
        raise ConfigError(f"unknown interpolation '{name}'; available: {known}") from None


def check_augment(augment: str) -> str:
    """Fail early, with the choices, on an unknown augmentation preset."""
    if augment not in AUGMENTATIONS:
        raise ConfigError(f"unknown augment '{augment}'; available: {', '.join(AUGMENTATIONS)}")
    return augment


def eval_transform(pre: Preprocess) -> v2.Compose:
    """Resize the shorter side to `resize_size`, centre-crop `input_size`, normalise."""
    interp = _interpolation(pre.interpolation)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(pre.resize_size, interpolation=interp, antialias=True),
            v2.CenterCrop(pre.input_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(pre.mean, pre.std),
        ]
    )


def train_transform(
    pre: Preprocess, augment: str = "flip_crop", crop_scale: Sequence[float] = (0.08, 1.0)
) -> v2.Compose:
    """`none` is the eval transform; the others start with RandomResizedCrop + flip."""
    if check_augment(augment) == "none":
        return eval_transform(pre)
    interp = _interpolation(pre.interpolation)
    ops: list = [
        v2.ToImage(),
        v2.RandomResizedCrop(
            pre.input_size, scale=tuple(crop_scale), interpolation=interp, antialias=True
        ),
        v2.RandomHorizontalFlip(),
    ]
    # Geometric ops of the auto-augment policies support only nearest/bilinear on tensors.
    if augment == "trivialaugment":
        ops.append(v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR))
    elif augment == "randaugment":
        ops.append(v2.RandAugment(interpolation=InterpolationMode.BILINEAR))
    ops += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]
    return v2.Compose(ops)

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


def _to_float(pre: Preprocess, normalize: bool) -> list:
    return (
        [v2.ToDtype(torch.float32, scale=True), v2.Normalize(pre.mean, pre.std)]
        if normalize
        else []
    )


def normalize_batch(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """A uint8 batch (N, 3, H, W) to normalised float32, as the transforms' last two steps
    do per image, vectorised over the batch on its device (the GPU after transfer)."""
    mean = torch.tensor(pre.mean, device=x.device).view(1, -1, 1, 1) * 255.0
    scale = 1.0 / (torch.tensor(pre.std, device=x.device).view(1, -1, 1, 1) * 255.0)
    return x.float().sub_(mean).mul_(scale)


def eval_transform(pre: Preprocess, normalize: bool = True) -> v2.Compose:
    """Resize the shorter side to `resize_size`, centre-crop `input_size`, normalise.

    `normalize=False` stops at the uint8 crop, for `normalize_batch` after transfer.
    """
    interp = _interpolation(pre.interpolation)
    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(pre.resize_size, interpolation=interp, antialias=True),
            v2.CenterCrop(pre.input_size),
            *_to_float(pre, normalize),
        ]
    )


def train_transform(
    pre: Preprocess,
    augment: str = "flip_crop",
    crop_scale: Sequence[float] = (0.08, 1.0),
    normalize: bool = True,
) -> v2.Compose:
    """`none` is the eval transform; the others start with RandomResizedCrop + flip."""
    if check_augment(augment) == "none":
        return eval_transform(pre, normalize)
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
    return v2.Compose(ops + _to_float(pre, normalize))

"""Transforms built from a `Preprocess`, and the augmentation presets (a registry).

Every transform maps a uint8 image tensor (3, H, W) to a uint8 crop (3, S, S); batches are
normalised once, on their device, by `normalize_batch`. Adding a preset is one decorated
function below: `data.augment=<name>` selects it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torchvision.transforms import InterpolationMode, v2

from vision_tl.core.errors import ConfigError
from vision_tl.core.registry import Registry
from vision_tl.data.preprocess import AnyPreprocess, EnsemblePreprocess, Preprocess

CropScale = tuple[float, float]
# A batch for one network input, or one per member of an ensemble with `EnsemblePreprocess`.
Inputs = torch.Tensor | Sequence[torch.Tensor]


@dataclass(frozen=True)
class AugmentPreset:
    """Training-time ops on a uint8 image; `random` presets give a new image every epoch."""

    name: str
    ops: Callable[[Preprocess, CropScale], list[v2.Transform]]
    random: bool = True


AUGMENTATIONS: Registry[AugmentPreset] = Registry("augment")


AugmentFn = Callable[[Preprocess, CropScale], list[v2.Transform]]


def register_augment(name: str, random: bool = True) -> Callable[[AugmentFn], AugmentFn]:
    """Register `fn(preprocess, crop_scale) -> [ops]` as the preset `name`."""

    def decorator(fn: AugmentFn) -> AugmentFn:
        AUGMENTATIONS.add(name, AugmentPreset(name, fn, random))
        return fn

    return decorator


def get_augment(name: str) -> AugmentPreset:
    """The preset called `name`; an unknown name is a one-line error listing the presets."""
    return AUGMENTATIONS.get(name)


def interpolation_mode(name: str) -> InterpolationMode:
    try:
        return InterpolationMode(name.lower())
    except ValueError:
        known = ", ".join(m.value for m in InterpolationMode)
        raise ConfigError(f"unknown interpolation '{name}'; available: {known}") from None


def resize_op(pre: Preprocess) -> v2.Resize:
    """Shorter side to `resize_size`, antialiased: the first step of a `crop` view (and the
    resolution of the resize cache's copies, which still hold the whole image)."""
    return v2.Resize(pre.resize_size, interpolation=interpolation_mode(pre.interpolation))


class PadToSquare:
    """Pad a (3, H, W) image to `side` x `side` with `fill`, the image centred."""

    def __init__(self, side: int, fill: Sequence[int]) -> None:
        self.side, self.fill = side, [int(v) for v in fill]

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        height, width = image.shape[-2:]
        left, top = (self.side - width) // 2, (self.side - height) // 2
        padding = [left, top, self.side - width - left, self.side - height - top]
        return v2.functional.pad(image, padding, fill=self.fill)


def fit_ops(pre: Preprocess) -> list:
    """The whole image to the square input by `pre.resize_mode`: `crop` (shorter side to
    `resize_size`, centre crop), `squash` (stretched) or `pad` (longer side to the input,
    padded with the background colour). The eval view, and what random presets start
    from when the mode keeps the whole image."""
    interp = interpolation_mode(pre.interpolation)
    size = pre.input_size
    if pre.resize_mode == "squash":
        return [v2.Resize((size, size), interpolation=interp)]
    if pre.resize_mode == "pad":
        return [
            v2.Resize(None, max_size=size, interpolation=interp),
            PadToSquare(size, pre.background),
        ]
    return [resize_op(pre), v2.CenterCrop(size)]


def random_crop(pre: Preprocess, crop_scale: CropScale) -> list:
    """A RandomResizedCrop to the input size: of the image itself in `crop` mode, of the
    whole fitted image (squashed or padded) otherwise."""
    interp = interpolation_mode(pre.interpolation)
    crop = v2.RandomResizedCrop(pre.input_size, scale=tuple(crop_scale), interpolation=interp)
    return [crop] if pre.resize_mode == "crop" else [*fit_ops(pre), crop]


@register_augment("none", random=False)
def none(pre: Preprocess, crop_scale: CropScale) -> list:
    """No augmentation: the eval transform (`fit_ops`)."""
    return fit_ops(pre)


@register_augment("flip_crop")
def flip_crop(pre: Preprocess, crop_scale: CropScale) -> list:
    """RandomResizedCrop to the input size and a horizontal flip: the standard recipe."""
    return [*random_crop(pre, crop_scale), v2.RandomHorizontalFlip()]


@register_augment("documents")
def documents(pre: Preprocess, crop_scale: CropScale) -> list:
    """For text and layouts, where a mirror image is another document: the whole fitted
    image, a small rotation, shift and shrink (at most as far as the shrink leaves room,
    so a card that fills the width keeps its edges), a slight perspective (a
    photographed page), brightness and contrast; no flip, no crop (`crop_scale` is not
    used)."""
    fill = [int(v) for v in pre.background]
    return [
        *fit_ops(pre),
        v2.RandomAffine(degrees=3, translate=(0.02, 0.02), scale=(0.88, 0.96), fill=fill),
        v2.RandomPerspective(distortion_scale=0.08, p=0.5, fill=fill),
        v2.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.1),
    ]


# Geometric ops of the auto-augment policies support only nearest/bilinear on tensors.
@register_augment("trivialaugment")
def trivialaugment(pre: Preprocess, crop_scale: CropScale) -> list:
    """flip_crop, then TrivialAugmentWide (one random op of random strength per image)."""
    return [
        *flip_crop(pre, crop_scale),
        v2.TrivialAugmentWide(interpolation=InterpolationMode.BILINEAR),
    ]


@register_augment("randaugment")
def randaugment(pre: Preprocess, crop_scale: CropScale) -> list:
    """flip_crop, then RandAugment (two random ops of fixed strength per image)."""
    return [*flip_crop(pre, crop_scale), v2.RandAugment(interpolation=InterpolationMode.BILINEAR)]


class PerMember:
    """uint8 image -> a tuple of uint8 crops, one per ensemble member, each by that member's
    own transform (its size, resize and interpolation).

    With `shared_draws`, every member's transform runs from the same random seed, drawn
    once per image: a random crop covers the same region of the image for every member
    (each resamples it to its own size), and a flip or augmentation op is the same for all.
    So the fused head learns from one view of the image seen by every member, as at eval.
    """

    def __init__(self, transforms: Sequence[Callable], shared_draws: bool) -> None:
        self.transforms = list(transforms)
        self.shared_draws = shared_draws

    def __call__(self, image: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not self.shared_draws:
            return tuple(t(image) for t in self.transforms)
        seed = int(torch.randint(0, 2**62, ()))
        crops = []
        for transform in self.transforms:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                crops.append(transform(image))
        return tuple(crops)


def eval_transform(pre: AnyPreprocess) -> Callable:
    """The whole image to the square input by the resize mode (`fit_ops`; uint8 stays
    uint8); per member for an `EnsemblePreprocess`."""
    if isinstance(pre, EnsemblePreprocess):
        return PerMember([eval_transform(m) for m in pre.members], shared_draws=False)
    return v2.Compose(none(pre, (1.0, 1.0)))


def train_transform(
    pre: AnyPreprocess, augment: str = "flip_crop", crop_scale: Sequence[float] = (0.08, 1.0)
) -> Callable:
    """The preset's ops for a training image (the eval transform for `none`); per member,
    with shared random draws, for an `EnsemblePreprocess`."""
    if isinstance(pre, EnsemblePreprocess):
        members = [train_transform(m, augment, crop_scale) for m in pre.members]
        return PerMember(members, shared_draws=True)
    low, high = (float(v) for v in crop_scale)
    return v2.Compose(get_augment(augment).ops(pre, (low, high)))


def map_inputs(fn: Callable[[torch.Tensor], torch.Tensor], x: Inputs) -> Inputs:
    """`fn` applied to a batch, or to each member's batch of a per-member tuple."""
    return tuple(fn(t) for t in x) if isinstance(x, list | tuple) else fn(x)


def as_batches(x: Inputs) -> tuple[torch.Tensor, ...]:
    """A batch, or a per-member tuple of batches, as a tuple (one entry per model input)."""
    return tuple(x) if isinstance(x, list | tuple) else (x,)


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """channels_last runs convolutions ~1.6x faster on CPU (oneDNN) and on tensor cores."""
    return x.contiguous(memory_format=torch.channels_last)


def normalize_batch(x: Inputs, pre: AnyPreprocess) -> Inputs:
    """A uint8 batch (N, 3, H, W) to normalised float32, on the batch's device (each
    member's batch with its own mean and std for an `EnsemblePreprocess`)."""
    if isinstance(pre, EnsemblePreprocess):
        return tuple(normalize_batch(t, m) for t, m in zip(x, pre.members, strict=True))
    mean = torch.tensor(pre.mean, device=x.device).view(1, -1, 1, 1) * 255.0
    scale = 1.0 / (torch.tensor(pre.std, device=x.device).view(1, -1, 1, 1) * 255.0)
    return x.float().sub_(mean).mul_(scale)


def denormalize_batch(x: torch.Tensor, pre: Preprocess) -> torch.Tensor:
    """Inverse of `normalize_batch`, as floats in [0, 1] (for overlays and thumbnails)."""
    mean = torch.tensor(pre.mean, device=x.device).view(1, -1, 1, 1)
    std = torch.tensor(pre.std, device=x.device).view(1, -1, 1, 1)
    return (x * std + mean).clamp(0, 1)

"""How pixels must look for a set of weights, resolved once and carried to every consumer.

The backbone's pretrained config (torchvision weights metadata, timm's pretrained config)
gives the base; the user's `data.*` overrides are applied once, by `resolve`. The result
drives training, the feature cache, the checkpoint, eval, predict, explain and export.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, BinaryIO

import torch

from vision_tl.core.errors import ConfigError
from vision_tl.data.decode import ReadLimits, decode

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Names of the user overrides (the `data.*` config keys) that `resolve` applies.
OVERRIDES = (
    "image_size",
    "resize_size",
    "interpolation",
    "mean",
    "std",
    "background",
    "draft",
    "resize_mode",
)
# How an image becomes the square input (`Preprocess.resize_mode`).
RESIZE_MODES = ("crop", "squash", "pad")


def resize_for(input_size: int, crop_pct: float) -> int:
    """Shorter side before the centre crop, as timm computes it: floor(size / crop_pct).

    The tiny epsilon keeps exact ratios exact (224 / (224 / 256) is 256, not 255).
    """
    return math.floor(input_size / crop_pct + 1e-6)


@dataclass(frozen=True)
class Preprocess:
    """What an image goes through before the network, as its weights were trained.

    Decode (RGB, EXIF orientation, alpha composited on `background`; with `draft`, large
    JPEGs decode at a reduced scale that still covers the resize), fit the square input
    by `resize_mode` (`interpolation`, antialiased): `crop` resizes the shorter side to
    `resize_size` and centre-crops `input_size` (random crops when training), `squash`
    stretches the whole image to `input_size`, `pad` resizes the longer side to
    `input_size` and pads the rest with `background`; scale to [0, 1], subtract `mean`,
    divide by `std`.
    """

    input_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    background: tuple[int, int, int] = (255, 255, 255)
    draft: bool = True
    resize_mode: str = "crop"

    def __post_init__(self) -> None:
        if self.resize_mode not in RESIZE_MODES:
            raise ConfigError(
                f"data.resize_mode={self.resize_mode}: one of {', '.join(RESIZE_MODES)}"
            )

    @property
    def crop_pct(self) -> float:
        return self.input_size / self.resize_size

    @property
    def decode_min_side(self) -> int | None:
        """Large JPEGs may decode at reduced size, never below the resize target (for
        squash and pad, a shorter side of `input_size` covers both sides' targets)."""
        if not self.draft:
            return None
        return self.resize_size if self.resize_mode == "crop" else self.input_size

    def read(self, path: str | Path | BinaryIO, limits: ReadLimits | None = None) -> torch.Tensor:
        """Decode `path` the way these weights need it: the one decode step of every
        consumer (a regular file or an open binary file within `limits`, the defaults
        when None)."""
        return decode(path, self.background, self.decode_min_side, limits)

    def resolve(self, overrides: Mapping[str, Any] | None = None) -> Preprocess:
        """Apply the user's overrides (None values keep the weights' own setting).

        A new `image_size` without `resize_size` keeps the weights' crop ratio.
        """
        given = {k: v for k, v in (overrides or {}).items() if v is not None}
        unknown = set(given) - set(OVERRIDES)
        if unknown:
            raise KeyError(f"unknown preprocessing overrides {sorted(unknown)}")
        changes: dict[str, Any] = {}
        if "image_size" in given:
            changes["input_size"] = int(given["image_size"])
            changes["resize_size"] = resize_for(changes["input_size"], self.crop_pct)
        if "resize_size" in given:
            changes["resize_size"] = int(given["resize_size"])
        if "interpolation" in given:
            changes["interpolation"] = str(given["interpolation"]).lower()
        for key in ("mean", "std"):
            if key in given:
                changes[key] = tuple(float(v) for v in given[key])
        if "background" in given:
            changes["background"] = tuple(int(v) for v in given["background"])
        if "draft" in given:
            changes["draft"] = bool(given["draft"])
        if "resize_mode" in given:
            changes["resize_mode"] = str(given["resize_mode"])
        return replace(self, **changes)

    def differences(self, other: Preprocess) -> list[str]:
        """Human-readable list of fields that differ, e.g. `resize_size 232 != 256`."""
        out = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if a != b:
                out.append(f"{f.name} {a} != {b}")
        return out

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("mean", "std", "background"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Preprocess:
        """Read `to_dict` output; fields missing from older files take their defaults."""
        known = {f.name for f in fields(cls)}
        values: dict[str, Any] = {k: v for k, v in data.items() if k in known}
        for key in ("mean", "std", "background"):
            if key in values:
                values[key] = tuple(values[key])
        for key in ("input_size", "resize_size"):
            values[key] = int(values[key])
        return cls(**values)


def timm_preprocess(data_config: Mapping[str, Any]) -> Preprocess:
    """The `Preprocess` of timm's resolved data config (`timm.data.resolve_data_config`)."""
    size = int(data_config["input_size"][-1])
    return Preprocess(
        input_size=size,
        resize_size=resize_for(size, float(data_config["crop_pct"])),
        interpolation=str(data_config["interpolation"]),
        mean=_triple(data_config["mean"]),
        std=_triple(data_config["std"]),
    )


def _triple(values: Sequence[float]) -> tuple[float, float, float]:
    a, b, c = (float(v) for v in values)
    return a, b, c


@dataclass(frozen=True)
class EnsemblePreprocess:
    """The preprocessing of an ensemble whose members need different pixels: one
    `Preprocess` per member, in member order.

    An image is decoded once (the member with the largest resize decides the draft scale)
    and each member gets its own resize, crop and normalisation of that decoded image, so
    a batch is a tuple of tensors, one per member. Built by `combine`, which keeps a
    single `Preprocess` when every member agrees, so same-preprocessing ensembles still
    see one tensor.
    """

    members: tuple[Preprocess, ...]

    @property
    def decode_as(self) -> Preprocess:
        """The member whose decode (and resized copies) serves every member: the largest."""
        return max(self.members, key=lambda m: (m.decode_min_side or 0, m.resize_size))

    @property
    def background(self) -> tuple[int, int, int]:
        return self.decode_as.background

    def read(self, path: str | Path | BinaryIO, limits: ReadLimits | None = None) -> torch.Tensor:
        return self.decode_as.read(path, limits)

    def resolve(self, overrides: Mapping[str, Any] | None = None) -> AnyPreprocess:
        """The user's `data.*` overrides apply to every member (a given `image_size` gives
        every member that size, each keeping its own crop ratio)."""
        return combine([m.resolve(overrides) for m in self.members])

    def differences(self, other: Preprocess | EnsemblePreprocess) -> list[str]:
        theirs = per_member(other, len(self.members))
        return [
            f"member {i}: {d}"
            for i, (a, b) in enumerate(zip(self.members, theirs, strict=True))
            for d in a.differences(b)
        ]

    def to_dict(self) -> dict[str, Any]:
        return {"members": [m.to_dict() for m in self.members]}


AnyPreprocess = Preprocess | EnsemblePreprocess


def combine(members: Sequence[Preprocess]) -> AnyPreprocess:
    """One `Preprocess` when every member needs the same pixels, else the per-member form."""
    first = members[0]
    if all(m == first for m in members[1:]):
        return first
    if len({(m.background, m.draft) for m in members}) > 1:
        raise ConfigError("ensemble members must share one background and draft setting")
    return EnsemblePreprocess(tuple(members))


def per_member(pre: AnyPreprocess, count: int) -> list[Preprocess]:
    """What each of `count` members sees: its own entry, or the one shared `Preprocess`."""
    if isinstance(pre, EnsemblePreprocess):
        if len(pre.members) != count:
            raise ValueError(f"preprocessing for {len(pre.members)} members, model has {count}")
        return list(pre.members)
    return [pre] * count


def load_preprocess(data: Mapping[str, Any]) -> AnyPreprocess:
    """Read `to_dict` output of either form (older files hold a single `Preprocess`)."""
    if "members" in data:
        return combine([Preprocess.from_dict(m) for m in data["members"]])
    return Preprocess.from_dict(data)

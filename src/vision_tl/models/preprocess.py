"""Input preprocessing that belongs to a set of weights (size, resize, interpolation, mean/std)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Preprocess:
    """What the pixels must look like for a backbone, as its weights were trained.

    `resize_size` is the shorter side before the centre crop to `input_size` at eval time.
    """

    input_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    @property
    def crop_pct(self) -> float:
        return self.input_size / self.resize_size

    def with_overrides(
        self,
        image_size: int | None = None,
        resize_size: int | None = None,
        interpolation: str | None = None,
        mean: tuple[float, ...] | list[float] | None = None,
        std: tuple[float, ...] | list[float] | None = None,
    ) -> Preprocess:
        """Apply user overrides; a new `image_size` keeps the weights' crop ratio."""
        changes: dict[str, Any] = {}
        if image_size is not None:
            changes["input_size"] = int(image_size)
            if resize_size is None:
                changes["resize_size"] = round(int(image_size) / self.crop_pct)
        if resize_size is not None:
            changes["resize_size"] = int(resize_size)
        if interpolation is not None:
            changes["interpolation"] = str(interpolation)
        if mean is not None:
            changes["mean"] = tuple(float(v) for v in mean)
        if std is not None:
            changes["std"] = tuple(float(v) for v in std)
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
        data["mean"], data["std"] = list(self.mean), list(self.std)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocess:
        return cls(
            input_size=int(data["input_size"]),
            resize_size=int(data["resize_size"]),
            interpolation=str(data["interpolation"]),
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
        )

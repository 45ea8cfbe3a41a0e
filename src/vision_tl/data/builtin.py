"""Built-in datasets, generated on first use so the default run needs no download.

Add one with `@builtin_dataset(name, image_size)` on a function that writes an image
folder (`train/`, `val/`, `test/` with class subfolders) into the directory it is given.
"""

from __future__ import annotations

import colorsys
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from vision_tl.core.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuiltinDataset:
    """A generated dataset: its name, native image size and generator."""

    name: str
    image_size: int
    generate: Callable[[Path], None]
    version: int = 1

    def folder(self, cache: str | Path) -> Path:
        """Where `materialize` writes this dataset under `cache`."""
        return Path(cache).expanduser() / "datasets" / f"{self.name}-v{self.version}"

    def materialize(self, cache: str | Path) -> Path:
        """Generate into `folder(cache)` once; later calls reuse it.

        Generation writes to a temporary folder and renames it, so concurrent jobs
        never see a half-written dataset.
        """
        target = self.folder(cache)
        if (target / ".complete").exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{self.name}-", dir=target.parent))
        try:
            log.info("Generating built-in dataset '%s' in %s", self.name, target)
            self.generate(tmp)
            (tmp / ".complete").touch()
            try:
                os.rename(tmp, target)
            except OSError:
                if not (target / ".complete").exists():
                    raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target


DATASETS: Registry[BuiltinDataset] = Registry("built-in dataset")


def builtin_dataset(
    name: str, image_size: int, version: int = 1
) -> Callable[[Callable[[Path], None]], Callable[[Path], None]]:
    """Register a generator function as a built-in dataset."""

    def decorator(fn: Callable[[Path], None]) -> Callable[[Path], None]:
        DATASETS.add(name, BuiltinDataset(name, image_size, fn, version))
        return fn

    return decorator


# --------------------------------------------------------------------------- shapes

SHAPES = ("circle", "square", "triangle", "star")
SHAPES_SPLITS = {"train": 150, "val": 40, "test": 40}


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        corners = [(angle + math.pi / 4 + i * math.pi / 2, r) for i in range(4)]
    elif kind == "triangle":
        corners = [(angle + i * 2 * math.pi / 3, r * 1.15) for i in range(3)]
    else:  # star
        corners = [(angle + i * math.pi / 5, r * (1.15 if i % 2 == 0 else 0.5)) for i in range(10)]
    return [(cx + rad * math.cos(a), cy + rad * math.sin(a)) for a, rad in corners]


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """Gradient, noise or stripes, so the background carries no label information."""
    kind = rng.integers(3)
    c0, c1 = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, size)[None, :, None]
    if kind == 0:
        img = c0 * (1 - t) + c1 * t
        img = np.broadcast_to(img, (size, size, 3))
        if rng.random() < 0.5:
            img = img.transpose(1, 0, 2)
    elif kind == 1:
        img = c0 + rng.normal(0, 20, (size, size, 3))
    else:
        period = rng.integers(6, 20)
        stripes = ((np.arange(size) // period) % 2)[None, :, None]
        img = np.broadcast_to(c0 * stripes + c1 * (1 - stripes), (size, size, 3))
        if rng.random() < 0.5:
            img = img.transpose(1, 0, 2)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def draw_shape(kind: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One image of `kind` at random position, scale, rotation and colour."""
    scale = 2  # draw large, then downsample for smooth edges
    big = size * scale
    image = _background(rng, big)
    draw = ImageDraw.Draw(image)
    r = big * rng.uniform(0.2, 0.33)
    cx, cy = (rng.uniform(r + 2, big - r - 2) for _ in range(2))
    # Each class has its own hue band, and the shape's brightness is far from the
    # background's: learnable from scratch in a few CPU minutes, as a smoke test must be.
    hue = (SHAPES.index(kind) / len(SHAPES) + rng.uniform(-0.04, 0.04)) % 1.0
    bright = np.asarray(image).mean() < 128
    value = rng.uniform(0.8, 1.0) if bright else rng.uniform(0.3, 0.5)
    fill = tuple(round(255 * c) for c in colorsys.hsv_to_rgb(hue, rng.uniform(0.6, 1.0), value))
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill, outline=fill, width=scale * 2)
    else:
        points = _polygon(kind, cx, cy, r, rng.uniform(0, 2 * math.pi))
        draw.polygon(points, fill=fill, outline=fill, width=scale * 2)
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    if rng.random() < 0.2:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 0.8)))
    return image


@builtin_dataset("shapes", image_size=64)
def shapes(root: Path, image_size: int = 64, seed: int = 0) -> None:
    """Four classes of drawn shapes on varied backgrounds: a deterministic smoke-test set.

    Each class is one shape in its own hue band; position, size, rotation, brightness
    and background vary. It proves the pipeline learns; it is not a benchmark.
    """
    for split_index, (split, count) in enumerate(SHAPES_SPLITS.items()):
        for class_index, kind in enumerate(SHAPES):
            folder = root / split / kind
            folder.mkdir(parents=True, exist_ok=True)
            rng = np.random.default_rng([seed, split_index, class_index])
            for i in range(count):
                draw_shape(kind, image_size, rng).save(folder / f"{kind}_{i:04d}.png")

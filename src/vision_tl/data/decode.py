"""Decode an image file to RGB the way a photo viewer shows it, as cheaply as the target allows.

`decode` is the one way images become tensors: training, the feature cache, eval, predict
and explain all call it with the run's `Preprocess`, so they see the same pixels.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg

from vision_tl.core.errors import error_line as error_line  # the readers' one-line reason
from vision_tl.core.io import DEFAULT_MAX_FILE_BYTES, open_regular, read_limited

# Formats Pillow decodes; matched case-insensitively (.JPG, .Jpeg ... are the same).
IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".jpe",
    ".jfif",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
    ".pbm",
    ".pnm",
)
# Photo formats that look like images to a user but that Pillow cannot read: listed as
# unusable (with the reason) rather than silently ignored like a stray text file.
UNSUPPORTED_EXTENSIONS = (".heic", ".heif", ".svg", ".raw", ".cr2", ".nef", ".arw", ".dng", ".psd")
# Operating-system litter: never images, never reported.
SYSTEM_NAMES = frozenset({"thumbs.db", "desktop.ini", "ehthumbs.db", "icon\r"})
SYSTEM_DIRS = frozenset({"__macosx", "@eadir", "$recycle.bin", "system volume information"})

EXIF_ORIENTATION = 0x0112
JPEG_FIRST = ("JPEG",)  # what `pil_open` tries on bytes starting with a JPEG marker
# Pillow's own decompression-bomb threshold (about 89 megapixels).
DEFAULT_MAX_PIXELS = Image.MAX_IMAGE_PIXELS or 89_478_485


class ImageTooLarge(ValueError):
    """An image with more pixels than `data.max_image_pixels`: refused before decoding."""


@dataclass(frozen=True)
class ReadLimits:
    """What any command reads of one image file: at most `max_file_bytes` bytes of a
    regular file (`data.max_file_bytes`), and only images of at most `max_pixels` pixels
    (`data.max_image_pixels`), checked from the header before the pixels are decoded."""

    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    max_pixels: int = DEFAULT_MAX_PIXELS

    @classmethod
    def from_config(cls, data: object) -> ReadLimits:
        """From a `data` config node (null or absent keys: the defaults)."""
        get = getattr(data, "get", lambda key, default=None: default)
        return cls(
            int(get("max_file_bytes") or DEFAULT_MAX_FILE_BYTES),
            int(get("max_image_pixels") or DEFAULT_MAX_PIXELS),
        )

    def check_size(self, size: tuple[int, int]) -> None:
        width, height = size
        if width * height > self.max_pixels:
            raise ImageTooLarge(too_large(width, height, self.max_pixels))


def too_large(width: int, height: int, max_pixels: int) -> str:
    return (
        f"too large to decode safely: {width}x{height} = {width * height} pixels "
        f"> data.max_image_pixels={max_pixels}"
    )


def pil_open(handle: BinaryIO) -> Image.Image:
    """`Image.open`, bytes that begin as a JPEG opened by the JPEG plugin alone. Otherwise
    Pillow tries the formats registered before JPEG in turn; once every plugin is
    registered (the scan lists their extensions), three of them have no signature check
    and parse the header themselves: twice the cost of opening a small JPEG, which a
    shard conversion pays on every file. A handle that cannot seek, or is not at its start,
    is left to Pillow as it is."""
    try:
        at_start = handle.tell() == 0
        jpeg = at_start and handle.read(3) == b"\xff\xd8\xff"
        if at_start:
            handle.seek(0)
    except (AttributeError, OSError):  # io.UnsupportedOperation is an OSError
        jpeg = False
    return Image.open(handle, formats=JPEG_FIRST if jpeg else None)


@contextlib.contextmanager
def open_image(
    path: str | Path | BinaryIO, limits: ReadLimits | None = None
) -> Iterator[Image.Image]:
    """`Image.open` on a regular file within `limits` (the header only: size and format
    are known, no pixel is decoded yet); an open file object is taken as it is."""
    limits = limits or ReadLimits()
    if isinstance(path, (str, Path)):
        with open_regular(path, limits.max_file_bytes) as handle, pil_open(handle) as image:
            limits.check_size(image.size)
            yield image
        return
    with pil_open(path) as image:
        limits.check_size(image.size)
        yield image


def is_hidden(path: Path) -> bool:
    """Dotfiles (`.DS_Store`, macOS `._*` resource forks) and Windows/NAS system files."""
    name = path.name.lower()
    return name.startswith(".") or name in SYSTEM_NAMES or name in SYSTEM_DIRS


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(path)


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any PIL mode to RGB: alpha is composited on `background`, 16-bit is scaled."""
    if image.mode == "RGB":
        return image
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        scale = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / scale * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "RGBa", "LA", "PA"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def draft_size(size: tuple[int, int], min_side: int) -> tuple[int, int]:
    """The request for `Image.draft` that keeps the shorter side at least `min_side`."""
    scale = min(size) / max(1, min_side)
    return max(1, int(size[0] / scale)), max(1, int(size[1] / scale))


def load_rgb(
    path: str | Path | BinaryIO,
    background: tuple[int, int, int] = (255, 255, 255),
    min_side: int | None = None,
    limits: ReadLimits | None = None,
) -> Image.Image:
    """Open `path` (within `limits`), apply its EXIF orientation and return an RGB image.

    With `min_side`, a JPEG much larger than needed is decoded at 1/2, 1/4 or 1/8 scale
    in the DCT domain (Pillow's draft mode), never below `min_side` on its shorter side:
    a 12-megapixel photo bound for a 256-pixel resize decodes several times faster.
    Pillow reads the file as it decodes: it is never read whole into memory first.
    """
    with open_image(path, limits) as image:
        if min_side and image.format == "JPEG" and min(image.size) >= 2 * min_side:
            image.draft(image.mode, draft_size(image.size, min_side))
        image.load()
        # exif_transpose copies every image; only rotated photos need it.
        if image.getexif().get(EXIF_ORIENTATION, 1) not in (1, None):
            image = ImageOps.exif_transpose(image)
        return to_rgb(image, background)


def plain_jpeg(image: Image.Image) -> bool:
    """An upright RGB or grayscale JPEG: its bytes decode straight to the pixels a run uses
    (torchvision's decoder here; a shard keeps them as they are)."""
    return (
        image.format == "JPEG"
        and image.mode in ("RGB", "L")
        and image.getexif().get(EXIF_ORIENTATION, 1) in (1, None)
    )


def decode(
    path: str | Path | BinaryIO,
    background: tuple[int, int, int] = (255, 255, 255),
    min_side: int | None = None,
    limits: ReadLimits | None = None,
) -> torch.Tensor:
    """The image at `path` as a uint8 RGB tensor (3, H, W), upright, alpha composited.

    Only a regular file within `limits` is opened (`core.io.open_regular`; an open binary
    file, such as an upload's bytes, is read as it is), and its pixel count is checked
    from the header before any decoding. A plain JPEG (RGB or grayscale,
    upright, too small for draft mode) is decoded by torchvision straight into a tensor:
    libjpeg-turbo with the same settings as Pillow, so the same pixels, ~30% faster; only
    that path reads the file's bytes at once (at most `limits.max_file_bytes`). Anything
    else goes through `load_rgb`, which Pillow reads as it decodes.
    """
    limits = limits or ReadLimits()
    if isinstance(path, (str, Path)):
        opened = open_regular(path, limits.max_file_bytes)
    else:
        opened = contextlib.nullcontext(path)
    with opened as handle:
        with pil_open(handle) as image:
            limits.check_size(image.size)
            fast = plain_jpeg(image) and not (min_side and min(image.size) >= 2 * min_side)
        if fast:
            handle.seek(0)
            data = bytearray(read_limited(handle, limits.max_file_bytes))
            try:
                return decode_jpeg(torch.frombuffer(data, dtype=torch.uint8), ImageReadMode.RGB)
            except RuntimeError:
                pass  # Pillow tolerates some damage that libjpeg's strict mode rejects
        handle.seek(0)
        rgb = load_rgb(handle, background, min_side, limits)
    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()

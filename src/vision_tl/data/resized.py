"""One-time cache of resized copies, for folders of photos much larger than the model input.

Decoding dominates data loading, and its cost grows with the pixel count: a 12-megapixel
photo bound for a 256-pixel resize is decoded ~50x larger than needed every epoch. Each
such file gets a JPEG copy (quality 95) of what training computes first anyway: the image
read by `Preprocess.read` and resized by `resize_op`, the same decode-and-resize path as
every other consumer. Smaller files are read as they are. Copies are keyed by path, size,
mtime and preprocessing, so an edited photo gets a fresh copy.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from torchvision.io import encode_jpeg
from torchvision.transforms import v2

from vision_tl.core.io import write_bytes
from vision_tl.core.runtime import available_cpus
from vision_tl.data.augment import resize_op
from vision_tl.data.decode import open_image
from vision_tl.data.preprocess import Preprocess

log = logging.getLogger(__name__)


def _copy_path(folder: Path, path: str, side: int, extra: str) -> Path | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    key = hashlib.sha1(os.fsencode(f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{side}|{extra}"))
    digest = key.hexdigest()
    return folder / digest[:2] / f"{digest}.jpg"


def _make_copy(path: str, target: Path, preprocess: Preprocess, resize: v2.Resize) -> bool:
    """Write the copy; False when the file is no larger than the resize (read it as it is)."""
    with open_image(path) as header:
        if min(header.size) <= preprocess.resize_size:
            return False
    image = resize(preprocess.read(path))
    target.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(target, encode_jpeg(image, quality=95).numpy().tobytes())
    return True


def resized_copies(
    paths: Sequence[str],
    preprocess: Preprocess,
    cache_root: str | Path,
) -> dict[str, str]:
    """Map each file larger than `preprocess.resize_size` (shorter side) to its resized copy,
    making missing copies in parallel threads. Files that fail to open keep their path."""
    start = time.perf_counter()
    side = preprocess.resize_size
    resize = resize_op(preprocess)  # built once; an unknown interpolation is a config error
    folder = Path(cache_root).expanduser() / "resized" / str(side)
    extra = f"tv|{preprocess.background}|{preprocess.interpolation}|{preprocess.draft}"
    sources: dict[str, str] = {}
    todo: list[tuple[str, Path]] = []
    for path in paths:
        target = _copy_path(folder, path, side, extra)
        if target is None:
            continue
        if target.is_file():
            sources[path] = str(target)
        else:
            todo.append((path, target))

    def work(item: tuple[str, Path]) -> bool:
        try:
            return _make_copy(item[0], item[1], preprocess, resize)
        except Exception:
            return False  # read the original; a broken file is reported when it is read

    made = 0
    if todo:
        with ThreadPoolExecutor(min(16, 2 * available_cpus())) as pool:
            for (path, target), ok in zip(todo, pool.map(work, todo), strict=True):
                if ok:
                    sources[path] = str(target)
                    made += 1
    log.info(
        "Resize cache: %d of %d images read from copies with a %d px shorter side "
        "(%d made now, %.1f s) in %s",
        len(sources),
        len(paths),
        side,
        made,
        time.perf_counter() - start,
        folder,
    )
    return sources

"""Images without labels: a pool to pseudo-label, cluster or choose from (`data.unlabeled`),
and example unknown images (`open_set.unknown`, `eval unknown=DIR`).

A pool is a folder (recursively; hidden and system files skipped, as in training) or a CSV
with a `path` column (relative paths resolve against the CSV's folder). Every file is
checked once like the labelled ones, verdicts cached under `cache_root/scans/`; unusable
files are logged and left out. Keys are file paths, so any source's reader opens them.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path

import pandas as pd

from vision_tl.core.errors import ConfigError
from vision_tl.data.decode import ReadLimits, is_image_file
from vision_tl.data.folder import walk_files
from vision_tl.data.scan import ImageScanner

log = logging.getLogger(__name__)


def list_images(spec: str | Path | None, key: str) -> list[str]:
    """The image files a folder holds (recursively) or a CSV's `path` column names, as
    absolute paths (links kept as named), sorted and without repeats; a one-line
    `ConfigError` naming `key` when there is nothing to read."""
    if not spec:
        raise ConfigError(f"{key} is required: a folder of images or a CSV with a path column")
    where = Path(str(spec)).expanduser()
    if where.is_dir():
        files = [p for p in walk_files(where, []) if is_image_file(Path(p))]
    elif where.suffix.lower() == ".csv" and where.is_file():
        frame = pd.read_csv(where, dtype=str, keep_default_na=False)
        if "path" not in frame.columns:
            raise ConfigError(f"{key}={where}: no 'path' column (columns: {list(frame.columns)})")
        files = [str(where.parent / p) for p in frame["path"] if p]
    else:
        raise ConfigError(f"{key}={where}: not a folder or a CSV file")
    files = sorted({str(Path(f).absolute()) for f in files})
    if not files:
        raise ConfigError(f"{key}={where}: holds no image files")
    return files


def unlabeled_pool(
    spec: str | Path | None,
    labelled: Iterable[str],
    cache_root: Path | None = None,
    limits: ReadLimits | None = None,
    key: str = "data.unlabeled",
) -> list[str]:
    """The usable pool images that are not among `labelled` (the catalog's keys: pool images
    never enter val or test, nor count twice in train). One-line errors for an empty pool
    and for a pool that is only the labelled images again."""
    files = list_images(spec, key)
    known = {os.path.realpath(k) for k in labelled}  # a link to a labelled image is labelled
    fresh = [f for f in files if os.path.realpath(f) not in known]
    if not fresh:
        raise ConfigError(
            f"{key}={spec}: every image in it is already labelled (in train, val or test); "
            "point it at images without labels"
        )
    if len(fresh) < len(files):
        log.info("%s: %d images already labelled are left out", key, len(files) - len(fresh))
    cache = ImageScanner.cache_file_for(cache_root, spec) if cache_root else None
    report = ImageScanner(cache, limits or ReadLimits()).scan(fresh)
    for bad in report.bad[:5]:
        log.warning("%s: skipped %s: %s", key, bad.path, bad.reason)
    if len(report.bad) > 5:
        log.warning("%s: %d more unusable files skipped", key, len(report.bad) - 5)
    if not report.good:
        raise ConfigError(f"{key}={spec}: none of its {len(fresh)} images can be read")
    log.info("%s: %d unlabelled images (%s)", key, len(report.good), report.summary())
    return report.good

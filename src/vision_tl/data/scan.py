"""Pre-flight check of image files: decode each one once, before training, and remember it.

Real folders hold truncated downloads, zero-byte files, web pages saved as `.jpg`,
panoramas big enough to exhaust memory and CMYK or 16-bit scans. The scan decodes every
file (large JPEGs at 1/8 scale, which still reads every byte) in parallel threads, so
training never meets a file that cannot be read, and records the verdict keyed by
path + size + mtime: a second run over the same folder only stats the files. The verdict
also says whether the file is a plain upright JPEG and how large: a shard conversion keeps
such a file's bytes without reading its header again (`ScanReport.facts`).
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from vision_tl.core.io import RefusedFile, printable, write_csv, write_text
from vision_tl.core.runtime import available_cpus
from vision_tl.data.decode import (
    DEFAULT_MAX_PIXELS,
    EXIF_ORIENTATION,
    UNSUPPORTED_EXTENSIONS,
    ImageTooLarge,
    ReadLimits,
    error_line,
    load_rgb,
    open_image,
    plain_jpeg,
)

log = logging.getLogger(__name__)

SCAN_VERSION = 2
_EXTENSION_FORMATS = {**Image.registered_extensions(), ".jpg": "JPEG", ".jpeg": "JPEG"}
_JPEG_LIKE = ("JPEG", "MPO")
_MODE_NOTES = {
    "CMYK": "CMYK",
    "I;16": "16-bit",
    "I;16B": "16-bit",
    "I;16L": "16-bit",
    "I": "32-bit integer",
    "F": "32-bit float",
    "L": "grayscale",
    "1": "1-bit",
    "LA": "alpha",
    "RGBA": "alpha",
    "PA": "alpha",
    "YCbCr": "YCbCr",
}


@dataclass(frozen=True)
class BadFile:
    """A file that will not be trained on, and why (one line)."""

    path: str
    reason: str


@dataclass
class ScanReport:
    """Usable files (in input order), unusable ones with reasons, and odd-but-fine counts."""

    good: list[str] = field(default_factory=list)
    bad: list[BadFile] = field(default_factory=list)
    notes: Counter[str] = field(default_factory=Counter)
    cached: int = 0
    seconds: float = 0.0
    # One row per good file, in `good`'s order: its size, mtime_ns and, when it is a plain
    # upright JPEG (`decode.plain_jpeg`), its longer side; 0 otherwise or when a verdict
    # cached by an older vision_tl does not say.
    facts: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), np.int64))

    def summary(self) -> str:
        odd = ", ".join(f"{n} {kind}" for kind, n in sorted(self.notes.items()))
        return (
            f"{len(self.good)} decode fine{f' (odd but usable: {odd})' if odd else ''}, "
            f"{len(self.bad)} do not; {self.cached} verdicts from the scan cache, "
            f"{self.seconds:.1f} s"
        )


def _notes(image: Image.Image, path: Path) -> list[str]:
    notes = []
    mode_note = _MODE_NOTES.get(image.mode)
    if image.mode == "P":
        mode_note = "palette+transparency" if "transparency" in image.info else "palette"
    if mode_note:
        notes.append(mode_note)
    if image.getexif().get(EXIF_ORIENTATION, 1) not in (1, None):
        notes.append("EXIF-rotated")
    if getattr(image, "n_frames", 1) > 1 and image.format not in _JPEG_LIKE:
        notes.append("animated (first frame used)")
    suffix = path.suffix
    if suffix != suffix.lower():
        notes.append(f"{suffix} extension")
    expected = _EXTENSION_FORMATS.get(suffix.lower())
    actual = "JPEG" if image.format in _JPEG_LIKE else image.format
    if expected and actual and expected != actual:
        notes.append(f"{actual} content named {suffix.lower()}")
    return notes


def check_image(
    path: str | Path, max_pixels: int | ReadLimits = DEFAULT_MAX_PIXELS
) -> tuple[str | None, list[str]]:
    """Decode `path` as training will; return (why it is unusable or None, notes).

    `max_pixels` is a pixel limit or the full `ReadLimits` (with the byte limit): a file
    that is not a regular file, or is larger than the limit, is refused unread. Pillow
    warns (rather than fails) on images between its limit and twice that; call this under
    `warnings.catch_warnings()` to keep those out of the log.
    """
    limits = max_pixels if isinstance(max_pixels, ReadLimits) else ReadLimits(max_pixels=max_pixels)
    reason, notes, _ = inspect_image(Path(path), limits)
    return reason, notes


def inspect_image(path: Path, limits: ReadLimits) -> tuple[str | None, list[str], int]:
    """`check_image`'s verdict and notes, and the longer side of a plain upright JPEG (0
    for any other file)."""
    if path.suffix.lower() in UNSUPPORTED_EXTENSIONS:
        return f"unsupported format {path.suffix} (convert it to JPEG or PNG)", [], 0
    try:
        if path.stat().st_size == 0 and path.is_file():
            return "empty file (0 bytes)", [], 0
        with open_image(path, limits) as image:
            notes = _notes(image, path)
            plain_side = max(image.size) if plain_jpeg(image) else 0
        # The real decode path; a big JPEG decodes at 1/8 scale but is still read to the
        # end, so truncation shows.
        load_rgb(path, min_side=1, limits=limits)
    except (RefusedFile, ImageTooLarge) as err:
        return str(err), [], 0
    except Image.DecompressionBombError as err:
        return f"too large to decode safely ({error_line(err)})", [], 0
    except UnidentifiedImageError:
        return "not an image (the content is no image format Pillow can read)", [], 0
    except OSError as err:
        if "truncated" in str(err).lower():  # "image file is truncated", "Truncated File Read"
            return "truncated file (image data ends early)", [], 0
        return f"corrupt or unreadable ({error_line(err)})", [], 0
    except Exception as err:
        return f"cannot be decoded ({error_line(err)})", [], 0
    return None, notes, plain_side


class ImageScanner:
    """Check many files in parallel threads, with verdicts cached in a JSON file.

    Pillow releases the GIL while decoding, so threads scale without the start-up and
    pickling costs of processes. The cache maps path -> [size, mtime_ns, reason, notes,
    plain JPEG side]; any change to a file's size or mtime re-checks it. Concurrent jobs
    may both write the cache: writes are atomic renames and the contents agree.
    """

    def __init__(
        self,
        cache_file: str | Path | None = None,
        max_pixels: int | ReadLimits = DEFAULT_MAX_PIXELS,
        workers: int | None = None,
    ) -> None:
        self.cache_file = Path(cache_file) if cache_file else None
        self.limits = (
            max_pixels if isinstance(max_pixels, ReadLimits) else ReadLimits(max_pixels=max_pixels)
        )
        self.max_pixels = self.limits.max_pixels
        self.workers = workers or min(16, 2 * available_cpus())

    @staticmethod
    def cache_file_for(cache_root: str | Path, root: str | Path) -> Path:
        """One cache file per data root, under `<cache_root>/scans/`."""
        digest = hashlib.sha1(os.fsencode(Path(root).expanduser().resolve())).hexdigest()
        return Path(cache_root).expanduser() / "scans" / f"{digest[:20]}.json"

    def _load_cache(self) -> dict[str, list]:
        if self.cache_file is None or not self.cache_file.is_file():
            return {}
        try:
            data = json.loads(self.cache_file.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("limits") != self._limits_key():
            return {}
        return data.get("files", {})

    def _save_cache(self, files: dict[str, list]) -> None:
        if self.cache_file is None:
            return
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        payload = {"version": SCAN_VERSION, "limits": self._limits_key(), "files": files}
        write_text(self.cache_file, json.dumps(payload))

    def _limits_key(self) -> list[int]:
        """Verdicts hold under the limits they were reached with, and this scan's version."""
        return [SCAN_VERSION, self.limits.max_pixels, self.limits.max_file_bytes]

    def scan(self, paths: Sequence[str]) -> ScanReport:
        """Check `paths`; unreadable stats and undecodable files become `bad`."""
        start = time.perf_counter()
        cached = self._load_cache()
        report = ScanReport()
        verdicts: dict[str, list] = {}
        todo: list[tuple[str, int, int]] = []
        for path in paths:
            try:
                stat = os.stat(path)
            except OSError as err:
                verdicts[path] = [-1, -1, f"cannot read ({error_line(err)})", []]
                continue
            entry = cached.get(path)
            if entry and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
                verdicts[path] = entry
                report.cached += 1
            else:
                todo.append((path, stat.st_size, stat.st_mtime_ns))
        if todo:
            # Pillow's warnings (bomb size, odd EXIF) become verdicts here. The filter is
            # process-wide: catch_warnings inside the threads would race.
            with warnings.catch_warnings(), ThreadPoolExecutor(self.workers) as pool:
                warnings.simplefilter("ignore")
                results = pool.map(lambda t: inspect_image(Path(t[0]), self.limits), todo)
                for (path, size, mtime), result in zip(todo, results, strict=True):
                    verdicts[path] = [size, mtime, *result]
            self._save_cache({p: v for p, v in verdicts.items() if v[0] >= 0})
        facts = []
        for path in paths:
            size, mtime, reason, notes, *side = verdicts[path]  # no side: an older cache's
            if reason:
                report.bad.append(BadFile(path, reason))
            else:
                report.good.append(path)
                report.notes.update(notes)
                facts.append((size, mtime, side[0] if side else 0))
        report.facts = np.array(facts, np.int64).reshape(-1, 3)
        report.seconds = time.perf_counter() - start
        return report


def write_bad_files(path: str | Path, bad: Iterable[BadFile]) -> None:
    """Write `path,reason` rows (header only when there are none), atomically; a name
    that is not UTF-8 is written `printable`."""
    import pandas as pd

    rows = [(item.path, item.reason) for item in bad]
    frame = pd.DataFrame(rows, columns=["path", "reason"])
    write_csv(frame, path, index=False, lineterminator="\r\n")  # as `csv` appends rows


def read_bad_files(path: str | Path) -> list[BadFile]:
    """The rows of a bad-files CSV; rows cut short (a worker killed mid-line) are dropped."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        return [
            BadFile(row["path"], row["reason"])
            for row in csv.DictReader(f)
            if row.get("path") is not None and row.get("reason") is not None
        ]


class BadFileLog:
    """Where a file that fails during training is reported: a warning and a CSV row.

    Picklable, so DataLoader workers carry it; each appends one short line with
    O_APPEND, which does not interleave with other writers.
    """

    def __init__(self, path: str | Path | None = None, preflight_rows: int = 0) -> None:
        self.path = str(path) if path else None
        self.preflight_rows = preflight_rows
        self._seen: dict[str, str] = {}

    def __call__(self, file: str, reason: str) -> None:
        if file in self._seen:
            return
        self._seen[file] = reason
        log.warning("Skipping %s: %s", printable(file), reason)
        if self.path:
            with open(self.path, "a", newline="", encoding="utf-8") as f:
                csv.writer(f).writerow([printable(file), printable(reason)])

    def later_failures(self) -> list[BadFile]:
        """Files reported after the pre-flight rows, by any process (workers included),
        each once, in the order they failed."""
        if not self.path:
            return [BadFile(printable(p), reason) for p, reason in self._seen.items()]
        if not os.path.exists(self.path):
            return []
        seen: dict[str, BadFile] = {}
        for item in read_bad_files(self.path)[self.preflight_rows :]:
            seen.setdefault(item.path, item)
        return list(seen.values())

    def deduplicate(self) -> None:
        """Drop rows repeated by several workers, keeping the first of each path."""
        if not self.path or not os.path.exists(self.path):
            return
        seen: dict[str, BadFile] = {}
        for item in read_bad_files(self.path):
            seen.setdefault(item.path, item)
        write_bad_files(self.path, seen.values())

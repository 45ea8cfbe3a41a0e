"""Images in class subfolders: `root/{train,val,test}/<class>/...` or `root/<class>/...`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from vision_tl.core.errors import ConfigError
from vision_tl.data.decode import ReadLimits
from vision_tl.data.folder import file_catalog, file_signature
from vision_tl.data.preprocess import AnyPreprocess
from vision_tl.data.scan import ImageScanner
from vision_tl.data.source import Catalog, Source, digest, register_source


@register_source("folder")
class FolderSource(Source):
    """Class folders under `root`; every file is checked once before use (verdicts cached
    under `cache_root/scans/`, keyed by path, size and mtime). Keys are file paths. Only
    regular files within `limits` (`data.max_file_bytes`, `data.max_image_pixels`) are
    read, by the check and by every later read."""

    def __init__(
        self, root: str | Path, cache_root: Path | None = None, limits: ReadLimits | None = None
    ) -> None:
        self.root = Path(root).expanduser()
        self.cache_root = cache_root
        self.limits = limits or ReadLimits()

    @classmethod
    def from_config(cls, data: Mapping[str, Any], cache_root: Path) -> FolderSource:
        if not data.get("root"):
            raise ConfigError("data.source=folder needs data.root=DIR (a folder of class folders)")
        return cls(data["root"], cache_root, ReadLimits.from_config(data))

    def scanner(self, anchor: Path) -> ImageScanner:
        """The pre-flight check, its verdicts cached per `anchor` under `cache_root/scans/`."""
        cache = ImageScanner.cache_file_for(self.cache_root, anchor) if self.cache_root else None
        return ImageScanner(cache, self.limits)

    def catalog(self) -> Catalog:
        return file_catalog(self.root, scanner=self.scanner(self.anchor))

    def open(self, key: str, preprocess: AnyPreprocess) -> torch.Tensor:
        return preprocess.read(key, self.limits)

    def file(self, key: str) -> str:
        return key

    def signature(self, keys: Sequence[str]) -> str:
        return digest(file_signature(keys))

    @property
    def anchor(self) -> Path:
        """The path the user named: the scan cache and the audit's fingerprints key on it."""
        return self.root

    def describe(self) -> str:
        return f"data.root {self.root}"

    def name_of(self, key: str) -> str:
        """Relative to the data root when under it (a prefix test first: a shard index
        names every file of a million)."""
        prefix = f"{self.root.as_posix().rstrip('/')}/"
        if key.startswith(prefix) and "/../" not in key and "/./" not in key:
            return key[len(prefix) :]
        try:
            return Path(key).relative_to(self.root).as_posix()
        except ValueError:
            return key

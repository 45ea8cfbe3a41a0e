"""The built-in generated datasets (`data.builtin=NAME`), read as a class-folder tree."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vision_tl.data.builtin import DATASETS
from vision_tl.data.decode import ReadLimits
from vision_tl.data.source import Catalog, register_source
from vision_tl.data.sources.folder import FolderSource


@register_source("builtin")
class BuiltinSource(FolderSource):
    """A generated set (`vision_tl.data.builtin`), written into the cache on first use; its
    native image size is the run's default input size."""

    def __init__(self, builtin: str, cache_root: Path, limits: ReadLimits | None = None) -> None:
        self.dataset = DATASETS.get(builtin)
        super().__init__(self.dataset.folder(cache_root), cache_root, limits)

    @classmethod
    def from_config(cls, data: Mapping[str, Any], cache_root: Path) -> BuiltinSource:
        limits = ReadLimits.from_config(data)
        return cls(str(data.get("builtin") or "shapes"), cache_root, limits)

    def catalog(self) -> Catalog:
        self.dataset.materialize(self.cache_root)
        return super().catalog()

    def preprocess_defaults(self) -> dict[str, Any]:
        return {"image_size": self.dataset.image_size}

    def describe(self) -> str:
        return f"the built-in dataset '{self.dataset.name}'"

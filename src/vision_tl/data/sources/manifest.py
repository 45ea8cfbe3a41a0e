"""Images listed by a CSV manifest (`path,label`, optional `split`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vision_tl.core.errors import ConfigError
from vision_tl.data.decode import ReadLimits
from vision_tl.data.folder import file_catalog
from vision_tl.data.source import Catalog, register_source
from vision_tl.data.sources.folder import FolderSource


@register_source("manifest")
class ManifestSource(FolderSource):
    """The files a CSV names, relative to `root` when given, else to the CSV's folder; read
    and checked as class-folder files are (keys are file paths)."""

    def __init__(
        self,
        manifest: str | Path,
        root: str | Path | None = None,
        cache_root: Path | None = None,
        limits: ReadLimits | None = None,
    ) -> None:
        super().__init__(root or ".", cache_root, limits)
        self.manifest = Path(manifest).expanduser()
        self.base = Path(root).expanduser() if root else None

    @classmethod
    def from_config(cls, data: Mapping[str, Any], cache_root: Path) -> ManifestSource:
        if not data.get("manifest"):
            raise ConfigError("data.source=manifest needs data.manifest=CSV (path,label[,split])")
        limits = ReadLimits.from_config(data)
        return cls(data["manifest"], data.get("root"), cache_root, limits)

    @property
    def anchor(self) -> Path:
        return self.manifest

    def catalog(self) -> Catalog:
        scanner = self.scanner(self.anchor)
        return file_catalog(self.base, manifest=self.manifest, scanner=scanner)

    def describe(self) -> str:
        return f"data.manifest {self.manifest}"

    def name_of(self, key: str) -> str:
        """Relative to `data.root` when one is given and holds it; else as listed."""
        return super().name_of(key) if self.base is not None else key

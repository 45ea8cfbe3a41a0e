"""The registered data sources, one class per file, and the factory that picks one.

Every module in this folder is imported here, so a new source is one file (its class
with `@register_source`) plus `conf/data/<name>.yaml`. `data.source=auto` (the default)
picks what the keys imply: `shards` when `data.shards` is set, `manifest` when
`data.manifest` is, `folder` when `data.root` is, else `builtin`.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vision_tl.data.source import SOURCES, Source
from vision_tl.data.sources.builtin import BuiltinSource
from vision_tl.data.sources.folder import FolderSource
from vision_tl.data.sources.manifest import ManifestSource
from vision_tl.data.sources.shards import ShardSource

__all__ = [
    "BuiltinSource",
    "FolderSource",
    "ManifestSource",
    "ShardSource",
    "build_source",
    "source_name",
]

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")


def source_name(data: Mapping[str, Any]) -> str:
    """`data.source`, or for `auto` what the keys imply."""
    name = str(data.get("source") or "auto")
    if name != "auto":
        return name
    if data.get("shards"):
        return ShardSource.name
    if data.get("manifest"):
        return ManifestSource.name
    return FolderSource.name if data.get("root") else BuiltinSource.name


def build_source(data: Mapping[str, Any], cache_root: Path) -> Source:
    """The source the `data` config node names (see `source_name`)."""
    return SOURCES.get(source_name(data)).from_config(data, cache_root)

"""Small file helpers: a JSON file is written whole or not at all, and read tolerantly."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_json(path: str | Path, data: dict[str, Any]) -> None:
    """Write atomically (a temporary file, then a rename): a reader never sees half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: str | Path) -> dict[str, Any] | None:
    """A JSON file's content, or None when it is missing or half-written (a job still running)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
